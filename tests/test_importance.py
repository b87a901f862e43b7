import os

import pytest
import torch
from helpers import make_brain

from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.importance.aggregate import ScoreSet, aggregate, topk_threshold
from speechbrain_sllm.importance.estimators import ImportanceAccumulator
from speechbrain_sllm.importance.shift import layer_shift, topk_overlap
from speechbrain_sllm.importance.stage import accumulate_importance, run_importance
from speechbrain_sllm.model.speech_llm import shifted_lm_loss
from speechbrain_sllm.strategies import LayerwiseLR, importance_scales


def text_brain(tokenizer, prompt, folder, dtype=torch.float64):
    brain = make_brain("frozen_llm", tokenizer, prompt, folder, mode="text")
    brain.modules.to(dtype)
    return brain


def total_text_loss(brain, dataset):
    from speechbrain.dataio.dataloader import make_dataloader

    total = 0.0
    for batch in make_dataloader(dataset, batch_size=4):
        logits, labels = brain.evaluator().forward(batch, "text")
        total = total + shifted_lm_loss(logits, labels, "sum")
    return total


def test_taylor_equals_brute_force_first_order_loss_change(tokenizer, prompt, manifests, tmp_path):
    brain = text_brain(tokenizer, prompt, tmp_path)
    dataset = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    acc = accumulate_importance(
        brain.evaluator(for_gradients=True), dataset, "taylor", mode="text", batch_size=4
    )
    brain.model.eval()
    params = dict(brain.model.llm.named_parameters())
    generator = torch.Generator().manual_seed(0)
    checked = 0
    with torch.no_grad():
        for name in (
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
        ):
            param = params[name].view(-1)
            for index in torch.randint(param.numel(), (6,), generator=generator).tolist():
                h = 1e-2  # central difference along the zeroing direction: O(h^2) accurate
                original = param[index].item()
                param[index] = original * (1 - h)
                towards_zero = total_text_loss(brain, dataset).item()
                param[index] = original * (1 + h)
                away = total_text_loss(brain, dataset).item()
                param[index] = original
                change = (away - towards_zero) / (2 * h)  # first-order loss change of zeroing
                expected = abs(change)
                got = acc.score(f"llm.{name}").view(-1)[index].item()
                # HF RMSNorm computes in float32: the loss carries ~1e-7 relative noise
                assert got == pytest.approx(expected, rel=1e-2, abs=5e-3)
                checked += expected > 0.05
    assert checked >= 8  # enough sizeable scores for the comparison to mean something


def test_per_batch_estimators_match_manual_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    batches = [torch.randn(5, 4) for _ in range(3)]
    manual = []
    for x in batches:
        manual.append(torch.autograd.grad(layer(x).pow(2).sum(), layer.weight)[0])
    w = layer.weight.detach()
    g_sum = sum(manual)
    fisher = sum(g * g for g in manual)
    expected = {
        "taylor": (g_sum * w).abs(),
        "taylor_batch": sum((g * w).abs() for g in manual),
        "fisher": fisher,
        "second_order": (g_sum * w - 0.5 * w * fisher * w).abs(),
    }
    for estimator, reference in expected.items():
        acc = ImportanceAccumulator({"w": layer.weight}, estimator)
        for x in batches:
            layer(x).pow(2).sum().backward()
            acc.step()
        acc.detach()
        assert torch.allclose(acc.scores()["w"], reference, atol=1e-5), estimator
        assert layer.bias.grad is not None and layer.weight.grad is None
        layer.bias.grad = None


def test_reduced_precision_overflow_is_reported_not_returned():
    layer = torch.nn.Linear(2, 1, bias=False)
    acc = ImportanceAccumulator({"w": layer.weight}, "fisher", torch.float16)
    (layer(torch.full((1, 2), 1e4)) * 1e4).sum().backward()
    with pytest.raises(FloatingPointError, match="inf/nan"):
        acc.scores()


def text_importance(brain, dataset, folder, **kwargs):
    """The importance stage on written questions, batches of 4."""
    evaluator = brain.evaluator(for_gradients=True)
    return run_importance(evaluator, dataset, str(folder), mode="text", batch_size=4, **kwargs)


