#!/usr/bin/env python3
"""The paper's textual-degradation study on real pretrained models.

Whisper encoder (frozen) -> adaptor -> instruct LLM, trained on spoken
WebQuestions and scored on LLaMA Questions (real recordings) and WebQ test (a
voice unseen in training), in the shape of the paper's Table 2, by the
package's study protocol (``StudyRunner``): T2T and S2T accuracy per strategy,
text perplexity, textual importance before / after and its layer-wise shift,
the zeroing check, paired tests against the base LLM.

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
import torch

from speechbrain_sllm.config import load_recipe_hparams
from speechbrain_sllm.data.dataio import write_csv_manifest
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.study import (
    StageClock,
    StudyRunner,
    align_stage,
    free_finished_stage,
    hardware,
    paired_tests,
    print_summary,
    read_rows,
    training_targets,
    write_study_outputs,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)
from tables import paper_table, results_table  # noqa: E402
from webquestions_prepare import FIELDS, prepare_webquestions  # noqa: E402

TEST_SETS = {"llamaq": "llamaq_test", "webq": "webq_test"}


def load_llm(hparams):
    """A fresh copy of the pretrained LLM."""
    return load_causal_lm(
        source=hparams["llm_source"],
        dtype=hparams["llm_dtype"],
        gradient_checkpointing=hparams["gradient_checkpointing"],
    )


def prepare(hparams):
    """Manifests (on the main process), with ``train`` cut to its first ``num_finetune``.

    Stage 1a (CTC) reads ``align`` (every spoken training question, with its
    varied renderings); answer targets, stage 1b, stage 2 and importance read
    the first ``num_finetune``.
    """
    keys = ("num_train", "num_valid", "num_test", "num_llamaq", "varied_renderings", "seed")
    options = {key: hparams[key] for key in keys}
    options.update(skip_prep=hparams["skip_prep"], on_change=hparams["prepare_on_change"])
    folders = (hparams["data_folder"], hparams["save_folder"], hparams["llama_questions_folder"])
    sb.utils.distributed.run_on_main(prepare_webquestions, args=folders, kwargs=options)
    paths = prepare_webquestions(*folders, skip_prep=True)
    rows = read_rows(paths["train"])
    if hparams["num_finetune"] < len(rows):
        subset = os.path.join(hparams["save_folder"], "train_finetune.csv")
        rows = rows[: hparams["num_finetune"]]
        sb.utils.distributed.run_on_main(write_csv_manifest, args=[rows, FIELDS, subset])
        paths = dict(paths, train=subset)
    return paths


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
    runner = StudyRunner(hparams, run_opts, clock)
    with clock.stage("targets_and_base_llm"):
        folder = os.path.join(hparams["output_folder"], "base_llm")
        base_model = SpeechLLM(load_llm(hparams))
        paths = training_targets(runner, paths, base_model)
        data = {split: runner.qa_dataset(path) for split, path in paths.items()}
        tests = {key: {"text": data[name], "speech": data[name]} for key, name in TEST_SETS.items()}
        runner.use_data(
            tests, data["train"], data["llamaq_test"], speech_importance_set=data["train"]
        )
        base, base_profile, base_scores = runner.base_stage(base_model, folder)
    del base_model
    free_finished_stage()
    with clock.stage("stage1_alignment"):
        sb.utils.seed_everything(hparams["seed"])
        adaptor, encoder = hparams["adaptor"], hparams["encoder"]
        stage1 = align_stage(runner, paths, data, load_llm(hparams), encoder, adaptor)
    free_finished_stage()
    stage1.update({key: base[key] for key in ("llamaq_t2t", "webq_t2t", "text_ppl")})

    def build_model(strategy):
        """The pretrained LLM with the frozen encoder and a copy of the aligned adaptor."""
        return SpeechLLM(load_llm(hparams), encoder, copy.deepcopy(adaptor))

    runs, profiles = runner.run_strategies(
        build_model, data["train"], data["valid"], base_profile, base_scores
    )
    profiles = {"base LLM": base_profile, **profiles}
    return report(hparams, run_opts, base, stage1, runs, profiles, clock)


def report(hparams, run_opts, base, stage1, runs, profiles, clock):
    """Tables, paired tests, results.json, timings.json and plots; returns the results."""
    folder = hparams["output_folder"]
    table, paper = results_table(base, stage1, runs), paper_table()
    results = {
        "base": base,
        "stage1": stage1,
        "strategies": runs,
        "table": table,
        "llm": hparams["llm_source"],
        "encoder": hparams["encoder_source"],
        "targets": hparams["targets"],
        "num_train": len(read_rows(os.path.join(hparams["save_folder"], "train.csv"))),
        "num_finetune": min(hparams["num_finetune"], hparams["num_train"]),
        "seed": hparams["seed"],
        "torch_threads": torch.get_num_threads(),
    }
    results["paired_t2t_vs_base"] = paired_tests(
        folder, os.path.join(folder, "base_llm"), runs, ("llamaq_t2t", "webq_t2t")
    )
    machine = hardware(run_opts.get("device"))
    timings = {"total": clock.total(), "stages": clock.seconds, "hardware": machine}
    write_study_outputs(folder, results, timings, profiles, table + "\n\n" + paper)
    scope = f"{hparams['zeroing_fraction']:.0%} of the base LLM's {hparams['importance_scope']}"
    print_summary(table + "\n\n" + paper, base["zeroing"], scope, results, timings)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
