"""The embedded study runs end to end from its tests/recipes/MiniSpokenQA.csv row
(the CSV row's smaller knowledge base), passes the row's checks, and its outputs are sane."""

import json
import os
import sys

import pytest
import torch
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
        # each stage's scores, written beside it when it ended, are the table's
        assert json.loads((out / "finetune" / name / "results.json").read_text()) == run, name
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
    flags = [f"--manifest_folder={first / 'data'}", INTERPOLATION, "--stages=[base,full_ft]"]
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


def test_seed_table_gives_each_seeds_exact_mcnemar_test_against_the_base(tmp_path):
    """Per-item T2T answers beside each results.json: lost/gained counted per seed, the
    exact two-sided p (6 lost, 0 gained: 2 / 2**6) and the seeds in their given order."""
    sys.path.insert(0, os.path.join(ROOT, "recipes", "MiniSpokenQA", "SpokenQA"))
    from seed_table import paired_t2t_lines

    def write(path, correct):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"q{i}\t{int(c)}\tanswer\n" for i, c in enumerate(correct)))

    folders, runs = [], []
    for seed, after in [(1, [False] * 6 + [True] * 4), (2, [True] * 9 + [False])]:
        folder = tmp_path / str(seed)
        write(folder / "base" / "t2t.tsv", [True] * 10)
        write(folder / "finetune" / "full_ft_text_arm" / "t2t.tsv", after)
        folders.append(str(folder))
        runs.append({"strategies": {"full_ft_text_arm": {}}})
    assert paired_t2t_lines(folders, runs) == [
        "* full FT, text arm (written questions, no audio): 6/0 (p 0.031), 1/0 (p 1)"
    ]


def test_seed_table_gives_the_importance_shift_between_the_two_arms(tmp_path):
    """Each seed's layer profiles of the speech arm and the text arm: equal profiles are
    0 bits apart, profiles on disjoint layers 1 bit; the cell is mean (min-max)."""
    sys.path.insert(0, os.path.join(ROOT, "recipes", "MiniSpokenQA", "SpokenQA"))
    from seed_table import arm_shift_line

    folders = []
    for seed, (speech, text) in enumerate([([1.0, 3.0], [2.0, 6.0]), ([1.0, 0.0], [0.0, 1.0])]):
        for name, sums in (("full_ft", speech), ("full_ft_text_arm", text)):
            folder = tmp_path / str(seed) / "importance" / name
            folder.mkdir(parents=True)
            profile = {"layers": [{"sum": value} for value in sums]}
            (folder / "profile.json").write_text(json.dumps(profile))
        folders.append(str(tmp_path / str(seed)))
    line = arm_shift_line(folders)
    assert line == "importance JS full_ft vs full_ft_text_arm (bits): 0.5000 (0.0000-1.0000)"


def test_real_model_picture_merges_runs_and_keeps_the_last_value(tmp_path):
    """Two runs from one stage 1: a strategy in both takes the later run's scores; the
    base LLM's T2T, stage 1 and the cascade are placed at the base T2T."""
    sys.path.insert(0, os.path.join(ROOT, "recipes", "WebQuestions", "SpokenQA", "speechllm"))
    from t2t_vs_s2t import merged_points, plot

    def run(strategies):
        base = {"llamaq_t2t": 30.0, "cascade": {"llamaq_s2t": 29.5}}
        return {"base": base, "align": {"llamaq_s2t": 28.0}, "strategies": strategies}

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