def test_aggregation_sums_match_the_total(tokenizer, prompt, manifests, tmp_path):
    brain = text_brain(tokenizer, prompt, tmp_path, torch.float32)
    dataset = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    profile, acc = text_importance(brain, dataset, tmp_path / "imp")
    total = sum(float(s.sum(dtype=torch.float64)) for s in acc.scores().values())
    layers = sum(layer["sum"] for layer in profile["layers"])
    assert layers + profile["non_layer"]["sum"] == pytest.approx(total, rel=1e-9)
    assert sum(m["sum"] for m in profile["modules"]) == pytest.approx(total, rel=1e-9)
    for key in ("top1", "top3", "top5"):
        shares = sum(layer[key] for layer in profile["layers"]) + profile["non_layer"][key]
        assert shares == pytest.approx(1.0)
    per_module = profile["layer_module_sum"]
    for i, layer in enumerate(profile["layers"]):
        assert sum(v[i] for v in per_module.values()) == pytest.approx(layer["sum"], rel=1e-9)
    assert {m["module"] for m in profile["modules"]} >= {
        "q_proj",
        "down_proj",
        "embeddings",
        "norms",
        "lm_head",
    }
    for name in ("profile.json", "layers.csv", "modules.csv"):
        assert os.path.isfile(tmp_path / "imp" / name)
    # the profile feeds the importance-guided LR rule
    rule = LayerwiseLR(rule="importance", lam=0.4, profile=str(tmp_path / "imp" / "profile.json"))
    assert rule.scales(3) == importance_scales([layer["sum"] for layer in profile["layers"]], 0.4)


def test_decoder_linear_scope_scores_only_decoder_projections(
    tokenizer, prompt, manifests, tmp_path
):
    brain = text_brain(tokenizer, prompt, tmp_path, torch.float32)
    brain.model.llm.lm_head.weight = brain.model.llm.model.embed_tokens.weight  # tied, as SmolLM2
    dataset = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    profile, acc = text_importance(brain, dataset, tmp_path / "imp", scope="decoder_linear")
    expected = {
        f"llm.{name}"
        for name, param in brain.model.llm.named_parameters()
        if ".layers." in name and name.endswith("proj.weight")
    }
    assert set(acc.params) == expected and len(expected) == 3 * 7
    assert profile["scope"] == "decoder_linear"
    assert profile["numel"] == sum(acc.params[name].numel() for name in expected)
    assert profile["non_layer"]["sum"] == 0
    with pytest.raises(ValueError, match="importance scope 'decoder' unknown"):
        run_importance(
            brain.evaluator(for_gradients=True),
            dataset,
            str(tmp_path / "x"),
            mode="text",
            scope="decoder",
        )


def test_topk_threshold_and_shares_are_exact_against_a_sort():
    torch.manual_seed(0)
    scores = {f"model.layers.{i}.mlp.up_proj.weight": torch.rand(50, 7) for i in range(4)}
    scores["model.layers.1.mlp.up_proj.weight"][0, :5] = 0.5  # ties
    score_set = ScoreSet.from_dict(scores)
    flat = torch.cat([s.view(-1) for s in scores.values()])
    for fraction in (0.01, 0.03, 0.05, 0.5):
        k = round(fraction * flat.numel())
        threshold, selected = topk_threshold(score_set, fraction)
        assert threshold == torch.topk(flat, k).values[-1].item()
        assert selected == int((flat >= threshold).sum())
        low, _ = topk_threshold(score_set, fraction, largest=False)
        assert low == torch.topk(flat, k, largest=False).values[-1].item()
    profile = aggregate(score_set, (3.0,))
    threshold = profile["thresholds"]["top3"]
    in_top = [int((s >= threshold).sum()) for s in scores.values()]
    assert [layer["top3"] for layer in profile["layers"]] == pytest.approx(
        [c / sum(in_top) for c in in_top]
    )


def test_shift_metrics_on_identical_and_hand_made_profiles():
    same = layer_shift([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])
    assert same["js"] == pytest.approx(0.0) and same["kl"] == pytest.approx(0.0)
    assert same["emd_layers"] == pytest.approx(0.0) and same["spearman"] == pytest.approx(1.0)
    assert same["peak_shift"] == 0 and same["total_ratio"] == pytest.approx(2.0)
    moved = layer_shift([0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0])
    assert moved["js"] == pytest.approx(1.0)
    assert moved["emd_layers"] == pytest.approx(3.0)
    assert moved["peak_shift"] == -3
    half = layer_shift([0.5, 0.5, 0.0], [0.0, 0.5, 0.5])
    assert half["emd_layers"] == pytest.approx(1.0)
    assert half["js"] == pytest.approx(0.5)
    a = ScoreSet.from_dict({"w": torch.arange(10.0)})
    assert topk_overlap(a, a, 0.3) == 1.0
    b = ScoreSet.from_dict({"w": torch.arange(10.0).flip(0)})
    assert topk_overlap(a, b, 0.3) == 0.0


