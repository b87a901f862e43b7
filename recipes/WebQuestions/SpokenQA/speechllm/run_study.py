#!/usr/bin/env python3
"""The paper's textual-degradation study on real pretrained models.

Whisper encoder (frozen) -> adaptor -> instruct LLM, trained on spoken
WebQuestions and scored on LLaMA Questions (real recordings) and WebQ test (a
voice unseen in training), in the shape of the paper's Table 2: T2T and S2T
accuracy per strategy, text perplexity, textual importance before / after and
its layer-wise shift, and the zeroing check on the base LLM.

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
import csv
import functools
import gc
import logging
import os
import platform
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_sllm.brains import EmbeddingCTCBrain
from speechbrain_sllm.checkpointing import AtomicCheckpointer, RNGState
from speechbrain_sllm.data.dataio import make_qa_dataset, write_csv_manifest
from speechbrain_sllm.data.preparation import completion_record, is_prepared, staged_preparation
from speechbrain_sllm.importance.report import (
    summarize_shift,
    write_json,
)
from speechbrain_sllm.importance.stage import run_importance, zeroing_check
from speechbrain_sllm.metrics import paired_test, read_item_scores
from speechbrain_sllm.model.embedding_ctc import EmbeddingCTCHead
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.strategies import LayerwiseLR, apply_strategy, build_strategy
from speechbrain_sllm.strategies.lora import merge_lora
from speechbrain_sllm.study import (
    StageClock,
    fit_and_restore_best,
    importance_shift,
    make_stage_brain,
    peak_layer,
    write_importance_plots,
)

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)
from webquestions_prepare import FIELDS, prepare_webquestions  # noqa: E402

TEST_SETS = ("llamaq_test", "webq_test")
# The paper's Table 2 (Llama-3.2-1B-Instruct + Whisper, accuracy %), for comparison
PAPER_1B = {
    "no fine-tuning": (74.0, None, 44.5, None),
    "full_ft": (73.3, 66.7, 42.1, 29.1),
    "layerwise_lr": (73.7, 68.3, 43.8, 30.2),
    "lora": (73.7, 70.3, 42.9, 33.5),
}


def load_llm(hparams):
    """A fresh copy of the pretrained LLM."""
    return load_causal_lm(
        source=hparams["llm_source"],
        dtype=hparams["llm_dtype"],
        gradient_checkpointing=hparams["gradient_checkpointing"],
    )


def qa_dataset(path, prompt, hparams):
    """A spoken QA dataset (its ``prompt_ids`` serve the written questions too)."""
    return make_qa_dataset(
        path, prompt, sample_rate=hparams["sample_rate"], max_duration=hparams["max_duration"]
    )


def read_rows(manifest):
    """The rows of a CSV manifest, as dicts."""
    with open(manifest, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def rewrite_answers(manifest, answers, path):
    """Writes ``manifest`` again with each item's answer set to ``answers[ID]``.

    Items without a (non-empty) new answer are left out.
    """
    rows = [
        dict(row, answer=answers[row["ID"]])
        for row in read_rows(manifest)
        if answers.get(row["ID"], "").strip()
    ]
    write_csv_manifest(rows, FIELDS, path)


def finetuning_subset(paths, count, folder):
    """``paths`` with ``train`` cut to its first ``count`` items.

    Stage 1a (CTC) needs only transcripts and is cheap, so it reads ``align``
    (every spoken training question, with its varied renderings); answer targets,
    stage 1b, stage 2 and the importance stage read the first ``count``.
    """
    rows = read_rows(paths["train"])
    if count >= len(rows):
        return paths
    subset = os.path.join(folder, "train_finetune.csv")
    sb.utils.distributed.run_on_main(write_csv_manifest, args=[rows[:count], FIELDS, subset])
    return dict(paths, train=subset)


def self_distilled_targets(hparams, run_opts, paths, brain):
    """Training / validation targets: the base LLM's answers to the written questions.

    Redone only when the manifests or the LLM change (completion record).

    Arguments
    ---------
    hparams : dict
        The study's hyperparameters.
    run_opts : dict
        Run options.
    paths : dict
        Manifests from the preparation.
    brain : SpeechLLMBrain
        Scoring brain holding the base LLM.

    Returns
    -------
    dict
        ``paths`` with ``train`` and ``valid`` replaced by the self-distilled manifests.
    """
    folder = os.path.join(hparams["output_folder"], "targets")
    sources = [paths["train"], paths["valid"]]
    options = {"llm_source": hparams["llm_source"], "tokens": hparams["target_max_new_tokens"]}
    record = completion_record(sources, options)
    new_paths = dict(paths, train=os.path.join(folder, "train.csv"))
    new_paths["valid"] = os.path.join(folder, "valid.csv")
    if is_prepared(folder, record, ["train.csv", "valid.csv"], hparams["prepare_on_change"]):
        return new_paths
    os.makedirs(folder, exist_ok=True)
    brain.hparams.max_new_tokens = hparams["target_max_new_tokens"]
    with staged_preparation(folder, record) as staging:
        for split in ("train", "valid"):
            dataset = qa_dataset(paths[split], hparams["prompt"], hparams)
            ids, predictions, _ = brain.decode(
                dataset, "text", hparams["eval_batch_size"], progress=True
            )
            answers = {i: p.strip().split("\n")[0] for i, p in zip(ids, predictions)}
            rewrite_answers(paths[split], answers, os.path.join(staging, f"{split}.csv"))
    brain.hparams.max_new_tokens = hparams["max_new_tokens"]
    return new_paths


def transcript_targets(hparams, paths):
    """Stage-1 manifests whose answer is the question itself (ASR-style alignment)."""
    folder = os.path.join(hparams["output_folder"], "align", "data")
    os.makedirs(folder, exist_ok=True)
    aligned = {}
    for split in ("train", "valid"):
        questions = {row["ID"]: row["question"] for row in read_rows(paths[split])}
        aligned[split] = os.path.join(folder, f"{split}.csv")
        rewrite_answers(paths[split], questions, aligned[split])
    return aligned


def evaluate(brain, data, hparams, folder, modes=("text", "speech")):
    """T2T and / or S2T accuracy on both test sets; with text, perplexity on LLaMA Questions."""
    kwargs = {"batch_size": hparams["eval_batch_size"], "match": hparams["answer_match"]}
    results = {}
    for name in TEST_SETS:
        for mode in modes:
            column = f"{name.split('_')[0]}_{'t2t' if mode == 'text' else 's2t'}"
            output = os.path.join(folder, f"{column}.tsv")
            results[column] = brain.evaluate_qa(
                data[name], mode, output_file=output, progress=True, **kwargs
            )
    if "text" in modes:
        results["text_ppl"] = brain.perplexity(
            data["llamaq_test"], "text", hparams["eval_batch_size"]
        )
    return results


def importance(brain, data, hparams, name):
    """Textual importance of the brain's LLM on the training questions (written)."""
    return run_importance(
        brain,
        data["train"],
        os.path.join(hparams["output_folder"], "importance", name),
        topk_percents=tuple(hparams["importance_topk"]),
        estimator=hparams["importance_estimator"],
        mode="text",
        scope=hparams["importance_scope"],
        fraction=hparams["importance_fraction"],
        batch_size=hparams["importance_batch_size"],
        seed=hparams["seed"],
        progress=True,
    )


