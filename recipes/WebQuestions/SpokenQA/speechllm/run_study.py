#!/usr/bin/env python3
"""The paper's textual-degradation study (its Table 2) on real pretrained models.

Whisper encoder (frozen) -> adaptor -> instruct LLM, trained on spoken
WebQuestions, scored on LLaMA Questions' real recordings and WebQ test by the
package's ``StudyRunner`` (T2T / S2T per strategy, perplexity, importance shift).

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
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.model_export import INFERENCE_TEMPLATE
from speechbrain_sllm.study import (
    StageClock,
    StudyRunner,
    align_stage,
    free_finished_stage,
    training_targets,
    write_stage_one_results,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)
from tables import report  # noqa: E402
from webquestions_prepare import prepare_study_manifests  # noqa: E402

TEST_SETS = {"llamaq": "llamaq_test", "webq": "webq_test"}
STOP_AFTER = ("stage1", "strategies")  # stage1: iterate on the alignment alone


def load_llm(hparams):
    """A fresh copy of the pretrained LLM."""
    return load_causal_lm(
        source=hparams["llm_source"],
        dtype=hparams["llm_dtype"],
        gradient_checkpointing=hparams["gradient_checkpointing"],
    )


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


def dataio_prepare(hparams, paths):
    """Spoken QA datasets of the prepared manifests (their written questions too)."""
    return {
        split: make_qa_dataset(
            path,
            hparams["prompt"],
            sample_rate=hparams["sample_rate"],
            max_duration=hparams["max_duration"],
            min_duration=hparams["min_duration"],
        )
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
        paths = prepare(hparams)
    protocol = hparams["finetune"], hparams["importance"], hparams["evaluation"]
    optional = {"alignment": hparams["alignment"], "cascade_asr": hparams["cascade_asr"]}
    optional["inference_hparams"] = INFERENCE_TEMPLATE
    runner = StudyRunner(hparams, run_opts, *protocol, clock, **optional)
    if hparams["stop_after"] not in STOP_AFTER:
        raise ValueError(f"stop_after {hparams['stop_after']!r} unknown; use one of {STOP_AFTER}.")
    full_study = hparams["stop_after"] == "strategies"
    with clock.stage("targets_and_base"):
        folder = os.path.join(hparams["output_folder"], "base")
        base_model = SpeechLLM(load_llm(hparams))
        paths = training_targets(
            runner, paths, base_model, hparams["targets"], hparams["target_max_new_tokens"]
        )
        data = dataio_prepare(hparams, paths)
        tests = {key: {"text": data[name], "speech": data[name]} for key, name in TEST_SETS.items()}
        train = data["train"]  # written: importance and replay; spoken: speech importance
        runner.use_data(tests, train, data["llamaq_test"], train, replay_set=train)
        base = {}
        if full_study:
            base, base_profile, base_scores = runner.base_stage(base_model, folder)
    with clock.stage("cascade"):
        manifests = {key: paths[name] for key, name in TEST_SETS.items()}
        base["cascade"] = runner.cascade_stage(base_model, manifests)
    del base_model
    free_finished_stage()
    with clock.stage("stage1_alignment"):
        sb.utils.seed_everything(hparams["seed"])
        adaptor, encoder = hparams["adaptor"], hparams["encoder"]
        stage1 = align_stage(runner, paths, data, load_llm(hparams), encoder, adaptor)
    free_finished_stage()
    if not full_study:
        command = {"hparams": hparams_file, "overrides": overrides}
        folder, device = hparams["output_folder"], run_opts.get("device")
        return write_stage_one_results(folder, stage1, base["cascade"], command, clock, device)
    stage1.update({key: base[key] for key in ("llamaq_t2t", "webq_t2t", "text_ppl")})

    def build_model(strategy):
        """The pretrained LLM with the frozen encoder and a copy of the aligned adaptor."""
        return SpeechLLM(load_llm(hparams), encoder, copy.deepcopy(adaptor))

    runs, profiles = runner.run_strategies(
        build_model, data["train"], data["valid"], base_profile, base_scores
    )
    profiles = {"base LLM": base_profile, **profiles}
    return report(hparams, run_opts, base, stage1, runs, profiles, clock)


if __name__ == "__main__":
    main(sys.argv[1:])