def tiny_study(manifests, prompt, tokenizer, tmp_path, importance=None, llm_seed=0):
    """A ``StudyRunner`` on the tiny speech LLM and one spoken QA set, base stage run."""
    from conftest import llama_config, tiny_speech_llm

    from speechbrain_sllm.data.dataio import make_qa_dataset
    from speechbrain_sllm.evaluation import EvaluationSettings
    from speechbrain_sllm.study import (
        BaseStage,
        ImportanceSettings,
        StudyData,
        StudyModels,
        StudyRunner,
    )

    hparams = {"output_folder": str(tmp_path), "seed": 0, "prompt": prompt}
    hparams.update(tokenizer=tokenizer, qa_dataset=make_qa_dataset, max_grad_norm=5.0)
    importance = importance or ImportanceSettings(batch_size=4)
    settings = importance, EvaluationSettings(max_new_tokens=4, batch_size=4)
    runner = StudyRunner(hparams, {"device": "cpu"}, *settings)
    spoken = make_qa_dataset(manifests["speech"], prompt)
    runner.use_data(
        StudyData({"": {"text": spoken, "speech": spoken}}, spoken, spoken, spoken, spoken)
    )
    config = llama_config(vocab_size=len(tokenizer))
    llm = lambda: tiny_speech_llm(config, seed=llm_seed).llm  # noqa: E731
    runner.use_models(StudyModels(llm, lambda: tiny_speech_llm(config)))
    BaseStage().run(runner, "base")
    return runner


def shared_settings(epochs=1):
    """What the tiny study's fine-tuning stages share."""
    import functools

    import torch

    from speechbrain_sllm.study import FinetuneSettings

    return FinetuneSettings(
        epochs=epochs, batch_size=4, opt_class=functools.partial(torch.optim.AdamW)
    )


def test_the_text_arm_feeds_no_audio_and_trains_what_the_speech_arm_trains(
    manifests, prompt, tokenizer, tmp_path, monkeypatch
):
    """A fine-tuning stage with ``input_mode: text`` trains on the written questions: the
    encoder never runs while it trains; its trainable parameters and their rates are the
    speech arm's; both arms are scored on both sides."""
    from speechbrain_sllm.brains import SpeechLLMBrain
    from speechbrain_sllm.study import FinetuneStage

    runner = tiny_study(manifests, prompt, tokenizer, tmp_path)
    encoder_calls, trained = {}, {}
    fit = SpeechLLMBrain.fit

    def watched_fit(brain, *args, **kwargs):
        mode, model = brain.hparams.input_mode, brain.modules.model
        calls = encoder_calls.setdefault(mode, [])
        hook = model.encoder.register_forward_hook(lambda *_: calls.append(1))
        try:
            return fit(brain, *args, **kwargs)
        finally:
            hook.remove()
            groups = brain.optimizer.param_groups
            trained[mode] = [
                (g["name"], g["lr"], [tuple(p.shape) for p in g["params"]]) for g in groups
            ]

    monkeypatch.setattr(SpeechLLMBrain, "fit", watched_fit)
    shared = shared_settings()
    for mode in ("text", "speech"):
        FinetuneStage("full_ft", 1e-3, shared, input_mode=mode).run(runner, f"full_ft_{mode}")
        scores = runner.results["strategies"][f"full_ft_{mode}"]
        assert {"t2t", "s2t", "text_ppl", "shift"} <= set(scores), mode
    assert not encoder_calls["text"] and encoder_calls["speech"]
    assert trained["text"] == trained["speech"]
    assert [name for name, _, _ in trained["text"]] == ["adaptor", "llm"]
    with pytest.raises(ValueError, match="input_mode 'audio' unknown"):
        FinetuneStage("full_ft", 1e-3, shared, input_mode="audio")


def test_a_stage_that_keeps_the_adaptor_leaves_it_bit_identical(
    manifests, prompt, tokenizer, tmp_path, monkeypatch
):
    """``train_adaptor: False``: the adaptor's tensors after training equal those before,
    bit for bit, while the LLM trains; frozen_llm with nothing else to train is refused."""
    from speechbrain_sllm.brains import SpeechLLMBrain
    from speechbrain_sllm.study import FinetuneStage

    runner = tiny_study(manifests, prompt, tokenizer, tmp_path)
    states = {}
    fit = SpeechLLMBrain.fit

    def state(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def watched_fit(brain, *args, **kwargs):
        states["before"] = state(brain.modules.model)
        result = fit(brain, *args, **kwargs)
        states["after"] = state(brain.modules.model)
        return result

    monkeypatch.setattr(SpeechLLMBrain, "fit", watched_fit)
    FinetuneStage("full_ft", 1e-2, shared_settings(), train_adaptor=False).run(runner, "kept")
    before, after = states["before"], states["after"]
    adaptor = [n for n in before if n.startswith("adaptor.")]
    assert adaptor and all(torch.equal(before[n], after[n]) for n in adaptor)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("llm."))
    with pytest.raises(ValueError, match="trains nothing"):
        FinetuneStage("frozen_llm", 1e-3, shared_settings(), train_adaptor=False).strategy_object()


