#!/usr/bin/env python3
"""The paper's textual-degradation study (its Table 2) on real pretrained models.

Whisper encoder (frozen) -> adaptor -> instruct LLM, trained on spoken
WebQuestions, scored on LLaMA Questions' real recordings and WebQ test by the
stages its yaml lists (base LLM, cascade, stage 1, one fine-tuning stage per
strategy: T2T / S2T, perplexity, importance shift).

To run it (hub ids by default; local folders work the same):
> python run_study.py hparams/study.yaml \
>     --data_folder=/data/webquestions/main --llama_questions_folder=/data/llama-questions

Authors
 * speechbrain-sllm developers 2026
"""

# isort: off
import speechbrain_sllm  # noqa: F401  (first: chooses OpenMP waiting before torch loads)

# isort: on

import copy
import os
import sys

import speechbrain as sb

from speechbrain_sllm.config import load_recipe_hparams
from speechbrain_sllm.model.pretrained import sharing_pretrained
from speechbrain_sllm.model.speech_llm import SpeechLLM
from speechbrain_sllm.model_export import INFERENCE_TEMPLATE
from speechbrain_sllm.study import (
    StageClock,
    StudyData,
    StudyModels,
    StudyRunner,
    training_targets,
    write_align_results,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)
from tables import report  # noqa: E402
from webquestions_prepare import prepare_study_manifests  # noqa: E402

TEST_SETS = {"llamaq": "llamaq_test", "webq": "webq_test"}


def prepare(hparams):
    """Spoken WebQuestions and LLaMA Questions manifests (``webquestions_prepare.py``)."""
    return prepare_study_manifests(
        hparams["data_folder"],
        hparams["manifest_folder"],
        hparams["llama_questions_folder"],
        hparams["num_finetune"],
        num_train=hparams["num_train"],
        num_valid=hparams["num_valid"],
        num_test=hparams["num_test"],
        num_llamaq=hparams["num_llamaq"],
        varied_renderings=hparams["varied_renderings"],
        voice_set=hparams["voice_set"],
        augment_renderings=hparams["augment_renderings"],
        seed=hparams["seed"],
        skip_prep=hparams["skip_prep"],
        on_change=hparams["prepare_on_change"],
    )


def main(argv):
    """Runs the study; returns the results dict."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    hparams = load_recipe_hparams(hparams_file, overrides, run_opts)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    clock = StageClock()
    with clock.stage("data"):
        paths = prepare(hparams)
    study = hparams["importance"], hparams["evaluation"], clock, INFERENCE_TEMPLATE
    runner = StudyRunner(hparams, run_opts, *study)
    encoder, adaptor = hparams["encoder"], hparams["adaptor"]  # the align stage trains it

    def speech_model():
        """The pretrained LLM with the frozen encoder and a copy of the (aligned) adaptor."""
        return SpeechLLM(hparams["llm"](), encoder, copy.deepcopy(adaptor))

    runner.use_models(StudyModels(hparams["llm"], speech_model))
    with clock.stage("targets"):
        paths = training_targets(
            runner, paths, runner.base_model(), hparams["targets"], hparams["target_max_new_tokens"]
        )
    data = {split: hparams["qa_dataset"](path, hparams["prompt"]) for split, path in paths.items()}
    tests = {key: {"text": data[name], "speech": data[name]} for key, name in TEST_SETS.items()}
    train = data["train"]  # written: importance and replay; spoken: speech importance
    manifests = {key: paths[name] for key, name in TEST_SETS.items()}
    runner.use_data(
        StudyData(
            tests,
            train,
            data["llamaq_test"],
            train,
            data["valid"],
            train,
            train,
            datasets=data,
            manifests=paths,
            test_manifests=manifests,
        )
    )
    results = runner.run(hparams["stages"], hparams["stage_choices"])
    base, align, runs = results["base"], results.get("align", {}), results["strategies"]
    if not runs:  # stage 1 alone: its S2T beside the cascade's
        command = {"hparams": hparams_file, "overrides": overrides}
        folder, device = hparams["output_folder"], run_opts.get("device")
        return write_align_results(folder, align, base.get("cascade"), command, clock, device)
    return report(hparams, run_opts, base, align, runs, runner.profiles, clock)


if __name__ == "__main__":
    with sharing_pretrained():  # Whisper read once for the encoder, adaptor and cascade
        main(sys.argv[1:])
