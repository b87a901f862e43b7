"""Shift metrics between two layer-importance profiles (before vs after, text vs speech).

Authors
 * speechbrain-sllm developers 2026
"""

import math

from speechbrain_sllm.importance.aggregate import topk_threshold

EPS = 1e-12


def normalize(values):
    """Normalises non-negative values into a distribution (uniform if all zero).

    Example
    -------
    >>> normalize([1.0, 3.0])
    [0.25, 0.75]
    """
    total = float(sum(values))
    if total <= 0:
        return [1.0 / len(values)] * len(values)
    return [float(v) / total for v in values]


def kl_divergence(p, q):
    """KL(p || q) in bits, with ``EPS`` smoothing of q.

    Example
    -------
    >>> kl_divergence([0.5, 0.5], [0.5, 0.5])
    0.0
    """
    return sum(pi * math.log2(pi / max(qi, EPS)) for pi, qi in zip(p, q) if pi > 0)


def js_divergence(p, q):
    """Jensen-Shannon divergence in bits (0 identical, 1 disjoint).

    Example
    -------
    >>> js_divergence([1.0, 0.0], [0.0, 1.0])
    1.0
    """
    mid = [(pi + qi) / 2 for pi, qi in zip(p, q)]
    return 0.5 * kl_divergence(p, mid) + 0.5 * kl_divergence(q, mid)


def ranks(values):
    """Ranks (1-based) with ties given their average rank.

    Example
    -------
    >>> ranks([10, 20, 10])
    [1.5, 3.0, 1.5]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for pos in range(start, end + 1):
            result[order[pos]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(a, b):
    """Spearman rank correlation (Pearson on tie-averaged ranks); nan if constant.

    Example
    -------
    >>> spearman([1, 2, 3], [3, 2, 1])
    -1.0
    """
    ra, rb = ranks(a), ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var_a = sum((x - ma) ** 2 for x in ra)
    var_b = sum((y - mb) ** 2 for y in rb)
    if var_a == 0 or var_b == 0:
        return float("nan")
    return cov / math.sqrt(var_a * var_b)


def earth_movers_distance(p, q):
    """1-D earth mover's distance over layer depth, in layers.

    Example
    -------
    >>> earth_movers_distance([1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    2.0
    """
    distance, cdf_gap = 0.0, 0.0
    for pi, qi in zip(p[:-1], q[:-1]):
        cdf_gap += pi - qi
        distance += abs(cdf_gap)
    return distance


def layer_shift(before, after):
    """Shift metrics between two per-layer importance vectors.

    Arguments
    ---------
    before : list of float
        Per-layer importance (e.g. base LLM).
    after : list of float
        Per-layer importance (e.g. fine-tuned LLM), same length.

    Returns
    -------
    dict
        ``js``, ``kl`` (before || after), ``spearman``, ``emd_layers``,
        ``peak_before``, ``peak_after``, ``peak_shift``, ``total_ratio``.

    Example
    -------
    >>> shift = layer_shift([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    >>> shift["js"], shift["emd_layers"], shift["spearman"], shift["peak_shift"]
    (0.0, 0.0, 1.0, 0)
    """
    if len(before) != len(after):
        raise ValueError(
            f"layer_shift: profiles have {len(before)} and {len(after)} layers; "
            "compare profiles of the same LLM."
        )
    p, q = normalize(before), normalize(after)
    peak_before = max(range(len(p)), key=p.__getitem__)
    peak_after = max(range(len(q)), key=q.__getitem__)
    total_before = float(sum(before))
    return {
        "js": js_divergence(p, q),
        "kl": kl_divergence(p, q),
        "spearman": spearman(before, after),
        "emd_layers": earth_movers_distance(p, q),
        "peak_before": peak_before,
        "peak_after": peak_after,
        "peak_shift": peak_after - peak_before,
        "total_ratio": float(sum(after)) / total_before if total_before else float("nan"),
    }


def topk_overlap(scores_a, scores_b, fraction):
    """Intersection over union of the global top-``fraction`` parameter sets.

    Arguments
    ---------
    scores_a : ScoreSet
        First score set.
    scores_b : ScoreSet
        Second score set over the same parameter names and shapes.
    fraction : float
        Top fraction, e.g. 0.03.

    Returns
    -------
    float

    Example
    -------
    >>> import torch
    >>> from speechbrain_sllm.importance.aggregate import ScoreSet
    >>> a = ScoreSet.from_dict({"w": torch.tensor([4.0, 3.0, 2.0, 1.0])})
    >>> b = ScoreSet.from_dict({"w": torch.tensor([4.0, 1.0, 3.0, 2.0])})
    >>> topk_overlap(a, b, 0.5)
    0.3333333333333333
    """
    if sorted(scores_a.names) != sorted(scores_b.names):
        raise ValueError("topk_overlap: the score sets cover different parameters.")
    threshold_a, _ = topk_threshold(scores_a, fraction)
    threshold_b, _ = topk_threshold(scores_b, fraction)
    inter, union = 0, 0
    for name in scores_a.names:
        in_a = scores_a.score_fn(name) >= threshold_a
        in_b = scores_b.score_fn(name).to(in_a.device) >= threshold_b
        inter += int((in_a & in_b).sum())
        union += int((in_a | in_b).sum())
    inter, union = scores_a.total(inter), scores_a.total(union)
    return inter / union if union else 1.0