def _ddp_worker(rank, world, init_file, manifest, spm_path, out):
    import speechbrain  # noqa: F401

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(spm_path)
    prompt = ChatPrompt(tokenizer)
    os.makedirs(os.path.join(out, f"rank{rank}"), exist_ok=True)
    brain = text_brain(tokenizer, prompt, os.path.join(out, f"rank{rank}"))
    dataset = make_qa_dataset(manifest, prompt, with_audio=False)
    acc = accumulate_importance(
        brain.evaluator(for_gradients=True), dataset, "taylor", mode="text", batch_size=2
    )
    if rank == 0:
        torch.save({n: acc.score(n) for n in acc.params}, os.path.join(out, "ddp.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_gloo_scores_equal_single_process(tokenizer, prompt, manifests, tmp_path):
    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), manifests["text"], tokenizer.model_path, str(tmp_path)),
        nprocs=2,
    )
    (tmp_path / "single").mkdir()
    brain = text_brain(tokenizer, prompt, tmp_path / "single")
    dataset = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    single = accumulate_importance(
        brain.evaluator(for_gradients=True), dataset, "taylor", mode="text", batch_size=2
    )
    assert single.num_backward == 6  # 12 written questions, batches of 2
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name in single.params:
        # float32 accumulators: equal up to summation order
        assert torch.allclose(ddp[name], single.score(name), rtol=1e-5, atol=1e-7), name


def test_speech_importance_equals_plain_torch_taylor_with_spoken_questions(
    tokenizer, prompt, manifests, tmp_path
):
    brain = make_brain("frozen_llm", tokenizer, prompt, tmp_path)
    dataset = make_qa_dataset(manifests["speech"], prompt).filtered_sorted(select_n=4)
    evaluator = brain.evaluator(for_gradients=True)
    acc = accumulate_importance(evaluator, dataset, "taylor", mode="speech", batch_size=1)

    # reference: the summed answer loss given each spoken question, |g * w| per parameter
    model, llm = brain.model, brain.model.llm
    model.eval()
    llm.zero_grad(set_to_none=True)
    llm.requires_grad_(True)
    prefix, suffix = prompt.speech_prompt()
    for item in dataset:
        wav = item["sig"][None]
        logits, labels = model(
            [prefix], [item["answer_ids"].tolist()], wav, torch.ones(1), [suffix]
        )
        shifted_lm_loss(logits, labels, "sum").backward()
    checked = 0
    for name, param in llm.named_parameters():
        expected = (param.grad * param).abs().detach()
        ours = acc.score(f"llm.{name}")
        difference = float((ours - expected).abs().max())
        assert difference <= 1e-5 * float(expected.abs().max()) + 1e-12, (name, difference)
        checked += 1
    llm.zero_grad(set_to_none=True)
    assert checked > 10 and sum(float(s.sum()) for s in acc.scores().values()) > 0


@pytest.mark.parametrize("largest", [True, False])
def test_the_gathered_threshold_is_the_bisections_with_ties(largest, monkeypatch):
    from speechbrain_sllm.importance import aggregate as module

    generator = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.rand(50, 40, generator=generator),
        "b": torch.randint(0, 5, (300,), generator=generator).float() / 4,  # many ties
        "c": torch.zeros(7),
    }
    score_set = ScoreSet.from_dict(scores)
    for fraction in (0.001, 0.03, 0.25, 0.5, 1.0):
        gathered = topk_threshold(score_set, fraction, largest)
        monkeypatch.setattr(module, "GATHERED_NUMEL", 0)  # the bisection
        assert topk_threshold(score_set, fraction, largest) == gathered, fraction
        monkeypatch.undo()


@pytest.mark.parametrize("largest", [True, False])
def test_the_sampled_pivot_finds_the_exact_kth_value(largest):
    from speechbrain_sllm.importance.aggregate import PIVOT_SAMPLE, kth_value

    generator = torch.Generator().manual_seed(1)
    flat = torch.rand(10 * PIVOT_SAMPLE, generator=generator) ** 6  # skewed, as scores are
    flat[:5000] = 0.25  # and tied
    ordered = flat.sort(descending=largest).values
    for k in (1, 7, 3000, len(flat) // 3, len(flat)):
        assert kth_value(flat, k, largest).item() == ordered[k - 1].item(), k
