"""Where in a weight matrix the important parameters sit: rows and columns.

The paper explains why LoRA keeps text ability by the structure of the top
text-important parameters: they concentrate in particular rows and columns of
the weight matrices, a low-rank pattern that a low-rank update can leave alone.
``row_column_concentration`` measures that claim on any set of scores.

For a matrix with ``n`` top entries, ``r_i`` of them in row ``i`` (rows are the
output units of a ``Linear`` weight ``(out, in)``) and ``c_j`` in column ``j``,
the share of rows at quantile ``q`` is the sum of the ``ceil(q x rows)``
largest ``r_i`` divided by ``n``; columns likewise. Without any structure the
share is only somewhat above ``q`` (counts per row are small and vary), so each
share is reported beside its no-structure baseline: the same share after the
matrix's scores are randomly permuted (seeded).

Authors
 * speechbrain-sllm developers 2026
"""

import json
import math
import os

import torch

from speechbrain_sllm.importance.aggregate import ScoreSet, topk_threshold
from speechbrain_sllm.model.parameter_names import decoder_layer_index, module_type


def top_shares(mask, quantiles):
    """Row and column shares of the top entries of one matrix.

    Arguments
    ---------
    mask : torch.Tensor
        ``(rows, cols)`` booleans: the matrix's top entries.
    quantiles : tuple of float
        Fractions of rows / columns.

    Returns
    -------
    rows : dict
        ``{q: share of the top entries in the ceil(q x rows) fullest rows}``.
    cols : dict
        The same over columns.

    Example
    -------
    >>> mask = torch.zeros(10, 4, dtype=torch.bool)
    >>> mask[0, :3] = True; mask[5, 0] = True
    >>> top_shares(mask, (0.1,))
    ({0.1: 0.75}, {0.1: 0.5})
    """
    count = int(mask.sum())
    shares = []
    for axis in (1, 0):  # sum over columns: per-row counts; over rows: per-column counts
        per_line = mask.sum(dim=axis).sort(descending=True).values
        lines = per_line.numel()
        shares.append({q: int(per_line[: math.ceil(q * lines)].sum()) / count for q in quantiles})
    return shares[0], shares[1]


def row_column_concentration(scores, fraction=0.03, quantiles=(0.01, 0.05), seed=0):
    """Row / column concentration of the global top-``fraction`` scores, per 2-D matrix.

    Arguments
    ---------
    scores : dict or ImportanceAccumulator
        ``{parameter name: score tensor}`` (an accumulator's ``scores()`` are taken).
    fraction : float
        The global top fraction over all scores together (ties at the threshold
        count as top).
    quantiles : tuple of float
        Fractions of rows / columns whose share is reported.
    seed : int or None
        Seed of the permutation baseline; None skips it.

    Returns
    -------
    dict
        ``{name: {"count": n, "rows": {q: share}, "cols": {q: share},
        "rows_baseline": {q: share}, "cols_baseline": {q: share}}}`` for each
        2-D matrix with at least one top entry.

    Example
    -------
    >>> weight = torch.zeros(100, 20)
    >>> weight[3] = 1.0  # one row holds every top score
    >>> result = row_column_concentration({"w": weight}, fraction=0.01, seed=None)
    >>> result["w"]["count"], result["w"]["rows"][0.01], result["w"]["cols"][0.05]
    (20, 1.0, 0.05)
    """
    if hasattr(scores, "scores"):
        scores = scores.scores()
    threshold, _ = topk_threshold(ScoreSet.from_dict(scores), fraction)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    results = {}
    for name, score in scores.items():
        if score.dim() != 2:
            continue
        mask = score >= threshold
        count = int(mask.sum())
        if count == 0:
            continue
        rows, cols = top_shares(mask, quantiles)
        results[name] = {"count": count, "rows": rows, "cols": cols}
        if generator is not None:
            order = torch.randperm(mask.numel(), generator=generator)
            permuted = mask.flatten()[order].view_as(mask)
            rows, cols = top_shares(permuted, quantiles)
            results[name].update({"rows_baseline": rows, "cols_baseline": cols})
    return results


def concentration_summary(concentration):
    """Top-count-weighted mean shares per module type and per decoder layer.

    Arguments
    ---------
    concentration : dict
        From ``row_column_concentration``.

    Returns
    -------
    dict
        ``{"modules": {type: entry}, "layers": {index: entry}, "all": entry}``, each
        entry ``{"count", "rows", "cols"}`` (and the baselines when computed), shares
        averaged over the group's matrices weighted by their top counts.

    Example
    -------
    >>> entry = {"count": 2, "rows": {0.01: 1.0}, "cols": {0.01: 0.5}}
    >>> summary = concentration_summary({"model.layers.0.self_attn.q_proj.weight": entry})
    >>> summary["modules"]["q_proj"]["rows"], summary["layers"][0]["cols"]
    ({0.01: 1.0}, {0.01: 0.5})
    """
    groups = {"modules": {}, "layers": {}, "all": {"all": []}}
    for name, entry in concentration.items():
        groups["modules"].setdefault(module_type(name), []).append(entry)
        layer = decoder_layer_index(name)
        if layer is not None:
            groups["layers"].setdefault(layer, []).append(entry)
        groups["all"]["all"].append(entry)
    summary = {
        kind: {key: weighted_shares(entries) for key, entries in sorted(members.items())}
        for kind, members in groups.items()
    }
    summary["all"] = summary["all"].get("all", {})
    return summary


def weighted_shares(entries):
    """Top-count-weighted mean of each share of several matrices' entries."""
    total = sum(entry["count"] for entry in entries)
    merged = {"count": total}
    for key in ("rows", "cols", "rows_baseline", "cols_baseline"):
        if key in entries[0]:
            merged[key] = {
                q: sum(entry[key][q] * entry["count"] for entry in entries) / total
                for q in entries[0][key]
            }
    return merged


def write_structure(scores, folder, fraction=0.03, quantiles=(0.01, 0.05), seed=0):
    """Writes ``<folder>/structure.json``: per-matrix concentration and its summaries.

    Arguments
    ---------
    scores : dict
        ``{parameter name: score tensor}``.
    folder : str
        The model's importance folder.
    fraction : float
        The global top fraction (the paper's 3%).
    quantiles : tuple of float
        Fractions of rows / columns.
    seed : int
        Seed of the permutation baseline.

    Returns
    -------
    dict
        ``{"fraction", "matrices", "summary"}`` (as written).
    """
    concentration = row_column_concentration(scores, fraction, quantiles, seed)
    report = {
        "fraction": fraction,
        "summary": concentration_summary(concentration),
        "matrices": concentration,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "structure.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return report