def base_stage(hparams, run_opts, paths):
    """Targets, then the base LLM's accuracy, perplexity, importance and zeroing check."""
    folder = os.path.join(hparams["output_folder"], "base_llm")
    model = SpeechLLM(load_llm(hparams))
    strategy = build_strategy("frozen_llm")
    brain = make_stage_brain(model, hparams, run_opts, strategy, 0.0, "text", folder, 0)
    if hparams["targets"] == "self_distilled":
        paths = self_distilled_targets(hparams, run_opts, paths, brain)
    elif hparams["targets"] != "gold":
        raise ValueError(f"targets {hparams['targets']!r} unknown; use gold or self_distilled.")
    data = {split: qa_dataset(path, hparams["prompt"], hparams) for split, path in paths.items()}
    results = evaluate(brain, data, hparams, folder, modes=("text",))
    profile, accumulator = importance(brain, data, hparams, "base")
    results["zeroing"] = zeroing_check(
        brain,
        data["llamaq_test"],
        accumulator,
        hparams["zeroing_fraction"],
        "text",
        hparams["seed"],
    )
    results["peak"] = peak_layer(profile)
    scores = {name: accumulator.score(name) for name in accumulator.params}
    logger.info(f"base LLM: {results}")
    return results, profile, scores, data, paths


