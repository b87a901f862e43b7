"""A study's outputs: shift metrics, tables, paired tests, plots, results and timings.

Authors
 * speechbrain-sllm developers 2026
"""

import contextlib
import json
import os
import platform
import time

import speechbrain as sb
import torch

from speechbrain_sllm.importance.aggregate import ScoreSet
from speechbrain_sllm.importance.report import (
    plot_concentration,
    summarize_shift,
    write_importance_plots,
)
from speechbrain_sllm.importance.shift import layer_shift, topk_overlap
from speechbrain_sllm.metrics import paired_test, read_item_scores
from speechbrain_sllm.outputs import write_json


def layer_sums(profile):
    """Per-layer summed importance of a profile.

    Example
    -------
    >>> layer_sums({"layers": [{"sum": 1.0}, {"sum": 2.0}]})
    [1.0, 2.0]
    """
    return [layer["sum"] for layer in profile["layers"]]


def peak_layer(profile):
    """Index of the layer with the largest summed importance.

    Example
    -------
    >>> peak_layer({"layers": [{"sum": 1.0}, {"sum": 2.0}, {"sum": 0.5}]})
    1
    """
    sums = layer_sums(profile)
    return max(range(len(sums)), key=sums.__getitem__)


def importance_shift(base_profile, base_scores, profile, scores, fraction=0.03):
    """Layer-wise shift metrics and the top-``fraction`` overlap against the base LLM.

    Arguments
    ---------
    base_profile : dict
        Importance profile (``aggregate``) of the base LLM.
    base_scores : dict
        ``{name: scores}`` of the base LLM.
    profile : dict
        Profile after fine-tuning.
    scores : dict
        Scores after fine-tuning.
    fraction : float
        Top fraction for the intersection over union.

    Returns
    -------
    shift : dict
        From ``layer_shift``.
    iou : float
        Intersection over union of the two global top-``fraction`` sets.
    """
    shift = layer_shift(layer_sums(base_profile), layer_sums(profile))
    iou = topk_overlap(ScoreSet.from_dict(base_scores), ScoreSet.from_dict(scores), fraction)
    return shift, iou


def paired_tests(folder, base_folder, runs, columns):
    """Exact McNemar tests of each run's per-item answers against the base model's.

    Arguments
    ---------
    folder : str
        The study's output folder (runs under ``finetune/<name>/``).
    base_folder : str
        The base model's folder (``<column>.tsv`` files).
    runs : iterable of str
        Strategy names.
    columns : iterable of str
        Accuracy columns (``<column>.tsv`` per model).

    Returns
    -------
    dict
        ``{run: {column: {"lost", "gained", "p"}}}``.
    """
    tests = {}
    for name in runs:
        for column in columns:
            base = read_item_scores(os.path.join(base_folder, f"{column}.tsv"))
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


def write_study_outputs(folder, results, timings, profiles, markdown):
    """Writes ``results.json``, ``timings.json``, ``results.md`` and the plots (main process).

    ``results.json`` holds only what the seed, data and thread count determine;
    wall times and the machine go to ``timings.json``.

    Arguments
    ---------
    folder : str
        The study's output folder.
    results : dict
        The study's results.
    timings : dict
        Wall times and hardware.
    profiles : dict
        ``{model name: importance profile}``, the base model first.
    markdown : str
        The tables, for ``results.md``.
    """
    if not sb.utils.distributed.if_main_process():
        return
    write_json(results, os.path.join(folder, "results.json"))
    write_json(timings, os.path.join(folder, "timings.json"))
    write_importance_plots(profiles, os.path.join(folder, "plots"))
    write_concentration_plot(folder, profiles)
    with open(os.path.join(folder, "results.md"), "w") as handle:
        handle.write(markdown + "\n")


