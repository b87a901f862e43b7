#!/usr/bin/env python3
"""The importance shift between a base LLM and a model tuned from it (any two checkpoints).

Both models are scored on the same written text with the paper's importance
(``|dL/dw * w|``); the outputs are those of
``python -m speechbrain_sllm.importance compare``: ``shift.json``,
``report.md``, ``base/`` and ``tuned/`` (profiles, structure) and ``plots/``.

To run it:
> python compare.py hparams/compare.yaml --data_folder=/data/LLAMA1-Test-Set \
>     --base_source=meta-llama/Llama-3.1-8B-Instruct --tuned_source=/models/llama-omni \
>     --tuned_prefix=model. --dtype=bfloat16 --device=cuda:0
A model that does not fit one GPU, sharded over 2:
> torchrun --nproc_per_node=2 compare.py hparams/compare.yaml ... --fsdp=True --device=cuda

Authors
 * speechbrain-sllm developers 2026
"""

# isort: off
import speechbrain_sllm  # noqa: F401  (first: chooses OpenMP waiting before torch loads)

# isort: on

import sys

import speechbrain as sb

from speechbrain_sllm.config import load_recipe_hparams
from speechbrain_sllm.distributed import close_process_group
from speechbrain_sllm.importance.compare import compare_checkpoints
from speechbrain_sllm.importance.report import summarize_shift


def main(argv):
    """Scores both checkpoints' importance and writes their shift.

    Arguments
    ---------
    argv : list of str
        The hparams file, then run options and yaml overrides.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    hparams = load_recipe_hparams(hparams_file, overrides, run_opts)  # checked, then built
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    settings = hparams["settings"]
    settings.device = run_opts["device"]
    shift = compare_checkpoints(
        hparams["base_source"],
        hparams["tuned_source"],
        hparams["text_file"],
        hparams["output_folder"],
        tuned_prefix=hparams["tuned_prefix"],
        settings=settings,
        trust_remote_code=hparams["trust_remote_code"],
    )
    print(summarize_shift(shift), f"top-3% IoU {shift['top3_iou']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
    # under torchrun: every rank waits for the others, then the group is closed
    close_process_group()
