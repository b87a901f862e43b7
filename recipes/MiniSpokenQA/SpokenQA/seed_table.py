#!/usr/bin/env python3
"""The study's table as mean and spread over several seeds.

> python seed_table.py results/MiniSpokenQA/1234/results.json results/MiniSpokenQA/1235/results.json ...

Prints one markdown row per method: ``mean (min-max)`` of T2T, S2T, text
perplexity, importance JS vs base and top-3% IoU vs base over the given runs.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import sys

METHODS = {
    "full_ft": "full FT",
    "layerwise_lr": "layer-wise LR (importance rule, lambda 0.4)",
    "lora": "LoRA (r 8, alpha 16)",
    "frozen_llm": "frozen LLM (adaptor only)",
}


def cell(values, digits):
    """``mean (min-max)`` of ``values``."""
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def seed_table(paths):
    """Markdown table over the ``results.json`` files in ``paths``.

    Arguments
    ---------
    paths : list of str
        One ``results.json`` per seed.

    Returns
    -------
    str
    """
    runs = []
    for path in paths:
        with open(path) as handle:
            runs.append(json.load(handle))
    lines = [
        f"| Method ({len(runs)} seeds: mean (min-max)) | T2T acc % | S2T acc % | text PPL "
        "| importance JS vs base (bits) | top-3% IoU vs base |",
        "|---|---|---|---|---|---|",
        f"| no fine-tuning (base LLM) | {cell([r['base']['t2t'] for r in runs], 1)} | - "
        f"| {cell([r['base']['text_ppl'] for r in runs], 3)} | 0 | 1 |",
    ]
    for key, label in METHODS.items():
        rows = [run["strategies"][key] for run in runs]
        lines.append(
            f"| {label} | {cell([r['t2t'] for r in rows], 1)} | {cell([r['s2t'] for r in rows], 1)} "
            f"| {cell([r['text_ppl'] for r in rows], 3)} "
            f"| {cell([r['shift']['js'] for r in rows], 4)} "
            f"| {cell([r['top3_iou'] for r in rows], 3)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(seed_table(sys.argv[1:]))
