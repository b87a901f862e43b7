"""Aggregation of per-parameter scores per decoder layer and per module type,
and exact global top-k thresholds without a sorted copy of all scores.

Authors
 * speechbrain-sllm developers 2026
"""

import torch

from speechbrain_sllm.model.parameter_names import canonical_name, decoder_layer_index, module_type

FLOAT_INF_BITS = 0x7F800000  # bit pattern of +inf in float32


class ScoreSet:
    """Named non-negative score tensors, produced on demand (never all copied at once).

    A sharded set (FSDP) holds on each rank its shard of every tensor; counts
    and sums over the set are then summed over ranks, so every rank gets the
    numbers of the whole set while no rank holds it.

    Arguments
    ---------
    names : list of str
        Parameter names.
    score_fn : callable
        ``score_fn(name) -> fp32 tensor``.
    sharded : bool
        Whether the tensors are this rank's shards (every rank must then make
        the same calls in the same order: they are collectives).

    Example
    -------
    >>> scores = ScoreSet.from_dict({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])})
    >>> scores.numel()
    3
    """

    def __init__(self, names, score_fn, sharded=False):
        self.names = list(names)
        self.score_fn = score_fn
        self.sharded = sharded

    @classmethod
    def from_dict(cls, scores):
        """Wraps a ``{name: tensor}`` dict."""
        return cls(scores.keys(), lambda name: scores[name].float())

    @classmethod
    def from_accumulator(cls, accumulator):
        """Wraps an ``ImportanceAccumulator`` (after ``check_finite``)."""
        accumulator.check_finite()
        return cls(accumulator.params.keys(), accumulator.score, accumulator.sharded)

    def items(self):
        """Yields ``(name, scores)`` one tensor at a time."""
        for name in self.names:
            yield name, self.score_fn(name)

    def numel(self):
        """Total number of scores."""
        return self.total(sum(self.score_fn(name).numel() for name in self.names))

    def total(self, values):
        """Sums a number (int) or a float64 tensor over the ranks of a sharded set."""
        if not self.sharded:
            return values
        tensor = torch.as_tensor(values, dtype=torch.int64 if isinstance(values, int) else None)
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return int(tensor.item()) if isinstance(values, int) else tensor


GATHERED_NUMEL = 2**28  # up to 1 GiB of float32 scores gathered at once
PIVOT_SAMPLE = 2**16  # values drawn to place the pivot of a gathered k-th value


def count_at_least(score_set, bits):
    """Number of scores whose float32 bit pattern is ``>= bits`` (i.e. value >= it)."""
    return score_set.total(
        sum(int((s.view(torch.int32) >= bits).sum()) for _, s in score_set.items())
    )


def count_at_most(score_set, bits):
    """Number of scores whose float32 bit pattern is ``<= bits``."""
    return score_set.total(
        sum(int((s.view(torch.int32) <= bits).sum()) for _, s in score_set.items())
    )


def kth_value(flat, k, largest):
    """The k-th largest (smallest) value of a 1-D tensor, exactly.

    A seeded sample gives a pivot a little beyond the k-th value; when at least
    ``k`` values lie on the selected side of it (almost always), the k-th value
    is taken among those few candidates only, else among all values.
    """
    count = flat.numel()
    if count > 8 * PIVOT_SAMPLE:
        generator = torch.Generator().manual_seed(0)
        sample = flat[torch.randint(count, (PIVOT_SAMPLE,), generator=generator)]
        share = min(1.0, 1.5 * k / count + 0.002)  # the margin keeps k values beyond the pivot
        rank = max(1, round(share * PIVOT_SAMPLE))
        if largest:
            pivot = sample.kthvalue(PIVOT_SAMPLE - rank + 1).values
            candidates = flat[flat >= pivot]
        else:
            pivot = sample.kthvalue(rank).values
            candidates = flat[flat <= pivot]
        if candidates.numel() >= k:
            flat = candidates
    position = flat.numel() - k + 1 if largest else k
    return flat.kthvalue(position).values


def gathered_threshold(score_set, k, largest):
    """``topk_threshold`` of a set small enough to gather once: the k-th value itself.

    It is the same number the bisection finds.
    """
    flat = torch.cat([scores.flatten() for _, scores in score_set.items()])
    value = kth_value(flat, k, largest)
    selected = (flat >= value) if largest else (flat <= value)
    return value.item(), int(selected.sum())


