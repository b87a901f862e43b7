"""Writes importance profiles and shifts as JSON, CSV and PNG plots, and log summaries.

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from speechbrain_sllm.outputs import write_json


def write_csv(rows, path):
    """Writes a list of flat dicts as CSV (columns from the first row)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_profile(profile, folder):
    """Saves ``profile.json``, ``layers.csv`` and ``modules.csv`` into ``folder``.

    Arguments
    ---------
    profile : dict
        Output of ``aggregate`` plus metadata.
    folder : str
        Output folder.

    Returns
    -------
    str
        Path of ``profile.json`` (the file the layer-wise LR rule reads).
    """
    path = os.path.join(folder, "profile.json")
    write_json(profile, path)
    write_csv(profile["layers"], os.path.join(folder, "layers.csv"))
    write_csv(profile["modules"], os.path.join(folder, "modules.csv"))
    return path


def summarize_profile(profile, key="sum"):
    """One-line text summary: peak layer and normalised distribution.

    Example
    -------
    >>> summarize_profile({"layers": [{"sum": 1.0}, {"sum": 3.0}], "estimator": "taylor"})
    'taylor importance by layer (sum, %): L0 25.0 | L1 75.0; peak layer 1'
    """
    values = [layer[key] for layer in profile["layers"]]
    total = sum(values) or 1.0
    shares = " | ".join(f"L{i} {100 * v / total:.1f}" for i, v in enumerate(values))
    peak = max(range(len(values)), key=values.__getitem__)
    return f"{profile.get('estimator', '')} importance by layer ({key}, %): {shares}; peak layer {peak}"


def summarize_shift(shift):
    """One-line text summary of a shift dict from ``layer_shift``.

    Example
    -------
    >>> summarize_shift({"js": 0.01, "kl": 0.02, "spearman": 0.9, "emd_layers": 0.3,
    ...     "peak_before": 5, "peak_after": 2, "peak_shift": -3, "total_ratio": 0.8})
    'shift: JS 0.0100 bits, KL 0.0200 bits, Spearman 0.900, EMD 0.30 layers, peak L5 -> L2, total x0.80'
    """
    return (
        f"shift: JS {shift['js']:.4f} bits, KL {shift['kl']:.4f} bits, "
        f"Spearman {shift['spearman']:.3f}, EMD {shift['emd_layers']:.2f} layers, "
        f"peak L{shift['peak_before']} -> L{shift['peak_after']}, total x{shift['total_ratio']:.2f}"
    )


def plot_layer_distributions(profiles, path, key="sum", title="Textual importance by layer"):
    """Line plot of normalised per-layer importance for several profiles.

    Arguments
    ---------
    profiles : dict
        ``{label: profile}``.
    path : str
        PNG path.
    key : str
        Per-layer aggregate to plot.
    title : str
        Figure title.
    """
    fig, axis = plt.subplots(figsize=(6.4, 3.6))
    for label, profile in profiles.items():
        values = [layer[key] for layer in profile["layers"]]
        total = sum(values) or 1.0
        axis.plot(range(len(values)), [100 * v / total for v in values], marker="o", label=label)
    axis.set_xlabel("decoder layer")
    axis.set_ylabel(f"share of importance ({key}), %")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_concentration(summaries, path, quantile=0.05):
    """Bars of the share of the top parameters in the fullest rows / columns, per module type.

    Arguments
    ---------
    summaries : dict
        ``{model label: concentration_summary(...)}`` (with baselines).
    path : str
        PNG path.
    quantile : float
        The fraction of rows / columns shown.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), sharey=True)
    for axis, kind in zip(axes, ("rows", "cols")):
        modules = sorted({m for summary in summaries.values() for m in summary["modules"]})
        width = 0.8 / (len(summaries) + 1)
        for index, (label, summary) in enumerate(summaries.items()):
            shares = [
                summary["modules"].get(m, {}).get(kind, {}).get(quantile, 0.0) for m in modules
            ]
            axis.bar([i + index * width for i in range(len(modules))], shares, width, label=label)
        first = next(iter(summaries.values()))["modules"]
        baseline = [
            first.get(m, {}).get(f"{kind}_baseline", {}).get(quantile, 0.0) for m in modules
        ]
        axis.bar(
            [i + len(summaries) * width for i in range(len(modules))],
            baseline,
            width,
            color="lightgrey",
            label="permuted (no structure)",
        )
        axis.set_xticks([i + 0.4 for i in range(len(modules))], modules, rotation=45, fontsize=7)
        axis.set_title(f"top-3% share in the fullest {quantile:.0%} of {kind}")
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_module_heatmap(profile, path, title="Importance per module and layer"):
    """Heat map of summed importance per module type (rows) and layer (columns).

    Arguments
    ---------
    profile : dict
        A profile with ``layer_module_sum``.
    path : str
        PNG path.
    title : str
        Figure title.
    """
    modules = list(profile["layer_module_sum"])
    matrix = [profile["layer_module_sum"][m] for m in modules]
    fig, axis = plt.subplots(figsize=(6.4, 0.4 * len(modules) + 1.6))
    image = axis.imshow(matrix, aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(modules)), modules)
    axis.set_xlabel("decoder layer")
    axis.set_title(title)
    fig.colorbar(image, ax=axis, label="summed importance")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_profiles(before, after, folder, labels=("before", "after"), key="sum"):
    """Shift metrics between two profiles, written as ``shift.json`` with plots.

    Arguments
    ---------
    before : dict
        Reference profile (e.g. the base LLM).
    after : dict
        Compared profile (e.g. after speech fine-tuning).
    folder : str
        Output folder.
    labels : tuple of str
        Legend labels.
    key : str
        Per-layer aggregate compared.

    Returns
    -------
    dict
        Output of ``layer_shift``.
    """
    from speechbrain_sllm.importance.shift import layer_shift

    shift = layer_shift([x[key] for x in before["layers"]], [x[key] for x in after["layers"]])
    write_json(shift, os.path.join(folder, "shift.json"))
    plot_layer_distributions(
        {labels[0]: before, labels[1]: after}, os.path.join(folder, "layer_importance.png"), key
    )
    plot_module_heatmap(after, os.path.join(folder, f"{labels[1]}_module_heatmap.png"))
    return shift


def write_importance_plots(profiles, folder):
    """Layer-wise importance and top-3% shares per model; the base model's module heatmap.

    Arguments
    ---------
    profiles : dict
        ``{model name: importance profile}``, the base model first.
    folder : str
        Where the PNG files go.
    """
    plot_layer_distributions(profiles, os.path.join(folder, "layer_importance.png"))
    plot_layer_distributions(
        profiles,
        os.path.join(folder, "layer_top3_share.png"),
        key="top3",
        title="Share of the global top-3% text-important parameters",
    )
    base_profile = next(iter(profiles.values()))
    plot_module_heatmap(base_profile, os.path.join(folder, "base_module_heatmap.png"))
