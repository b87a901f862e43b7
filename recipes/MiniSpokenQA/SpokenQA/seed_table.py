#!/usr/bin/env python3
"""The study's table as mean and spread over several seeds, and its T2T-vs-S2T picture.

> python seed_table.py results/MiniSpokenQA/1234/results.json results/MiniSpokenQA/1235/results.json ...
> python seed_table.py --plot=t2t_vs_s2t.png --hardware="AMD EPYC, 2 cores" results/MiniSpokenQA/*/results.json

Prints one markdown row per method found in every run (each strategy, each
``+mitigation`` and, when the runs interpolated weights, each strategy at each
alpha): ``mean (min-max)`` of T2T, S2T, text perplexity, importance JS vs base
and top-3% IoU vs base; then, per method, in how many seeds it keeps at least
layer-wise LR's T2T with at least full FT's S2T, and each method's exact
McNemar test of T2T against the base LLM per seed (from the per-item answers
beside each ``results.json``). ``--plot`` also draws T2T against S2T, one point per
method at its mean with its seed range as error bars.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import os
import sys

from speechbrain_sllm.importance.shift import layer_shift
from speechbrain_sllm.study import paired_tests
from speechbrain_sllm.study.report import layer_sums

ARMS = ("full_ft", "full_ft_text_arm")  # the speech arm and its text control

LABELS = {
    "full_ft": "full FT",
    "layerwise_lr": "layer-wise LR (importance rule, lambda 0.4)",
    "lora": "LoRA (r 8, alpha 16)",
    "frozen_llm": "frozen LLM (adaptor only)",
    "layerwise_lr+by_module": "layer-wise LR per (layer, module type)",
    "full_ft+replay": "full FT + text replay",
    "full_ft+text_kd": "full FT + text self-distillation",
    "full_ft+anchor": "full FT + importance anchor",
    "full_ft_text_arm": "full FT, text arm (written questions, no audio)",
}


def cell(values, digits):
    """``mean (min-max)`` of ``values``."""
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def method_rows(runs):
    """``{label: [row per run]}`` for every method that all runs hold, in the first run's order.

    Arguments
    ---------
    runs : list of dict
        Loaded ``results.json`` files.

    Returns
    -------
    dict
    """
    rows = {}
    for name in runs[0]["strategies"]:
        if all(name in run["strategies"] for run in runs):
            rows[LABELS.get(name, name)] = [run["strategies"][name] for run in runs]
    for name, first in runs[0]["strategies"].items():
        for alpha in first.get("interpolation", {}):
            per_run = [run["strategies"].get(name, {}).get("interpolation", {}) for run in runs]
            if all(alpha in scores for scores in per_run):
                label = f"{LABELS.get(name, name)}, weights at alpha {alpha}"
                rows[label] = [scores[alpha] for scores in per_run]
    return rows


def seed_table(runs):
    """Markdown table over the loaded ``results.json`` of several seeds.

    Arguments
    ---------
    runs : list of dict
        One loaded ``results.json`` per seed.

    Returns
    -------
    str
    """
    lines = [
        f"| Method ({len(runs)} seeds: mean (min-max)) | T2T acc % | S2T acc % | text PPL "
        "| importance JS vs base (bits) | top-3% IoU vs base |",
        "|---|---|---|---|---|---|",
        f"| no fine-tuning (base LLM) | {cell([r['base']['t2t'] for r in runs], 1)} | - "
        f"| {cell([r['base']['text_ppl'] for r in runs], 3)} | 0 | 1 |",
    ]
    for label, rows in method_rows(runs).items():
        shift = (
            f"{cell([r['shift']['js'] for r in rows], 4)} | {cell([r['top3_iou'] for r in rows], 3)}"
            if all("shift" in r for r in rows)
            else "- | -"
        )
        lines.append(
            f"| {label} | {cell([r['t2t'] for r in rows], 1)} | {cell([r['s2t'] for r in rows], 1)} "
            f"| {cell([r['text_ppl'] for r in rows], 3)} | {shift} |"
        )
    return "\n".join(lines)


def goal_seeds(runs):
    """Per method, the seeds in which it keeps at least layer-wise LR's T2T with at least
    full FT's S2T (both of the same seed): issue 24's goal.

    Arguments
    ---------
    runs : list of dict
        One loaded ``results.json`` per seed (each with ``full_ft`` and ``layerwise_lr``).

    Returns
    -------
    dict
        ``{label: number of seeds that meet the goal}`` for every other method.
    """
    references = [
        (r["strategies"]["layerwise_lr"]["t2t"], r["strategies"]["full_ft"]["s2t"]) for r in runs
    ]
    met = {}
    for label, rows in method_rows(runs).items():
        if label not in (LABELS["full_ft"], LABELS["layerwise_lr"]):
            pairs = zip(rows, references)
            met[label] = sum(row["t2t"] >= t2t and row["s2t"] >= s2t for row, (t2t, s2t) in pairs)
    return met


def paired_t2t_lines(folders, runs):
    """Per method, each seed's exact McNemar test of its T2T answers against the base LLM's.

    Arguments
    ---------
    folders : list of str
        Each run's output folder (``base/t2t.tsv``, ``finetune/<name>/t2t.tsv``).
    runs : list of dict
        The loaded ``results.json`` of each folder.

    Returns
    -------
    list of str
        ``* <method>: <lost>/<gained> (p <p>), ...`` one seed after another.
    """
    names = [name for name in runs[0]["strategies"] if all(name in r["strategies"] for r in runs)]
    lines = []
    for name in names:
        cells = []
        for folder in folders:
            test = paired_tests(folder, os.path.join(folder, "base"), [name], ["t2t"])[name]["t2t"]
            cells.append(f"{test['lost']}/{test['gained']} (p {test['p']:.2g})")
        lines.append(f"* {LABELS.get(name, name)}: " + ", ".join(cells))
    return lines


def arm_shift_line(folders, arms=ARMS):
    """The layer-wise importance JS between two stages of each seed (e.g. the two arms).

    Arguments
    ---------
    folders : list of str
        Each run's output folder (``importance/<stage>/profile.json``).
    arms : tuple of str
        The two stages compared.

    Returns
    -------
    str
        ``importance JS <first> vs <second> (bits): <mean> (<min>-<max>)``.
    """
    values = []
    for folder in folders:
        profiles = []
        for name in arms:
            with open(os.path.join(folder, "importance", name, "profile.json")) as handle:
                profiles.append(layer_sums(json.load(handle)))
        values.append(layer_shift(*profiles)["js"])
    return f"importance JS {arms[0]} vs {arms[1]} (bits): {cell(values, 4)}"


def plotted_methods(runs):
    """``method_rows`` without the interpolation rows (those stay in the table)."""
    return {
        label: rows
        for label, rows in method_rows(runs).items()
        if ", weights at alpha " not in label
    }


def plot_t2t_vs_s2t(runs, path, hardware=None):
    """T2T against S2T: each method at its mean, its seed range as error bars.

    Arguments
    ---------
    runs : list of dict
        One loaded ``results.json`` per seed.
    path : str
        The image file.
    hardware : str or None
        The machine the runs were measured on, named in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 6))
    for label, rows in plotted_methods(runs).items():
        s2t, t2t = [r["s2t"] for r in rows], [r["t2t"] for r in rows]
        x, y = sum(s2t) / len(s2t), sum(t2t) / len(t2t)
        axes.errorbar(
            x,
            y,
            xerr=[[x - min(s2t)], [max(s2t) - x]],
            yerr=[[y - min(t2t)], [max(t2t) - y]],
            fmt="o",
            capsize=3,
            label=label,
        )
    axes.set_xlabel("S2T accuracy % (speech ability)")
    axes.set_ylabel("T2T accuracy % (text ability kept)")
    title = f"MiniSpokenQA, {len(runs)} seed(s): mean and range"
    axes.set_title(f"{title}\n{hardware}" if hardware else title, fontsize=10)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv):
    """Prints the table of the given ``results.json`` files; ``--plot=<png>`` also draws
    (``--hardware="<machine>"`` names the machine in its title)."""
    options = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--")}
    plot = [options["plot"]] if "plot" in options else []
    paths = [a for a in argv if not a.startswith("--")]
    runs = []
    for path in paths:
        with open(path) as handle:
            runs.append(json.load(handle))
    print(seed_table(runs))
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    if all(os.path.isfile(os.path.join(folder, "base", "t2t.tsv")) for folder in folders):
        print("\nT2T items lost/gained against the base LLM, exact McNemar p (seed by seed):")
        print("\n".join(paired_t2t_lines(folders, runs)))
    arm_profiles = [os.path.join(f, "importance", a, "profile.json") for f in folders for a in ARMS]
    if all(os.path.isfile(path) for path in arm_profiles):
        print("\n" + arm_shift_line(folders))
    if all({"full_ft", "layerwise_lr"} <= set(run["strategies"]) for run in runs):
        print("\nSeeds with at least layer-wise LR's T2T and full FT's S2T (same seed):")
        for label, count in goal_seeds(runs).items():
            print(f"* {label}: {count} of {len(runs)}")
    if plot:
        plot_t2t_vs_s2t(runs, plot[0], options.get("hardware"))


if __name__ == "__main__":
    main(sys.argv[1:])
