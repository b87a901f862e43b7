"""The embedded study runs end to end (--quick) and its outputs are sane."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "MiniSpokenQA", "SpokenQA")
STRATEGIES = ("full_ft", "layerwise_lr", "lora", "frozen_llm")


def test_quick_study_produces_the_table_profiles_and_plots(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(RECIPE, "run_study.py"),
            os.path.join(RECIPE, "hparams", "study.yaml"),
            "--quick",
            f"--output_folder={out}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    base, runs = results["base"], results["strategies"]
    assert base["t2t"] >= 80.0  # the pretrained LM knows its facts
    assert set(runs) == set(STRATEGIES)
    for name, run in runs.items():
        assert 0.0 <= run["t2t"] <= 100.0 and 0.0 <= run["s2t"] <= 100.0, name
        assert run["text_ppl"] >= 1.0
        assert 0.0 <= run["shift"]["js"] <= 1.0 and 0.0 <= run["top3_iou"] <= 1.0
        assert (out / "importance" / name / "profile.json").is_file()
    # a frozen LLM cannot lose text ability, and its importance does not move
    assert runs["frozen_llm"]["t2t"] == base["t2t"]
    assert runs["frozen_llm"]["shift"]["js"] < 1e-9 and runs["frozen_llm"]["top3_iou"] == 1.0
    # the paper's sanity check: zeroing the top 3% hurts more than random, random more than bottom
    zeroing = base["zeroing"]
    assert zeroing["top"] > zeroing["random"] >= zeroing["bottom"]
    for plot in ("layer_importance.png", "layer_top3_share.png", "base_module_heatmap.png"):
        assert (out / "plots" / plot).stat().st_size > 10_000
    assert "| Method | T2T acc % | S2T acc %" in (out / "results.md").read_text()
    assert "Results:" in result.stdout
