"""The real-model study's report: Table 2 of the paper as measured here, the paper's, and
the study's outputs (results.json, timings.json, plots, paired tests).

Authors
 * speechbrain-sllm developers 2026
"""

import os

import torch

from speechbrain_sllm.study import (
    hardware,
    paired_tests,
    print_summary,
    read_rows,
    write_study_outputs,
)

# The paper's Table 2 (Llama-3.2-1B-Instruct + Whisper, accuracy %), for comparison
PAPER_1B = {
    "no fine-tuning": (74.0, None, 44.5, None),
    "full_ft": (73.3, 66.7, 42.1, 29.1),
    "layerwise_lr": (73.7, 68.3, 43.8, 30.2),
    "lora": (73.7, 70.3, 42.9, 33.5),
}


def cell(value, digits=1):
    """A table cell: the number, or ``-``.

    Example
    -------
    >>> cell(None), cell(12.345)
    ('-', '12.3')
    """
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(base, align, runs):
    """Table 2 of the paper, measured here (markdown).

    Arguments
    ---------
    base : dict
        The base LLM's scores.
    align : dict
        The aligned adaptor's scores (LLM frozen: its text scores are the base LLM's);
        empty when the align stage did not run.
    runs : dict
        ``{strategy: scores with shift and top3_iou}``.

    Returns
    -------
    str
    """
    lines = [
        "| Method | LlamaQ T2T | LlamaQ S2T | WebQ T2T | WebQ S2T | text PPL (LlamaQ) "
        "| importance JS vs base | top-3% IoU vs base |",
        "|---|---|---|---|---|---|---|---|",
        f"| no fine-tuning | {cell(base['llamaq_t2t'])} | - | {cell(base['webq_t2t'])} | - "
        f"| {base['text_ppl']:.2f} | 0 | 1 |",
    ]
    if base.get("cascade"):
        cascade = base["cascade"]
        lines.append(
            f"| cascade: Whisper's own decoder -> base LLM (WER {cell(cascade['llamaq_wer'])} "
            f"/ {cell(cascade['webq_wer'])}) | {cell(base['llamaq_t2t'])} "
            f"| {cell(cascade['llamaq_s2t'])} | {cell(base['webq_t2t'])} "
            f"| {cell(cascade['webq_s2t'])} | {base['text_ppl']:.2f} | 0 | 1 |"
        )
    if "llamaq_s2t" in align:  # the align stage ran
        lines.append(
            f"| stage 1: adaptor aligned, LLM frozen | {cell(base['llamaq_t2t'])} "
            f"| {cell(align['llamaq_s2t'])} | {cell(base['webq_t2t'])} "
            f"| {cell(align['webq_s2t'])} | {base['text_ppl']:.2f} | 0 | 1 |"
        )
    for name, run in runs.items():
        lines.append(
            f"| {name} | {cell(run['llamaq_t2t'])} | {cell(run['llamaq_s2t'])} "
            f"| {cell(run['webq_t2t'])} | {cell(run['webq_s2t'])} | {run['text_ppl']:.2f} "
            f"| {run['shift']['js']:.4f} | {run['top3_iou']:.3f} |"
        )
    return "\n".join(lines)


def paper_table():
    """The paper's 1B rows, for comparison (markdown).

    Example
    -------
    >>> paper_table().splitlines()[2]
    '| no fine-tuning | 74.0 | - | 44.5 | - |'
    """
    lines = [
        "| Method (paper, Llama-3.2-1B) | LlamaQ T2T | LlamaQ S2T | WebQ T2T | WebQ S2T |",
        "|---|---|---|---|---|",
    ]
    for name, values in PAPER_1B.items():
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def report(hparams, run_opts, base, align, runs, profiles, clock):
    """Tables, paired tests, results.json, timings.json and plots; returns the results."""
    folder = hparams["output_folder"]
    table, paper = results_table(base, align, runs), paper_table()
    results = {
        "base": base,
        "align": align,
        "strategies": runs,
        "table": table,
        "llm": hparams["llm_source"],
        "encoder": hparams["encoder_source"],
        "targets": hparams["targets"],
        "num_train": len(read_rows(os.path.join(hparams["manifest_folder"], "train.csv"))),
        "num_finetune": min(hparams["num_finetune"], hparams["num_train"]),
        "seed": hparams["seed"],
        "torch_threads": torch.get_num_threads(),
    }
    results["paired_t2t_vs_base"] = paired_tests(
        folder, os.path.join(folder, "base"), runs, ("llamaq_t2t", "webq_t2t")
    )
    machine = hardware(run_opts.get("device"))
    timings = {"total": clock.total(), "stages": clock.seconds, "hardware": machine}
    write_study_outputs(folder, results, timings, profiles, table + "\n\n" + paper)
    importance = hparams["importance"]
    scope = f"{importance.zeroing_fraction:.0%} of the base LLM's {importance.scope}"
    print_summary(table + "\n\n" + paper, base["zeroing"], scope, results, timings)
    return results