def ctc_alignment(hparams, run_opts, train, valid, encoder, adaptor, embeddings):
    """Stage 1a: CTC of the adaptor's frames onto the LLM's input embeddings (LLM not run).

    Arguments
    ---------
    hparams : dict
        The study's hyperparameters (``align_ctc_*``, ``tokenizer``, ``ft_batch_size``).
    run_opts : dict
        Run options.
    train : DynamicItemDataset
        Spoken training questions (their ``question`` is the transcript).
    valid : DynamicItemDataset
        Spoken validation questions (the lowest loss picks the epoch).
    encoder : SpeechEncoder
        The frozen encoder.
    adaptor : torch.nn.Module
        Trained in place; the lowest-validation-loss epoch is restored.
    embeddings : torch.Tensor
        The LLM's input embedding table.

    Returns
    -------
    dict
        ``ctc_valid_loss`` and ``ctc_valid_wer`` (best-path decoding, %) of the restored epoch.
    """
    folder = os.path.join(hparams["output_folder"], "align", "ctc")
    counter = sb.utils.epoch_loop.EpochCounter(limit=hparams["align_ctc_epochs"])
    head = EmbeddingCTCHead(embeddings, scale=hparams["align_ctc_scale"])
    checkpointer = AtomicCheckpointer(
        os.path.join(folder, "save"),
        recoverables={"adaptor": adaptor, "ctc_head": head, "counter": counter, "rng": RNGState()},
    )
    brain = EmbeddingCTCBrain(
        modules={"encoder": encoder, "adaptor": adaptor, "ctc_head": head},
        opt_class=functools.partial(torch.optim.AdamW, lr=hparams["align_ctc_lr"]),
        hparams={
            "tokenizer": hparams["tokenizer"],
            "norm_weight": hparams["align_ctc_norm_weight"],
            "epoch_counter": counter,
            "train_logger": sb.utils.train_logger.FileTrainLogger(
                os.path.join(folder, "train_log.txt")
            ),
        },
        run_opts=run_opts,
        checkpointer=checkpointer,
    )
    loader = {"batch_size": hparams["ft_batch_size"]}
    brain.fit(
        counter,
        train,
        valid,
        train_loader_kwargs=dict(loader, shuffle=True),
        valid_loader_kwargs=dict(loader),
    )
    brain.evaluate(valid, min_key="loss", test_loader_kwargs=dict(loader), progressbar=False)
    return {"ctc_valid_loss": brain.last_stats["loss"], "ctc_valid_wer": brain.last_stats["WER"]}


def align_stage(hparams, run_opts, paths, data, encoder):
    """Stage 1: trains the adaptor with the LLM frozen; returns it and its scores.

    First CTC onto the LLM's input embeddings (``align_ctc_epochs``), then the
    LLM's own loss on ``align_targets`` (``align_epochs``); either may be 0.
    """
    folder = os.path.join(hparams["output_folder"], "align")
    sb.utils.seed_everything(hparams["seed"])
    adaptor = hparams["adaptor"]
    llm = load_llm(hparams)
    results = {}
    if hparams["align_ctc_epochs"] > 0:
        embeddings = llm.get_input_embeddings().weight
        results.update(
            ctc_alignment(
                hparams, run_opts, data["align"], data["valid"], encoder, adaptor, embeddings
            )
        )
    model = SpeechLLM(llm, encoder, adaptor)
    strategy = build_strategy("frozen_llm")
    apply_strategy(model, strategy)
    stage_hparams = dict(hparams)
    train, valid = data["train"], data["valid"]
    if hparams["align_targets"] == "transcript":
        aligned = transcript_targets(hparams, paths)
        stage_hparams["prompt"] = prompt = hparams["align_prompt"]
        train, valid = (qa_dataset(aligned[s], prompt, hparams) for s in ("train", "valid"))
    elif hparams["align_targets"] != "answer":
        raise ValueError(
            f"align_targets {hparams['align_targets']!r} unknown; use transcript or answer."
        )
    brain = make_stage_brain(
        model,
        stage_hparams,
        run_opts,
        strategy,
        hparams["align_lr"],
        "speech",
        folder,
        hparams["align_epochs"],
    )
    if hparams["align_epochs"] > 0:
        fit_and_restore_best(brain, train, valid, hparams["ft_batch_size"])
    if hparams["align_targets"] == "transcript":
        results["valid_wer"] = brain.evaluate_wer(
            valid, os.path.join(folder, "valid_wer.txt"), batch_size=hparams["eval_batch_size"]
        )
    brain.hparams.prompt = hparams["prompt"]
    # the LLM is frozen here: its text scores are the base LLM's (main copies them)
    results.update(evaluate(brain, data, hparams, folder, modes=("speech",)))
    logger.info(f"stage 1 (aligned adaptor): {results}")
    return adaptor, results


