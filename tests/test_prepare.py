"""Data preparation is skipped when its inputs did not change and redone when they did."""

import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "recipes", "MiniSpokenQA", "SpokenQA"))
from minispokenqa_prepare import prepare_minispokenqa  # noqa: E402


def mtimes(paths):
    return {split: os.stat(path).st_mtime_ns for split, path in paths.items()}


def test_minispokenqa_prepare_is_skipped_with_the_same_inputs_and_redone_otherwise(tmp_path):
    folder = str(tmp_path / "data")
    first = mtimes(prepare_minispokenqa(folder, num_entities=2, seed=3))
    assert mtimes(prepare_minispokenqa(folder, num_entities=2, seed=3)) == first
    changed = mtimes(prepare_minispokenqa(folder, num_entities=3, seed=3))
    assert all(changed[split] > first[split] for split in first)