def topk_threshold(score_set, fraction, largest=True):
    """Exact threshold of the global top (or bottom) ``fraction`` of scores.

    A set of up to ``GATHERED_NUMEL`` scores on one process is gathered once and
    its k-th value taken (``gathered_threshold``). Larger or sharded sets use a
    bisection over float32 bit patterns (non-negative floats order like their
    bits): at most 31 counting passes, no sort, memory of one tensor at a time.
    The selected set is ``score >= threshold`` (largest) or ``score <= threshold``
    (smallest); it holds exactly ``k = round(fraction * N)`` scores unless
    values tie at the threshold, in which case all ties are included.

    Arguments
    ---------
    score_set : ScoreSet
        Non-negative scores.
    fraction : float
        Fraction in ``(0, 1]``.
    largest : bool
        Top (True) or bottom (False) fraction.

    Returns
    -------
    threshold : float
        The k-th largest (smallest) score.
    selected : int
        Number of scores in the selected set.

    Example
    -------
    >>> scores = ScoreSet.from_dict({"a": torch.tensor([0.5, 4.0, 1.0]), "b": torch.tensor([2.0, 3.0])})
    >>> topk_threshold(scores, 0.4)
    (3.0, 2)
    >>> topk_threshold(scores, 0.4, largest=False)
    (1.0, 2)
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk_threshold: fraction must be in (0, 1], got {fraction}.")
    total = score_set.numel()
    k = max(1, round(fraction * total))
    if not score_set.sharded and total <= GATHERED_NUMEL:
        return gathered_threshold(score_set, k, largest)
    low, high = 0, FLOAT_INF_BITS
    if largest:  # largest t with count(>= t) >= k
        while low < high:
            mid = (low + high + 1) // 2
            if count_at_least(score_set, mid) >= k:
                low = mid
            else:
                high = mid - 1
        selected = count_at_least(score_set, low)
    else:  # smallest t with count(<= t) >= k
        while low < high:
            mid = (low + high) // 2
            if count_at_most(score_set, mid) >= k:
                high = mid
            else:
                low = mid + 1
        selected = count_at_most(score_set, low)
    threshold = torch.tensor([low], dtype=torch.int32).view(torch.float32).item()
    return threshold, selected


def aggregate(score_set, topk_percents=(1.0, 3.0, 5.0)):
    """Per-layer and per-module sums, means and global top-k shares.

    ``top{k}`` of a layer is the share of the global top-k% set that lies in
    that layer (the shares of all layers and non-layer parts sum to 1).

    Arguments
    ---------
    score_set : ScoreSet
        Non-negative scores.
    topk_percents : tuple of float
        Percentages k for the top-k% shares.

    Returns
    -------
    dict
        ``layers`` (list of dicts), ``modules`` (list of dicts),
        ``layer_module_sum`` ({module: [sum per layer]}), ``non_layer``,
        ``thresholds`` ({"top3": value, ...}), ``total`` and ``numel``.

    Example
    -------
    >>> scores = ScoreSet.from_dict({
    ...     "model.layers.0.mlp.up_proj.weight": torch.tensor([1.0, 1.0]),
    ...     "model.layers.1.mlp.up_proj.weight": torch.tensor([3.0, 5.0]),
    ...     "model.embed_tokens.weight": torch.tensor([0.0, 2.0])})
    >>> profile = aggregate(scores, topk_percents=(50.0,))
    >>> [(layer["sum"], layer["top50"]) for layer in profile["layers"]]
    [(2.0, 0.0), (8.0, 0.6666666666666666)]
    """
    keys = [f"top{k:g}" for k in topk_percents]
    thresholds = {}
    for key, percent in zip(keys, topk_percents):
        thresholds[key], _ = topk_threshold(score_set, percent / 100.0)
    layer_stats, module_stats, layer_module = {}, {}, {}
    non_layer = new_stats(keys)
    top_counts = dict.fromkeys(keys, 0)
    total, numel = 0.0, 0
    for name, (value, size, *top) in per_parameter_stats(score_set, thresholds, keys).items():
        layer = decoder_layer_index(canonical_name(name))
        module = module_type(name)
        counts = dict(zip(keys, top))
        targets = [module_stats.setdefault(module, new_stats(keys))]
        targets.append(
            non_layer if layer is None else layer_stats.setdefault(layer, new_stats(keys))
        )
        for stats in targets:
            stats["sum"] += value
            stats["numel"] += size
            for key in keys:
                stats[key] += counts[key]
        if layer is not None:
            layer_module.setdefault(module, {}).setdefault(layer, 0.0)
            layer_module[module][layer] += value
        for key in keys:
            top_counts[key] += counts[key]
        total += value
        numel += size
    num_layers = max(layer_stats) + 1 if layer_stats else 0
    layers = [
        finish(layer_stats.get(i, new_stats(keys)), keys, top_counts, layer=i)
        for i in range(num_layers)
    ]
    modules = [
        finish(stats, keys, top_counts, module=m) for m, stats in sorted(module_stats.items())
    ]
    return {
        "num_layers": num_layers,
        "layers": layers,
        "modules": modules,
        "non_layer": finish(non_layer, keys, top_counts),
        "layer_module_sum": {
            module: [per_layer.get(i, 0.0) for i in range(num_layers)]
            for module, per_layer in sorted(layer_module.items())
        },
        "thresholds": thresholds,
        "top_counts": top_counts,
        "total": total,
        "numel": numel,
    }


def per_parameter_stats(score_set, thresholds, keys):
    """``{name: (sum, numel, count >= threshold per key)}``, over all ranks of a sharded set.

    Arguments
    ---------
    score_set : ScoreSet
        Non-negative scores.
    thresholds : dict
        ``{key: threshold}``.
    keys : list of str
        The order of the counts.

    Returns
    -------
    dict
    """
    rows = []
    for _, scores in score_set.items():
        row = [scores.sum(dtype=torch.float64).item(), scores.numel()]
        row += [int((scores >= thresholds[key]).sum()) for key in keys]
        rows.append(row)
    table = score_set.total(torch.tensor(rows, dtype=torch.float64).reshape(len(rows), -1))
    return {
        name: (row[0], int(row[1]), *(int(count) for count in row[2:]))
        for name, row in zip(score_set.names, table.tolist())
    }


def new_stats(keys):
    """Empty accumulator of sums and top-k counts."""
    stats = {"sum": 0.0, "numel": 0}
    stats.update(dict.fromkeys(keys, 0))
    return stats


def finish(stats, keys, top_counts, **label):
    """Turns counts into means and shares, with ``label`` fields first."""
    out = dict(label)
    out["sum"] = stats["sum"]
    out["numel"] = stats["numel"]
    out["mean"] = stats["sum"] / stats["numel"] if stats["numel"] else 0.0
    for key in keys:
        out[key] = stats[key] / top_counts[key] if top_counts[key] else 0.0
    return out
