#!/usr/bin/env python3
"""Spoken QA fine-tuning of a speech LLM (the paper's stage), both sides evaluated.

1. textual importance of the untouched LLM (1/30 of the training transcripts);
2. speech fine-tuning with the chosen strategy;
3. text QA (T2T) and spoken QA (S2T) accuracy on each evaluation set;
4. textual importance after fine-tuning and its shift from the base profile.

To run it (1 GPU):
> python train.py hparams/whisper_llm.yaml --train_file=/data/va/train.jsonl \
>     --llm_source=meta-llama/Llama-3.2-1B-Instruct --encoder_source=openai/whisper-large-v3
Several GPUs:
> torchrun --nproc_per_node=8 train.py hparams/whisper_llm.yaml ...

Authors
 * speechbrain-sllm developers 2026
"""

import os
import sys

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import if_main_process, run_on_main

from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.experiment import fit_and_restore_best, make_speech_llm_brain, steps_per_run
from speechbrain_sllm.importance.report import compare_profiles, summarize_shift, write_json
from speechbrain_sllm.importance.stage import run_importance
from speechbrain_sllm.model.speech_llm import SpeechLLM
from speechbrain_sllm.strategies import apply_strategy, build_strategy, merge_lora

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from voiceassistant_prepare import prepare_spoken_qa  # noqa: E402


def dataio_prepare(hparams):
    """Train / valid spoken QA and the evaluation sets."""

    def dataset(name, with_audio=True):
        return make_qa_dataset(
            os.path.join(hparams["manifest_folder"], f"{name}.csv"),
            hparams["prompt"],
            with_audio=with_audio,
            sample_rate=hparams["sample_rate"],
            max_duration=hparams["max_duration"],
        )

    evals = {name: dataset(f"eval_{name}") for name in hparams["eval_files"]}
    return dataset("train"), dataset("valid"), evals


def textual_importance(brain, dataset, folder, hparams):
    """The importance stage on written questions; returns the profile."""
    profile, _ = run_importance(
        brain,
        dataset,
        folder,
        estimator=hparams["importance_estimator"],
        mode="text",
        fraction=hparams["importance_fraction"],
        batch_size=hparams["batch_size"],
    )
    return profile


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    if not hparams["eval_files"]:
        raise ValueError(
            "eval_files is empty: pass the evaluation sets, e.g. "
            '--eval_files="{llama_questions: /data/llamaq.jsonl, web_questions: /data/webq.jsonl}"'
        )
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    run_on_main(
        prepare_spoken_qa,
        kwargs={
            "train_file": hparams["train_file"],
            "eval_files": hparams["eval_files"],
            "save_folder": hparams["manifest_folder"],
            "valid_fraction": hparams["valid_fraction"],
            "skip_prep": hparams["skip_prep"],
        },
    )
    train_set, valid_set, eval_sets = dataio_prepare(hparams)
    strategy = build_strategy(
        hparams["strategy"],
        lora=hparams["lora"],
        layerwise_lr=hparams["layerwise_lr"],
        train_encoder=hparams["train_encoder"],
    )
    model = SpeechLLM(hparams["llm"], hparams["encoder"], hparams["adaptor"])
    opts = dict(
        run_opts,
        precision=run_opts.get("precision", hparams["precision"]),
        max_grad_norm=hparams["max_grad_norm"],
        grad_accumulation_factor=hparams["grad_accumulation_factor"],
        ckpt_interval_minutes=hparams["ckpt_interval_minutes"],
    )
    importance_folder = os.path.join(hparams["output_folder"], "importance")
    base_brain = make_speech_llm_brain(
        model,
        build_strategy("frozen_llm"),
        hparams["prompt"],
        hparams["tokenizer"],
        os.path.join(importance_folder, "base"),
        0.0,
        0,
        1,
        run_opts=opts,
        input_mode="text",
    )
    base_profile = textual_importance(
        base_brain, train_set, os.path.join(importance_folder, "base"), hparams
    )

    apply_strategy(model, strategy)
    brain = make_speech_llm_brain(
        model,
        strategy,
        hparams["prompt"],
        hparams["tokenizer"],
        hparams["output_folder"],
        hparams["lr"],
        hparams["number_of_epochs"],
        steps_per_run(
            len(train_set),
            hparams["batch_size"],
            hparams["number_of_epochs"],
            hparams["grad_accumulation_factor"],
        ),
        run_opts=opts,
        warmup_fraction=hparams["warmup_fraction"],
        max_new_tokens=hparams["max_new_tokens"],
        num_beams=hparams["num_beams"],
    )
    fit_and_restore_best(brain, train_set, valid_set, hparams["batch_size"])

    results = {}
    for name, dataset in eval_sets.items():
        results[name] = {
            mode_name: brain.evaluate_qa(
                dataset,
                mode,
                match=hparams["answer_match"],
                batch_size=hparams["batch_size"],
                output_file=os.path.join(hparams["output_folder"], f"{name}_{mode_name}.tsv"),
            )
            for mode_name, mode in (("T2T", "text"), ("S2T", "speech"))
        }
        brain.hparams.train_logger.log_stats(
            stats_meta={"eval set": name}, test_stats=results[name]
        )
    merge_lora(model)
    after = textual_importance(
        brain, train_set, os.path.join(importance_folder, "finetuned"), hparams
    )
    if if_main_process():
        shift = compare_profiles(
            base_profile, after, importance_folder, ("base", hparams["strategy"])
        )
        write_json(
            {"accuracy": results, "shift": shift},
            os.path.join(hparams["output_folder"], "results.json"),
        )
        print(summarize_shift(shift))
