"""The embedded study runs end to end from its tests/recipes/MiniSpokenQA.csv row
(the CSV row's smaller knowledge base), passes the row's checks, and its outputs are sane."""

import json
import os
import sys

import pytest
from conftest import ROOT
from helpers import accuracy_from_tsv
from test_recipes import ROWS, check_files, check_performance, run_row

from speechbrain_sllm.importance.shift import layer_shift
from speechbrain_sllm.study.report import layer_sums

# the row: 12 entities x 4 relations x 3 templates written; the unseen voice speaks
# the 2 training templates of each fact
ITEMS = {"t2t": 144, "s2t": 96}

STRATEGIES = ("full_ft", "layerwise_lr", "lora", "frozen_llm")
MITIGATIONS = ("full_ft+replay", "full_ft+text_kd", "full_ft+anchor")
ROW = next(r for r in ROWS if r["Dataset"] == "MiniSpokenQA")
INTERPOLATION = "--finetune={epochs: 5, interpolation_alphas: [0.0, 1.0]}"


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One run of the row with every strategy, the mitigations and weight interpolation."""
    out = tmp_path_factory.mktemp("quick") / "study"
    strategies = f"--stages=[base,{','.join(STRATEGIES + MITIGATIONS)}]"
    result = run_row(ROW, out, extra_flags=[INTERPOLATION, strategies])
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_quick_study_produces_the_table_profiles_and_plots(quick_study):
    out, result = quick_study
    row = ROW
    assert not check_files(row["test_debug_checks"], out)
    assert check_performance(row["test_debug_checks"], out) is None
    results = json.loads((out / "results.json").read_text())
    base, runs = results["base"], results["strategies"]
    assert base["t2t"] >= 80.0  # the pretrained LM knows its facts
    assert list(runs) == [*STRATEGIES, *MITIGATIONS]
    base_profile = json.loads((out / "importance" / "base" / "profile.json").read_text())
    for name, run in runs.items():
        # each accuracy is the share of its per-item answers that match their references
        for column in ("t2t", "s2t"):
            accuracy, items = accuracy_from_tsv(out / "finetune" / name / f"{column}.tsv")
            assert run[column] == pytest.approx(accuracy) and items == ITEMS[column], name
        # the shift is the one between the two written profiles
        profile = json.loads((out / "importance" / name / "profile.json").read_text())
        expected = layer_shift(layer_sums(base_profile), layer_sums(profile))
        assert run["shift"]["js"] == pytest.approx(expected["js"]), name
    # weight interpolation: alpha 0 is the base LLM (text scores equal, item by item),
    # alpha 1 the fine-tuned one (every score equal)
    for name, run in runs.items():
        at_base, at_end = run["interpolation"]["0.0"], run["interpolation"]["1.0"]
        assert at_base["t2t"] == base["t2t"], name
        assert at_base["text_ppl"] == pytest.approx(base["text_ppl"], rel=1e-6), name
        for column in ("t2t", "s2t", "text_ppl"):
            assert at_end[column] == pytest.approx(run[column], rel=1e-6), (name, column)
    for column in ("t2t", "s2t"):
        alpha_0 = out / "finetune" / "full_ft" / "alpha_0.0" / f"{column}.tsv"
        assert accuracy_from_tsv(alpha_0)[1] == ITEMS[column]
    # a frozen LLM cannot lose text ability, and its importance does not move
    assert runs["frozen_llm"]["t2t"] == base["t2t"]
    assert runs["frozen_llm"]["text_ppl"] == pytest.approx(base["text_ppl"], rel=1e-6)
    assert runs["full_ft"]["text_ppl"] != pytest.approx(base["text_ppl"], rel=1e-6)
    assert runs["frozen_llm"]["shift"]["js"] < 1e-9 and runs["frozen_llm"]["top3_iou"] == 1.0
    # the paper's sanity check: zeroing the top 3% hurts more than random, random more than bottom
    zeroing = base["zeroing"]
    assert zeroing["top"] > zeroing["random"] >= zeroing["bottom"]

    # rows / columns of the top 3%: a frozen LLM's are the base LLM's, exactly
    def structure(name):
        return json.loads((out / "importance" / name / "structure.json").read_text())

    assert structure("frozen_llm") == structure("base")
    assert structure("full_ft") != structure("base")
    # speech importance was scored after fine-tuning, and compared with the textual one
    for name in STRATEGIES:
        overlap = json.loads((out / "importance" / name / "speech" / "overlap.json").read_text())
        assert set(overlap) == {"top3_iou", "layer_spearman"}, name
        assert (out / "importance" / name / "speech" / "profile.json").is_file()
    plots = ("layer_importance.png", "layer_top3_share.png", "base_module_heatmap.png")
    for plot in (*plots, "row_column_concentration.png"):
        assert (out / "plots" / plot).stat().st_size > 10_000
    assert "| Method | T2T acc % | S2T acc %" in (out / "results.md").read_text()
    assert "Results:" in result.stdout


def test_a_second_run_on_the_same_prepared_data_gives_identical_results(quick_study, tmp_path):
    """Everything after data preparation is deterministic for a seed and thread count, and a
    strategy's results do not depend on the others run beside it (each is seeded afresh).

    (eSpeak NG itself is not: the same sentence synthesised twice differs by a few
    samples, so the check shares one prepared data folder.)"""
    first, second = quick_study[0], tmp_path / "second"
    flags = [f"--data_folder={first / 'data'}", INTERPOLATION, "--stages=[base,full_ft]"]
    result = run_row(ROW, second, flags)
    assert result.returncode == 0, result.stderr[-4000:]
    before = json.loads((first / "results.json").read_text())
    after = json.loads((second / "results.json").read_text())
    assert after["base"] == before["base"]
    assert after["strategies"] == {"full_ft": before["strategies"]["full_ft"]}
    for column in ("t2t.tsv", "s2t.tsv"):
        path = os.path.join("finetune", "full_ft", column)
        assert (first / path).read_bytes() == (second / path).read_bytes()


def test_quick_study_runs_each_mitigation_beside_full_ft(quick_study):
    """Text replay, text self-distillation and the importance anchor, each added to full FT
    by name: each trains (its own log and scores), and each changes the trained LLM."""
    out = quick_study[0]
    names = ["full_ft", *MITIGATIONS]
    runs = json.loads((out / "results.json").read_text())["strategies"]
    for name in names:
        accuracy, items = accuracy_from_tsv(out / "finetune" / name / "t2t.tsv")
        assert runs[name]["t2t"] == pytest.approx(accuracy) and items == ITEMS["t2t"], name
        assert "train loss" in (out / "finetune" / name / "train_log.txt").read_text()
    for name in names[1:]:  # the same seed and data: only the mitigation differs
        assert runs[name]["text_ppl"] != pytest.approx(runs["full_ft"]["text_ppl"], rel=1e-6)


def test_seed_table_gives_mean_and_range_per_method_and_draws_the_picture(tmp_path):
    """Two synthetic runs: each cell is the written-out mean (min-max); a method missing
    from one run is left out; interpolated weights get their own rows."""
    sys.path.insert(0, os.path.join(ROOT, "recipes", "MiniSpokenQA", "SpokenQA"))
    from seed_table import goal_seeds, plot_t2t_vs_s2t, plotted_methods, seed_table

    def run(t2t, s2t, extra):
        strategy = {"t2t": t2t, "s2t": s2t, "text_ppl": 1.5, "shift": {"js": 0.1}, "top3_iou": 0.5}
        strategy["interpolation"] = {"0.5": {"t2t": t2t + 10, "s2t": s2t - 10, "text_ppl": 1.2}}
        runs = {"full_ft": strategy, "lora": dict(strategy, interpolation={}), **extra}
        return {"base": {"t2t": 100.0, "text_ppl": 1.0}, "strategies": runs}

    replay = {"full_ft+replay": {"t2t": 90.0, "s2t": 50.0, "text_ppl": 1.1}}
    runs = [run(50.0, 60.0, replay), run(70.0, 40.0, {})]
    table = seed_table(runs)
    assert "| full FT | 60.0 (50.0-70.0) | 50.0 (40.0-60.0) | 1.500 (1.500-1.500) |" in table
    assert "| full FT, weights at alpha 0.5 | 70.0 (60.0-80.0) | 40.0 (30.0-50.0) |" in table
    assert "replay" not in table  # only in one of the two runs
    assert list(plotted_methods(runs)) == ["full FT", "LoRA (r 8, alpha 16)"]
    # the goal, per seed: T2T >= that seed's layer-wise LR, S2T >= that seed's full FT
    for index, (t2t, s2t) in enumerate([(80.0, 45.0), (90.0, 70.0)]):
        runs[index]["strategies"]["layerwise_lr"] = {"t2t": t2t, "s2t": s2t, "text_ppl": 1.3}
    runs[0]["strategies"]["lora"] = dict(runs[0]["strategies"]["lora"], t2t=80.0, s2t=60.0)
    runs[1]["strategies"]["lora"] = dict(runs[1]["strategies"]["lora"], t2t=95.0, s2t=39.0)
    assert goal_seeds(runs) == {"LoRA (r 8, alpha 16)": 1, "full FT, weights at alpha 0.5": 0}
    plot_t2t_vs_s2t(runs, str(tmp_path / "t2t_vs_s2t.png"), "a 2-core CPU")
    assert (tmp_path / "t2t_vs_s2t.png").read_bytes()[:4] == b"\x89PNG"


def test_real_model_picture_merges_runs_and_keeps_the_last_value(tmp_path):
    """Two runs from one stage 1: a strategy in both takes the later run's scores; the
    base LLM's T2T, stage 1 and the cascade are placed at the base T2T."""
    sys.path.insert(0, os.path.join(ROOT, "recipes", "WebQuestions", "SpokenQA", "speechllm"))
    from t2t_vs_s2t import merged_points, plot

    def run(strategies):
        base = {"llamaq_t2t": 30.0, "cascade": {"llamaq_s2t": 29.5}}
        return {"base": base, "stage1": {"llamaq_s2t": 28.0}, "strategies": strategies}

    first = run(
        {
            "full_ft": {"llamaq_s2t": 24.0, "llamaq_t2t": 31.0},
            "lora": {"llamaq_s2t": 0.5, "llamaq_t2t": 31.5},
        }
    )
    second = run({"lora": {"llamaq_s2t": 20.0, "llamaq_t2t": 30.5}})
    base_t2t, points = merged_points([first, second])
    assert base_t2t == 30.0
    assert points == {
        "cascade (Whisper decoder -> base LLM)": (29.5, 30.0),
        "stage 1 (LLM frozen)": (28.0, 30.0),
        "full FT": (24.0, 31.0),
        "LoRA": (20.0, 30.5),
    }
    plot(base_t2t, points, str(tmp_path / "points.png"), "a 2-core CPU")
    assert (tmp_path / "points.png").read_bytes()[:4] == b"\x89PNG"


def test_a_stage_list_is_checked_before_any_stage_runs():
    """A name missing from ``stage_choices`` and a fine-tuning stage listed before the base
    stage are refused, naming the fix; the yaml's order is kept."""
    from speechbrain_sllm.study import BaseStage, FinetuneSettings, FinetuneStage
    from speechbrain_sllm.study.protocol import check_stage_list

    choices = {"base": BaseStage(), "lora": FinetuneStage("lora", 2e-4, FinetuneSettings())}
    with pytest.raises(ValueError, match=r"\['full'\] not in the yaml's `stage_choices`"):
        check_stage_list(["base", "full"], choices)
    with pytest.raises(
        ValueError, match=r"list the base stage before it \(e.g. --stages=\[base,lora\]"
    ):
        check_stage_list(["lora", "base"], choices)
    assert [name for name, _ in check_stage_list(["base", "lora"], choices)] == ["base", "lora"]
