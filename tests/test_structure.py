"""Row / column concentration of the top text-important parameters (the paper's
low-rank explanation of why LoRA keeps text ability)."""

import math

import pytest
import torch

from speechbrain_sllm.importance.structure import row_column_concentration


def test_planted_rows_give_the_written_out_shares():
    generator = torch.Generator().manual_seed(0)
    weight = torch.rand(200, 50, generator=generator)  # background in [0, 1)
    weight[7, :40] = 5.0 + torch.rand(40, generator=generator)  # 40 top entries in row 7
    weight[19, :20] = 5.0 + torch.rand(20, generator=generator)  # 20 in row 19
    other = torch.rand(30, 30, generator=generator)  # a second matrix: no top entry
    fraction = 60 / (200 * 50 + 30 * 30)  # exactly the 60 planted entries
    result = row_column_concentration({"w": weight, "v": other, "b": torch.rand(9)}, fraction)
    assert set(result) == {"w"}  # vectors and matrices without top entries are left out
    w = result["w"]
    assert w["count"] == 60
    # ceil(0.01 x 200) = 2 rows hold all 60; ceil(0.05 x 200) = 10 rows too
    assert w["rows"] == {0.01: 1.0, 0.05: 1.0}
    # columns 0-19 hold 2 each, 20-39 hold 1 each: ceil(0.01 x 50) = 1 column -> 2/60,
    # ceil(0.05 x 50) = 3 columns -> 6/60
    assert w["cols"][0.01] == pytest.approx(2 / 60) and w["cols"][0.05] == pytest.approx(6 / 60)
    # the permuted baseline spreads the 60 entries over rows: far below 1
    assert w["rows_baseline"][0.05] < 0.5


def test_ties_at_the_threshold_count_as_top():
    weight = torch.zeros(10, 10)
    weight[0, :3] = 2.0
    weight[1, :4] = 1.0  # the threshold value, tied four times
    result = row_column_concentration({"w": weight}, fraction=0.05)  # k = 5: 3 + 4 tied
    assert result["w"]["count"] == 7
    assert result["w"]["rows"][0.05] == pytest.approx(4 / 7)  # ceil(0.5) = 1 row, the fuller


def test_random_scores_give_shares_equal_to_their_permuted_baseline():
    generator = torch.Generator().manual_seed(1)
    scores = {f"layer{i}": torch.rand(400, 300, generator=generator) for i in range(3)}
    result = row_column_concentration(scores, fraction=0.03, seed=5)
    for name, entry in result.items():
        n = entry["count"]
        for axis, lines in (("rows", 400), ("cols", 300)):
            for q, share in entry[axis].items():
                baseline = entry[f"{axis}_baseline"][q]
                # the share of the fullest ceil(q x lines) lines: binomial counts per
                # line; two independent draws differ by a few standard errors at most
                spread = math.sqrt(math.ceil(q * lines) * n / lines) / n
                assert abs(share - baseline) < 6 * spread + 1e-9, (name, axis, q)
                assert share >= q  # the fullest lines hold at least their share


def test_an_accumulator_is_taken_as_its_scores():
    class Accumulator:
        def scores(self):
            weight = torch.zeros(4, 4)
            weight[2, 2] = 1.0
            return {"w": weight}

    result = row_column_concentration(Accumulator(), fraction=1 / 16, seed=None)
    assert result == {
        "w": {"count": 1, "rows": {0.01: 1.0, 0.05: 1.0}, "cols": {0.01: 1.0, 0.05: 1.0}}
    }