def write_align_results(folder, align, cascade, settings, clock, device=None):
    """Stage 1's S2T beside the cascade's, with settings and times, in ``align/results.json``.

    Arguments
    ---------
    folder : str
        The study's output folder.
    align : dict
        Stage 1's scores (``<set>_s2t`` per test set).
    cascade : dict or None
        The cascade reference (``<set>_s2t``, ``<set>_wer``).
    settings : dict
        The settings that define this stage 1 (for an ablation table).
    clock : StageClock
        The stages' wall times.
    device : str or None
        The run's device (named with the hardware).

    Returns
    -------
    dict
        What was written; ``s2t_over_cascade`` per set when the cascade ran.
    """
    results = {
        "align": align,
        "cascade": cascade,
        "settings": settings,
        "seconds": clock.seconds,
        "hardware": hardware(device),
    }
    if cascade:
        sets = [key[: -len("_s2t")] for key in cascade if key.endswith("_s2t")]
        results["s2t_over_cascade"] = {
            name: align[f"{name}_s2t"] / cascade[f"{name}_s2t"] if cascade[f"{name}_s2t"] else None
            for name in sets
        }
    if sb.utils.distributed.if_main_process():
        write_json(results, os.path.join(folder, "align", "results.json"))
    print(json.dumps(results, indent=1))
    return results


def write_concentration_plot(folder, profiles):
    """``plots/row_column_concentration.png`` from each model's ``structure.json``.

    Arguments
    ---------
    folder : str
        The study's output folder (``importance/<model>/structure.json``).
    profiles : dict
        ``{label: profile}``, the base model first (its folder: ``importance/base``).
    """
    summaries = {}
    for label, name in zip(profiles, ["base", *list(profiles)[1:]]):
        path = os.path.join(folder, "importance", name, "structure.json")
        if os.path.isfile(path):
            with open(path) as handle:
                modules = json.load(handle)["summary"]["modules"]
            summaries[label] = {"modules": {m: quantile_keys(e) for m, e in modules.items()}}
    if summaries:
        plot_concentration(summaries, os.path.join(folder, "plots", "row_column_concentration.png"))


def quantile_keys(entry):
    """A summary entry read from JSON with its quantile keys as floats again.

    Example
    -------
    >>> quantile_keys({"count": 3, "rows": {"0.05": 0.5}})
    {'count': 3, 'rows': {0.05: 0.5}}
    """
    return {
        key: {float(q): share for q, share in value.items()} if isinstance(value, dict) else value
        for key, value in entry.items()
    }


def zeroing_line(zeroing, label):
    """One line of the zeroing check's perplexities.

    Example
    -------
    >>> zeroing_line({"none": 1.0, "bottom": 1.1, "random": 1.2, "top": 99.0}, "3%")
    'Zeroing 3% (text PPL): none 1.000, bottom 1.100, random 1.200, top 99'
    """
    return (
        f"Zeroing {label} (text PPL): none {zeroing['none']:.3f}, bottom "
        f"{zeroing['bottom']:.3f}, random {zeroing['random']:.3f}, top {zeroing['top']:.4g}"
    )


def print_summary(markdown, zeroing, zeroing_label, results, timings):
    """Prints the tables, the zeroing check, each shift and paired test, and the wall times.

    Arguments
    ---------
    markdown : str
        The tables.
    zeroing : dict
        The base model's zeroing check.
    zeroing_label : str
        What was zeroed (e.g. "3% of the base LLM's parameters").
    results : dict
        ``strategies`` (each with ``shift``), optional ``paired_t2t_vs_base``.
    timings : dict
        ``total`` seconds and per-stage ``stages``.
    """
    print("\n" + markdown + "\n\n" + zeroing_line(zeroing, zeroing_label))
    for name, run in results["strategies"].items():
        print(f"{name:>18}: {summarize_shift(run['shift'])}")
    for name, tests in results.get("paired_t2t_vs_base", {}).items():
        lines = [
            f"{c}: lost {t['lost']}, gained {t['gained']}, p {t['p']:.3g}" for c, t in tests.items()
        ]
        print(f"{name:>18}: T2T vs base, " + "; ".join(lines))
    stages = ", ".join(f"{name} {seconds}" for name, seconds in timings["stages"].items())
    print(f"\nStage wall times (s): {stages}\n\nDone in {timings['total'] / 60:.1f} min.")


class StageClock:
    """Wall-clock seconds per stage of a study (written to ``timings.json``).

    Example
    -------
    >>> clock = StageClock()
    >>> with clock.stage("data"):
    ...     pass
    >>> list(clock.seconds)
    ['data']
    """

    def __init__(self):
        self.seconds = {}
        self.start = time.time()

    @contextlib.contextmanager
    def stage(self, name):
        """Times the ``with`` block as stage ``name``."""
        begin = time.time()
        yield
        self.seconds[name] = round(time.time() - begin, 1)

    def total(self):
        """Seconds since the clock started."""
        return round(time.time() - self.start, 1)
