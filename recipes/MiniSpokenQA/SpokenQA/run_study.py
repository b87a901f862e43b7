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
from speechbrain_sllm.data.prompts import ChatPrompt
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.study import StageClock, StudyData, StudyModels, StudyRunner

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)
from minispokenqa_prepare import prepare_minispokenqa  # noqa: E402
from pretraining import load_or_train_tokenizer, pretrain_encoder, pretrain_lm  # noqa: E402
from tables import report  # noqa: E402


def dataio_prepare(hparams):
    """Stage 1: the knowledge base, its written and spoken QA, and the tokenizer."""
    paths = prepare_minispokenqa(
        hparams["manifest_folder"], hparams["num_entities"], hparams["seed"], hparams["skip_prep"]
    )
    tokenizer = load_or_train_tokenizer(hparams, paths)
    hparams["tokenizer"], hparams["prompt"] = tokenizer, ChatPrompt(tokenizer)
    return {
        split: hparams["qa_dataset"](path, hparams["prompt"], with_audio=split.startswith("speech"))
        for split, path in paths.items()
    }


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


if __name__ == "__main__":
    main(sys.argv[1:])