def finetune_stage(name, hparams, run_opts, data, encoder, adaptor):
    """Speech fine-tuning with one strategy from the aligned adaptor; evaluation; importance."""
    folder = os.path.join(hparams["output_folder"], "finetune", name)
    sb.utils.seed_everything(hparams["seed"])
    model = SpeechLLM(load_llm(hparams), encoder, copy.deepcopy(adaptor))
    layerwise = LayerwiseLR(
        rule="importance",
        lam=hparams["layerwise_lambda"],
        profile=os.path.join(hparams["output_folder"], "importance", "base", "profile.json"),
    )
    strategy = build_strategy(name, lora=hparams["lora"], layerwise_lr=layerwise)
    apply_strategy(model, strategy)
    lr = hparams["ft_lr"][name]
    brain = make_stage_brain(
        model, hparams, run_opts, strategy, lr, "speech", folder, hparams["ft_epochs"]
    )
    fit_and_restore_best(brain, data["train"], data["valid"], hparams["ft_batch_size"])
    results = evaluate(brain, data, hparams, folder)
    merge_lora(model)
    profile, accumulator = importance(brain, data, hparams, name)
    scores = {n: accumulator.score(n) for n in accumulator.params}
    logger.info(f"{name}: {results}")
    return results, profile, scores


def cell(value, digits=1):
    """A table cell: the number, or ``-``."""
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(base, stage1, runs):
    """Table 2 of the paper, measured here (markdown)."""
    lines = [
        "| Method | LlamaQ T2T | LlamaQ S2T | WebQ T2T | WebQ S2T | text PPL (LlamaQ) "
        "| importance JS vs base | top-3% IoU vs base |",
        "|---|---|---|---|---|---|---|---|",
        f"| no fine-tuning | {cell(base['llamaq_t2t'])} | - | {cell(base['webq_t2t'])} | - "
        f"| {base['text_ppl']:.2f} | 0 | 1 |",
        f"| stage 1: adaptor aligned, LLM frozen | {cell(stage1['llamaq_t2t'])} "
        f"| {cell(stage1['llamaq_s2t'])} | {cell(stage1['webq_t2t'])} "
        f"| {cell(stage1['webq_s2t'])} | {stage1['text_ppl']:.2f} | 0 | 1 |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {cell(run['llamaq_t2t'])} | {cell(run['llamaq_s2t'])} "
            f"| {cell(run['webq_t2t'])} | {cell(run['webq_s2t'])} | {run['text_ppl']:.2f} "
            f"| {run['shift']['js']:.4f} | {run['top3_iou']:.3f} |"
        )
    return "\n".join(lines)


def paper_table():
    """The paper's 1B rows, for comparison (markdown)."""
    lines = [
        "| Method (paper, Llama-3.2-1B) | LlamaQ T2T | LlamaQ S2T | WebQ T2T | WebQ S2T |",
        "|---|---|---|---|---|",
    ]
    for name, values in PAPER_1B.items():
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def paired_t2t_tests(folder, runs):
    """Exact McNemar tests of each strategy's T2T answers against the base LLM's, per test set."""
    tests = {}
    for name in runs:
        for column in ("llamaq_t2t", "webq_t2t"):
            base = read_item_scores(os.path.join(folder, "base_llm", f"{column}.tsv"))
            run = read_item_scores(os.path.join(folder, "finetune", name, f"{column}.tsv"))
            ids = sorted(base)
            tests.setdefault(name, {})[column] = paired_test(
                [base[i] for i in ids], [run[i] for i in ids]
            )
    return tests


def hardware(device):
    """A short description of the device the run used, the machine and threads.

    Arguments
    ---------
    device : str or None
        The run's ``--device`` ("cpu", "cuda:0", ...); None: SpeechBrain's guess.

    Returns
    -------
    str
        e.g. "cpu; AMD EPYC ...; 2 CPUs; torch threads 2".
    """
    model = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        model = names[0] if names else model
    device = str(torch.device(device or sb.utils.distributed.infer_device()))
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device}; {model}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}"


