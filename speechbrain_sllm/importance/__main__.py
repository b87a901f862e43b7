"""Command line of the importance analysis.

> python -m speechbrain_sllm.importance compare --base BASE --tuned TUNED --text FILE --output_folder DIR

``BASE`` and ``TUNED`` are local folders or hub ids; ``TUNED`` may also be a
peft adapter folder (merged into the base on load) or a composite speech-LLM
checkpoint with ``--tuned_prefix``. Under ``torchrun`` every process scores its
share of the text (``--fsdp True`` shards each model over the processes).
Writes ``DIR/shift.json``, ``DIR/report.md``, ``DIR/base/``, ``DIR/tuned/`` and
``DIR/plots/``; see ``speechbrain_sllm.importance.compare``.

Authors
 * speechbrain-sllm developers 2026
"""

import argparse
import logging
import os
import sys

from speechbrain_sllm.importance.compare import (
    DTYPES,
    ESTIMATORS,
    CompareSettings,
    compare_checkpoints,
)


def boolean(text):
    """``True`` / ``False`` as SpeechBrain's command lines write them (also 1 / 0, yes / no)."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use True or False.")


def compare_parser(parser):
    """Adds the ``compare`` options to ``parser``."""
    defaults = CompareSettings()
    add = parser.add_argument
    add("--base", required=True, help="the base LLM: local HF folder or hub id")
    add("--tuned", required=True, help="the tuned LLM: HF folder / hub id, peft adapter folder, "
        "or a composite checkpoint file or folder (with --tuned_prefix)")  # fmt: skip
    add("--text", required=True, help="text both models are scored on: .txt (one passage a line, "
        "LM loss), LLaMA Questions .tsv, WebQuestions .json, .jsonl or .csv of questions with answers")  # fmt: skip
    add(
        "--output_folder",
        required=True,
        help="where shift.json, report.md, base/, tuned/ and plots/ go",
    )
    add("--tuned_prefix", default=None, help="prefix of the LLM's tensors in a composite checkpoint, "
        "e.g. llm., language_model., model.llm.")  # fmt: skip
    add("--estimator", default=defaults.estimator, choices=ESTIMATORS, help="importance estimator "
        "(taylor: |sum of dL/dw * w|, the paper's)")  # fmt: skip
    add("--scope", default=defaults.scope, choices=("llm", "decoder_linear"), help="parameters "
        "scored: every LLM parameter, or the decoder layers' projection matrices (for tied embeddings)")  # fmt: skip
    add(
        "--fraction",
        type=float,
        default=defaults.fraction,
        help="fraction of the text items scored, in (0, 1]",
    )
    add(
        "--batch_size",
        type=int,
        default=defaults.batch_size,
        help="items per forward / backward pass",
    )
    add("--topk_percents", type=float, nargs="+", default=defaults.topk_percents,
        help="global top-k percentages for the per-layer shares and the IoUs")  # fmt: skip
    add("--zeroing_fraction", type=float, default=defaults.zeroing_fraction,
        help="fraction zeroed in each side's zeroing check (0: skip it)")  # fmt: skip
    add(
        "--device",
        default=defaults.device,
        help="cpu, cuda or cuda:N (torchrun: cuda, one GPU a rank)",
    )
    add("--dtype", default=defaults.dtype, choices=DTYPES, help="the models' dtype")
    add(
        "--fsdp",
        type=boolean,
        default=False,
        help="shard each model with FSDP2 over the torchrun processes",
    )
    add("--shared_only", type=boolean, default=False, help="compare the shared part of checkpoints "
        "whose tensors differ (extra speech tokens, an extended vocabulary)")  # fmt: skip
    add(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the item subset and the zeroing draw",
    )
    add(
        "--instruction",
        default=defaults.instruction,
        help="user turn of QA items ({question} is replaced)",
    )
    add("--system_prompt", default=None, help="system turn of QA items")
    add("--trust_remote_code", type=boolean, default=False, help="run the checkpoints' own code "
        "(off: remote code is arbitrary Python)")  # fmt: skip
    add("--no_plan", action="store_true", help="skip the memory plan printed before scoring")


def settings_from(args):
    """``CompareSettings`` of parsed arguments."""
    keys = CompareSettings.__dataclass_fields__
    return CompareSettings(**{key: getattr(args, key) for key in keys if hasattr(args, key)})


def init_distributed(device):
    """Joins the torchrun process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)


def print_plan(args):
    """The planner's estimate for this command (the base model's config, nothing loaded)."""
    from speechbrain_sllm.memory_plan import format_compare_plan, plan_compare

    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_compare(
        args.base,
        world_size=world,
        parallelism="fsdp" if args.fsdp else "ddp",
        dtype=args.dtype,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(format_compare_plan(plan), flush=True)


def main(argv=None):
    """Runs ``compare``; exits with a one-line message on a refused input.

    Arguments
    ---------
    argv : list of str or None
        Arguments (``sys.argv[1:]`` when None).
    """
    from speechbrain_sllm.distributed import close_process_group
    from speechbrain_sllm.importance.checkpoints import ComparisonError
    from speechbrain_sllm.importance.text_sets import TextSetError

    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_sllm.importance", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    compare_parser(
        commands.add_parser("compare", help="the importance shift between two causal LMs")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    try:
        settings.check()
        if not args.no_plan:
            print_plan(args)
        init_distributed(args.device)
        shift = compare_checkpoints(
            args.base,
            args.tuned,
            args.text,
            args.output_folder,
            tuned_prefix=args.tuned_prefix,
            settings=settings,
            trust_remote_code=args.trust_remote_code,
        )
    except (ComparisonError, TextSetError, ValueError) as error:
        sys.exit(f"compare: {error}")
    print(f"JS {shift['js']:.5f} bits, Spearman {shift['spearman']:.3f}, top-3% IoU "
          f"{shift['top3_iou']:.3f}: {os.path.join(args.output_folder, 'report.md')}")  # fmt: skip
    close_process_group()  # under torchrun: every rank leaves together, the group closed


if __name__ == "__main__":
    main()