def test_an_export_of_a_stage_that_kept_the_adaptor_carries_it(recipe_fixtures, tmp_path):
    """The inference export of a ``train_adaptor: False`` stage loads the adaptor it kept."""
    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import HFTokenizer
    from speechbrain_sllm.evaluation import EvaluationSettings
    from speechbrain_sllm.inference import SpeechLLMInference
    from speechbrain_sllm.model.adaptors import FrameStackAdaptor
    from speechbrain_sllm.model.encoders import HFWhisperEncoder
    from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
    from speechbrain_sllm.model_export import export_stage
    from speechbrain_sllm.strategies import apply_strategy, build_strategy

    llm_source = os.path.join(recipe_fixtures, "tiny_llm")
    encoder_source = os.path.join(recipe_fixtures, "tiny_whisper")
    torch.manual_seed(0)
    llm = load_causal_lm(llm_source, dtype="float32")
    adaptor = FrameStackAdaptor(16, llm.config.hidden_size, stack=2, hidden_size=16)
    model = SpeechLLM(llm, HFWhisperEncoder(source=encoder_source), adaptor)
    strategy = build_strategy("full_ft", train_adaptor=False)
    apply_strategy(model, strategy)
    hparams = {"llm_source": llm_source, "encoder_source": encoder_source, "sample_rate": 16000}
    hparams.update(prompt=ChatPrompt(HFTokenizer(llm_source)), evaluation=EvaluationSettings())
    folder = export_stage(model, strategy, str(tmp_path), hparams)
    assert not any(p.requires_grad for p in adaptor.parameters())  # left as it was
    loaded = SpeechLLMInference.from_hparams(source=folder).mods.model.adaptor
    for name, tensor in adaptor.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("change", ["importance", "llm"])
def test_the_base_stage_is_reused_only_when_its_inputs_match(
    change, manifests, prompt, tokenizer, tmp_path, monkeypatch, caplog
):
    """A rerun with the same base LLM, text sets and settings reuses the base stage's
    results and scores (nothing scored again); another setting or other weights score again,
    and the log names what changed."""
    from speechbrain_sllm.study import ImportanceSettings, StudyRunner

    first = tiny_study(manifests, prompt, tokenizer, tmp_path)
    scored = []
    importance = StudyRunner.importance

    def counted(runner, *args, **kwargs):
        scored.append(1)
        return importance(runner, *args, **kwargs)

    monkeypatch.setattr(StudyRunner, "importance", counted)
    again = tiny_study(manifests, prompt, tokenizer, tmp_path)
    assert not scored and again.results["base"] == first.results["base"]
    assert again.base_profile == json.loads(json.dumps(first.base_profile))
    assert all(torch.equal(again.base_scores[n], t) for n, t in first.base_scores.items())
    other = {"importance": {"importance": ImportanceSettings(batch_size=4, fraction=0.5)}}
    tiny_study(manifests, prompt, tokenizer, tmp_path, **other.get(change, {"llm_seed": 1}))
    assert scored and f"was made with another {change}" in caplog.text


def test_a_renamed_targets_value_is_refused_naming_the_new_one():
    """`targets: self_distilled` became `base_answers`: the old value names the new one
    before any answer is generated; an unknown one lists the choices."""
    from speechbrain_sllm.study.alignment import training_targets

    with pytest.raises(ValueError, match="'self_distilled' is now 'base_answers'"):
        training_targets(None, {}, None, "self_distilled", 8)
    with pytest.raises(ValueError, match=r"unknown; use one of \('gold', 'base_answers'\)"):
        training_targets(None, {}, None, "teacher", 8)
    assert training_targets(None, {"train": "a.csv"}, None, "gold", 8) == {"train": "a.csv"}
