#!/usr/bin/env python3
"""MiniSpokenQA: the whole textual-degradation study, end to end, on a CPU.

Pretrains a small LM on a synthetic knowledge base and a speech encoder on its
spoken questions, then runs the stages its yaml lists (``StudyRunner``): base
LLM scores and importance, speech fine-tuning with each strategy, T2T / S2T
accuracy, importance shift, plots.

To run it:
> python run_study.py hparams/study.yaml            # about 10 min on 2 CPU cores
> python run_study.py hparams/study.yaml --num_entities=12 --lm_hidden_size=96 --lm_layers=4 \
>     --lm_epochs=30 --finetune="{epochs: 5}"   # CI's smaller run

Authors
 * speechbrain-sllm developers 2026
"""

# isort: off
import speechbrain_sllm  # noqa: F401  (first: chooses OpenMP waiting before torch loads)

# isort: on

import logging
import os
import sys

import speechbrain as sb
import torch

from speechbrain_sllm.config import load_recipe_hparams
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.data.prompts import ChatPrompt
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.study import (
    StageClock,
    StudyData,
    StudyModels,
    StudyRunner,
    print_summary,
    write_study_outputs,
)

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)
from minispokenqa_prepare import prepare_minispokenqa  # noqa: E402
from pretraining import load_or_train_tokenizer, pretrain_encoder, pretrain_lm  # noqa: E402


def dataio_prepare(hparams):
    """Stage 1: the knowledge base, its written and spoken QA, and the tokenizer."""
    paths = prepare_minispokenqa(
        hparams["data_folder"], hparams["num_entities"], hparams["seed"], hparams["skip_prep"]
    )
    tokenizer = load_or_train_tokenizer(hparams, paths)
    hparams["tokenizer"], hparams["prompt"] = tokenizer, ChatPrompt(tokenizer)
    return {
        split: make_qa_dataset(
            path,
            hparams["prompt"],
            with_audio=split.startswith("speech"),
            sample_rate=hparams["sample_rate"],
            max_duration=hparams["max_duration"],
            min_duration=hparams["min_duration"],
        )
        for split, path in paths.items()
    }


def results_table(base, runs):
    """The paper-style table as markdown."""
    lines = [
        "| Method | T2T acc % | S2T acc % | text PPL | importance JS vs base | peak layer "
        "| top-3% IoU vs base |",
        "|---|---|---|---|---|---|---|",
        f"| no fine-tuning | {base['t2t']:.1f} | - | {base['text_ppl']:.3f} | 0 "
        f"| {base['peak']} | 1 |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['t2t']:.1f} | {run['s2t']:.1f} | {run['text_ppl']:.3f} | "
            f"{run['shift']['js']:.4f} | {run['shift']['peak_after']} | {run['top3_iou']:.3f} |"
        )
    return "\n".join(lines)


def main(argv):
    """Runs the study; returns the results dict."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    hparams = load_recipe_hparams(hparams_file, overrides, run_opts)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    clock = StageClock()
    with clock.stage("data"):
        data = dataio_prepare(hparams)
    runner = StudyRunner(hparams, run_opts, hparams["importance"], hparams["evaluation"], clock)
    tests = {"": {"text": data["text_test"], "speech": data["speech_test"]}}
    text_test, speech_test = data["text_test"], data["speech_test"]
    runner.use_data(
        StudyData(
            tests,
            text_test,
            text_test,
            data["speech_train"],
            data["speech_valid"],
            speech_test,
            replay_set=data["text_train"],
        )
    )
    with clock.stage("lm_pretraining"):
        lm_dir = pretrain_lm(
            runner,
            data,
            hparams["lm_config"],
            hparams["lm_epochs"],
            hparams["lm_batch_size"],
            hparams["lm_lr"],
        )
    with clock.stage("encoder_pretraining"):
        encoder_path = pretrain_encoder(
            hparams, run_opts, data, epochs=hparams["encoder_epochs"], lr=hparams["encoder_lr"]
        )

    def speech_model():
        """The base LLM with the pretrained (frozen) encoder and a fresh adaptor."""
        encoder, adaptor = hparams["encoder"](), hparams["adaptor"]()
        encoder.load_state_dict(torch.load(encoder_path, map_location="cpu", weights_only=True))
        return SpeechLLM(load_causal_lm(source=lm_dir), encoder, adaptor)

    runner.use_models(StudyModels(lambda: load_causal_lm(source=lm_dir), speech_model))
    results = runner.run(hparams["stages"], hparams["stage_choices"])
    return report(hparams, results["base"], results["strategies"], runner.profiles, clock)


def report(hparams, base, runs, profiles, clock):
    """Stage 6: table, results.json, timings.json, plots; returns the results."""
    folder, table = hparams["output_folder"], results_table(base, runs)
    threads = torch.get_num_threads()
    results = {"base": base, "strategies": runs, "table": table, "torch_threads": threads}
    timings = {"total": clock.total(), "stages": clock.seconds, "torch_threads": threads}
    timings["openmp_waiting"] = speechbrain_sllm.OPENMP_WAITING
    write_study_outputs(folder, results, timings, profiles, table)
    print_summary(table, base["zeroing"], "3% of the base LLM's parameters", results, timings)
    print(
        f"Results: {folder}/results.json, "
        f"{folder}/results.md; plots: {folder}/plots/; importance profiles: "
        f"{folder}/importance/; predictions and train logs: {folder}/finetune/<strategy>/"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