def main(argv):
    """Runs the study; returns the results dict."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with open(hparams_file) as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    clock = StageClock()
    with clock.stage("data"):
        paths = sb.utils.distributed.run_on_main(
            prepare_webquestions,
            kwargs={
                "data_folder": hparams["data_folder"],
                "save_folder": hparams["save_folder"],
                "llama_questions_folder": hparams["llama_questions_folder"],
                "num_train": hparams["num_train"],
                "num_valid": hparams["num_valid"],
                "num_test": hparams["num_test"],
                "num_llamaq": hparams["num_llamaq"],
                "varied_renderings": hparams["varied_renderings"],
                "seed": hparams["seed"],
                "skip_prep": hparams["skip_prep"],
                "on_change": hparams["prepare_on_change"],
            },
        )
        paths = prepare_webquestions(
            hparams["data_folder"],
            hparams["save_folder"],
            hparams["llama_questions_folder"],
            skip_prep=True,
        )
    paths = finetuning_subset(paths, hparams["num_finetune"], hparams["save_folder"])
    with clock.stage("targets_and_base_llm"):
        base, base_profile, base_scores, data, paths = base_stage(hparams, run_opts, paths)
    encoder = hparams["encoder"]
    free_finished_stage()
    with clock.stage("stage1_alignment"):
        adaptor, stage1 = align_stage(hparams, run_opts, paths, data, encoder)
    free_finished_stage()
    stage1.update({key: base[key] for key in ("llamaq_t2t", "webq_t2t", "text_ppl")})
    runs, profiles = {}, {"base LLM": base_profile}
    for name in hparams["strategies"]:
        with clock.stage(f"finetune_{name}"):
            run, profile, scores = finetune_stage(name, hparams, run_opts, data, encoder, adaptor)
        run["shift"], run["top3_iou"] = importance_shift(base_profile, base_scores, profile, scores)
        run["shift"]["peak_after"] = peak_layer(profile)
        logger.info(f"{name}: {summarize_shift(run['shift'])}")
        runs[name], profiles[name] = run, profile
        del scores
        free_finished_stage()
    machine = hardware(run_opts.get("device"))
    return report(hparams, base, stage1, runs, profiles, base_profile, clock, machine)


def free_finished_stage():
    """Frees the last stage's model, optimizer state and ``--debug`` checkpoint folder now.

    A SpeechBrain ``Brain`` sits in a reference cycle (its checkpointer holds it as a
    recoverable), so it outlives its stage until Python's cycle collector runs: without
    this, one strategy's LLM, gradients and AdamW state (2.2 GB for SmolLM2-135M in
    fp32) were still resident while the next strategy loaded its own (measured: 6.1 GB
    peak resident set in the ``--debug`` test run), and its temporary checkpoint folder
    stayed on disk.
    """
    gc.collect()


def report(hparams, base, stage1, runs, profiles, base_profile, clock, machine):
    """Tables, shift metrics, plots, results.json and timings.json; returns the results.

    ``machine`` describes the device the run used and the host (``hardware``).
    """
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
    results["paired_t2t_vs_base"] = paired_t2t_tests(folder, runs)
    seconds = clock.total()
    if sb.utils.distributed.if_main_process():
        write_json(results, os.path.join(folder, "results.json"))
        timings = {"total": seconds, "stages": clock.seconds, "hardware": machine}
        write_json(timings, os.path.join(folder, "timings.json"))
        write_importance_plots(profiles, base_profile, os.path.join(folder, "plots"))
        with open(os.path.join(folder, "results.md"), "w") as handle:
            handle.write(table + "\n\n" + paper + "\n")
    zeroing = base["zeroing"]
    print("\n" + table + "\n\n" + paper)
    print(
        f"\nZeroing {hparams['zeroing_fraction']:.0%} of the base LLM's scored parameters "
        f"({hparams['importance_scope']}; text PPL on LLaMA Questions): none "
        f"{zeroing['none']:.2f}, bottom {zeroing['bottom']:.2f}, random {zeroing['random']:.2f}, "
        f"top {zeroing['top']:.4g}"
    )
    for name, run in runs.items():
        print(f"{name:>14}: {summarize_shift(run['shift'])}")
    for name, tests in results["paired_t2t_vs_base"].items():
        print(
            f"{name:>14}: T2T vs base, "
            + "; ".join(
                f"{column}: lost {t['lost']}, gained {t['gained']}, p {t['p']:.3g}"
                for column, t in tests.items()
            )
        )
    print("\nStage wall times (s): " + ", ".join(f"{k} {v}" for k, v in clock.seconds.items()))
    print(f"\nDone in {seconds / 60:.1f} min on {machine}. Results: {folder}/results.md")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
