"""The global top-k threshold of importance scores: gathered k-th value against the bisection.

Scores shaped like SmolLM2-135M's decoder projection matrices (30 layers, 106 M
scores, skewed as importance scores are) in one process; the same thresholds by
both paths (asserted equal), their times and ratio.

> python benchmarks/topk_threshold.py

Authors
 * speechbrain-sllm developers 2026
"""

import platform
import time

import torch

from speechbrain_sllm.importance import aggregate
from speechbrain_sllm.importance.aggregate import ScoreSet, topk_threshold

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def smollm2_like_scores(layers=30, seed=0):
    """``{name: scores}`` of SmolLM2-135M's decoder matrices (random, heavy-tailed)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"layers.{layer}.{index}": torch.rand(shape, generator=generator) ** 8
        for layer in range(layers)
        for index, shape in enumerate(SHAPES)
    }


def timed(score_set, cases):
    """Thresholds of every ``(fraction, largest)`` case and the seconds they took."""
    start = time.perf_counter()
    results = [topk_threshold(score_set, fraction, largest) for fraction, largest in cases]
    return results, time.perf_counter() - start


def compare_paths(score_set, cases, label):
    """Times both paths on ``score_set``; prints the seconds and the ratio."""
    gathered, fast = timed(score_set, cases)
    limit, aggregate.GATHERED_NUMEL = aggregate.GATHERED_NUMEL, 0
    bisected, slow = timed(score_set, cases)
    aggregate.GATHERED_NUMEL = limit
    assert gathered == bisected, (gathered, bisected)
    print(f"{label}: bisection {slow:.2f} s, gathered k-th value {fast:.2f} s: x{slow / fast:.1f}")


def main():
    """Both paths on stored scores and on scores computed on demand from two tensors
    (``|g * w|``, as ``ImportanceAccumulator.score`` does)."""
    scores = smollm2_like_scores()
    cases = [(0.01, True), (0.03, True), (0.05, True), (0.03, False)]
    machine = platform.processor() or platform.machine()
    print(f"CPU: {machine}, torch threads {torch.get_num_threads()}")
    count = sum(s.numel() for s in scores.values())
    print(f"{count:,} scores; thresholds of the top 1/3/5% and bottom 3%, equal by both paths")
    compare_paths(ScoreSet.from_dict(scores), cases, "stored scores")
    weights = smollm2_like_scores(seed=1)
    on_demand = ScoreSet(scores, lambda name: (scores[name] * weights[name]).abs())
    compare_paths(on_demand, cases, "scores computed on demand")


if __name__ == "__main__":
    main()
