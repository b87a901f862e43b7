#!/usr/bin/env python3
"""LLaMA Questions T2T against S2T, one point per method, from one or more study runs.

> python t2t_vs_s2t.py --plot=t2t_vs_s2t.png --hardware="AMD EPYC, 2 cores" \
>     out/results_first.json out/results.json

Each ``results.json`` is a run of ``run_study.py`` from the same stage 1 (the same
``--output_folder``, different ``--stages``); a strategy found in several runs
takes its values from the last file named. The base LLM (its T2T at S2T 0 would
crowd the picture, so it is a horizontal line), stage 1 (the frozen LLM after
alignment) and the cascade reference are drawn beside the strategies. Prints the
points as a markdown table.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import sys

LABELS = {
    "full_ft": "full FT",
    "layerwise_lr": "layer-wise LR",
    "lora": "LoRA",
    "frozen_llm": "frozen LLM",
    "full_ft+replay": "full FT + text replay",
    "full_ft+text_kd": "full FT + text self-distillation",
    "full_ft+anchor": "full FT + importance anchor",
}


def merged_points(runs, test="llamaq"):
    """``{label: (s2t, t2t)}``: stage 1, the cascade and every strategy of ``runs``.

    Arguments
    ---------
    runs : list of dict
        Loaded ``results.json`` files, later ones overriding earlier strategies.
    test : str
        The test set's prefix (``llamaq`` or ``webq``).

    Returns
    -------
    base_t2t : float
        The base LLM's T2T.
    points : dict

    Example
    -------
    >>> run = {
    ...     "base": {"llamaq_t2t": 30.0, "cascade": {"llamaq_s2t": 29.0}},
    ...     "align": {"llamaq_s2t": 28.0},
    ...     "strategies": {"lora": {"llamaq_s2t": 1.0, "llamaq_t2t": 31.0}},
    ... }
    >>> merged_points([run])
    (30.0, {'cascade (Whisper decoder -> base LLM)': (29.0, 30.0), 'stage 1 (LLM frozen)': (28.0, 30.0), 'LoRA': (1.0, 31.0)})
    """
    base_t2t = runs[-1]["base"][f"{test}_t2t"]
    points = {}
    cascade = runs[-1]["base"].get("cascade")
    if cascade:
        points["cascade (Whisper decoder -> base LLM)"] = (cascade[f"{test}_s2t"], base_t2t)
    points["stage 1 (LLM frozen)"] = (runs[-1]["align"][f"{test}_s2t"], base_t2t)
    strategies = {}
    for run in runs:
        strategies.update(run["strategies"])
    for name, scores in strategies.items():
        points[LABELS.get(name, name)] = (scores[f"{test}_s2t"], scores[f"{test}_t2t"])
    return base_t2t, points


def plot(base_t2t, points, path, hardware=None):
    """Draws the points, the base LLM's T2T as a dashed line.

    Arguments
    ---------
    base_t2t : float
        The base LLM's T2T.
    points : dict
        From ``merged_points``.
    path : str
        The image file.
    hardware : str or None
        The machine the runs were measured on, named in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 6))
    axes.axhline(base_t2t, color="grey", linestyle="--", label="base LLM's T2T")
    for label, (s2t, t2t) in points.items():
        axes.plot(s2t, t2t, "s" if "stage 1" in label or "cascade" in label else "o", label=label)
    axes.set_xlabel("LLaMA Questions S2T accuracy % (300 real recordings; one item 0.33)")
    axes.set_ylabel("LLaMA Questions T2T accuracy % (text ability kept; one item 0.33)")
    title = "SmolLM2-135M-Instruct + Whisper tiny.en, one seed"
    axes.set_title(f"{title}\n{hardware}" if hardware else title, fontsize=10)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv):
    """Prints the points of the given ``results.json`` files; ``--plot=<png>`` draws them."""
    options = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--")}
    runs = []
    for path in (a for a in argv if not a.startswith("--")):
        with open(path) as handle:
            runs.append(json.load(handle))
    base_t2t, points = merged_points(runs)
    print("| Method | LlamaQ S2T | LlamaQ T2T |\n|---|---|---|")
    print(f"| base LLM | - | {base_t2t:.1f} |")
    for label, (s2t, t2t) in points.items():
        print(f"| {label} | {s2t:.1f} | {t2t:.1f} |")
    if "plot" in options:
        plot(base_t2t, points, options["plot"], options.get("hardware"))


if __name__ == "__main__":
    main(sys.argv[1:])
