#!/usr/bin/env python3
"""Spoken QA fine-tuning of a speech LLM (the paper's stage), both sides evaluated.

1. textual importance of the untouched LLM (1/30 of the training transcripts);
2. speech fine-tuning with the chosen strategy (best checkpoint by valid S2T);
3. text QA (T2T) and spoken QA (S2T) accuracy on each evaluation set;
4. textual importance after fine-tuning and its shift from the base profile.

To run it (1 GPU):
> python train.py hparams/whisper_llm.yaml --data_folder=/data/va \
>     --llm_source=meta-llama/Llama-3.2-1B-Instruct --encoder_source=openai/whisper-large-v3
Several GPUs (add --parallelism=fsdp to shard an LLM that does not fit one GPU):
> torchrun --nproc_per_node=8 train.py hparams/whisper_llm.yaml ...

Authors
 * speechbrain-sllm developers 2026
"""

# isort: off
import speechbrain_sllm  # noqa: F401  (first: chooses OpenMP waiting before torch loads)

# isort: on

import os
import sys

import speechbrain as sb
from speechbrain.utils.distributed import if_main_process, run_on_main

from speechbrain_sllm.brains import MAX_METRICS, SpeechLLMBrain
from speechbrain_sllm.config import load_recipe_hparams
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.distributed import close_process_group
from speechbrain_sllm.importance.report import compare_profiles, summarize_shift
from speechbrain_sllm.importance.stage import run_importance
from speechbrain_sllm.model_export import export_recipe_run
from speechbrain_sllm.outputs import write_json
from speechbrain_sllm.strategies import apply_strategy, merge_lora

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from voiceassistant_prepare import prepare_spoken_qa  # noqa: E402


def dataio_prepare(hparams):
    """Train / valid spoken QA, the written training questions and the test sets."""

    def dataset(name, with_audio=True):
        """The QA dataset of one prepared manifest."""
        return make_qa_dataset(
            os.path.join(hparams["manifest_folder"], f"{name}.csv"),
            hparams["prompt"],
            with_audio=with_audio,
            sample_rate=hparams["sample_rate"],
            max_duration=hparams["max_duration"],
            min_duration=hparams["min_duration"],
        )

    evals = {name: dataset(f"test_{name}") for name in hparams["test_files"]}
    return dataset("train"), dataset("valid"), dataset("train", with_audio=False), evals


def textual_importance(brain, text_set, folder, hparams):
    """The importance stage on written questions; returns the profile."""
    profile, _ = run_importance(
        brain.evaluator(for_gradients=True),
        text_set,
        folder,
        estimator=hparams["importance_estimator"],
        mode="text",
        fraction=hparams["importance_fraction"],
        batch_size=hparams["batch_size"],
    )
    return profile


def main(argv):
    """Fine-tunes, scores and compares the importance: every step of the module docstring.

    Arguments
    ---------
    argv : list of str
        The hparams file, then run options and yaml overrides.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    hparams = load_recipe_hparams(hparams_file, overrides, run_opts)  # checked, then built
    if not hparams["test_files"]:
        raise ValueError(
            "test_files is empty: pass the test sets, e.g. "
            '--test_files="{llama_questions: /data/llamaq.jsonl, web_questions: /data/webq.jsonl}"'
        )
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    run_on_main(
        prepare_spoken_qa,
        kwargs={
            "train_file": hparams["train_file"],
            "test_files": hparams["test_files"],
            "save_folder": hparams["manifest_folder"],
            "valid_fraction": hparams["valid_fraction"],
            "skip_prep": hparams["skip_prep"],
            "on_change": hparams["prepare_on_change"],
        },
    )
    train_set, valid_set, text_set, test_sets = dataio_prepare(hparams)
    importance_folder = os.path.join(hparams["output_folder"], "importance")

    # LoRA starts as an exact no-op (B = 0), so the base profile can be scored on
    # the model the strategy set up: under FSDP it is then scored on shards
    apply_strategy(hparams["model"], hparams["training_strategy"])
    qa_brain = SpeechLLMBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
        evaluation=hparams["evaluation"],
        lr_schedule=hparams["lr_schedule"],
        train_logger=hparams["train_logger"],
        parallelism=hparams["parallelism"],
        fsdp=hparams["fsdp"],
    )
    qa_brain.shard_model()  # parallelism: fsdp under torchrun
    base_profile = textual_importance(
        qa_brain, text_set, os.path.join(importance_folder, "base"), hparams
    )
    qa_brain.fit(
        qa_brain.hparams.epoch_counter,
        train_set,
        valid_set,
        train_loader_kwargs={"batch_size": hparams["batch_size"], "shuffle": True},
        valid_loader_kwargs={"batch_size": hparams["eval_batch_size"]},
    )

    key = hparams["ckpt_key"]
    best = {"max_key": key} if key in MAX_METRICS else {"min_key": key}
    results = {
        name: qa_brain.evaluate(
            dataset,
            test_loader_kwargs={"batch_size": hparams["eval_batch_size"]},
            name=name,
            **best,
        )
        for name, dataset in test_sets.items()
    }
    export_recipe_run(hparams)  # the best checkpoint, before LoRA merging
    merge_lora(hparams["model"])  # under FSDP: merged into the shards in place
    after = textual_importance(
        qa_brain, text_set, os.path.join(importance_folder, "finetuned"), hparams
    )
    if if_main_process():
        shift = compare_profiles(
            base_profile, after, importance_folder, ("base", hparams["strategy"])
        )
        training = {
            "skipped_steps": qa_brain.skipped_steps,
            "dropped_items": qa_brain.dropped_items,
        }
        write_json(
            {"accuracy": results, "shift": shift, "training": training},
            os.path.join(hparams["output_folder"], "results.json"),
        )
        print(summarize_shift(shift))


if __name__ == "__main__":
    main(sys.argv[1:])
    # under torchrun: every rank waits for the others, then the group is closed
    close_process_group()
