"""Mitigations beyond the paper: each changes what it should and nothing else."""

import csv
import json

import pytest
import torch
from conftest import llama_config, tiny_speech_llm
from helpers import fixed_batch, make_brain

from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.evaluation import qa_forward
from speechbrain_sllm.mitigations import ImportanceAnchor, TextDistillation, TextReplay
from speechbrain_sllm.strategies import merge_lora
from speechbrain_sllm.strategies.interpolation import interpolated, llm_weights


def trained_model(name, tokenizer, prompt, manifests, tmp_path):
    """A tiny speech LLM after a few optimizer steps with strategy ``name`` (LoRA merged)."""
    brain = make_brain(name, tokenizer, prompt, tmp_path, lr=1e-2)
    model = brain.modules.model
    brain.init_optimizers()
    batch = fixed_batch(manifests["speech"], prompt, size=4)
    for _ in range(3):
        logits, labels = qa_forward(model, batch, "speech", prompt)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100
        )
        loss.backward()
        brain.optimizer.step()
        brain.optimizer.zero_grad()
    return merge_lora(model)


@pytest.mark.parametrize("name", ["full_ft", "lora"])
def test_interpolation_is_exact_at_both_ends_and_linear_between(
    name, tokenizer, prompt, manifests, tmp_path
):
    # make_brain's model before training: the same tiny LLM, the same seed
    base = llm_weights(tiny_speech_llm(llama_config(vocab_size=len(tokenizer)), seed=0))
    model = trained_model(name, tokenizer, prompt, manifests, tmp_path)
    finetuned = llm_weights(model)
    assert any(not torch.equal(finetuned[n], base[n]) for n in base)
    with interpolated(model, base, 0.0):
        assert all(torch.equal(p, base[n]) for n, p in model.llm.named_parameters())
    with interpolated(model, base, 1.0):
        assert all(torch.equal(p, finetuned[n]) for n, p in model.llm.named_parameters())
    with interpolated(model, base, 0.25):
        for n, p in model.llm.named_parameters():
            expected = base[n] + 0.25 * (finetuned[n] - base[n])
            assert torch.allclose(p, expected, atol=1e-6), n
    # restored on exit, also after an error inside the block
    with pytest.raises(RuntimeError):
        with interpolated(model, base, 0.5):
            raise RuntimeError("scoring failed")
    assert all(torch.equal(p, finetuned[n]) for n, p in model.llm.named_parameters())


def test_interpolation_names_unmerged_lora(tokenizer, prompt, tmp_path):
    brain = make_brain("lora", tokenizer, prompt, tmp_path)
    model = brain.modules.model
    base = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="merge LoRA first"):
        with interpolated(model, base, 0.5):
            pass


def anchored_brain(tokenizer, prompt, tmp_path, strength=0.5, seed=0):
    """A full-FT tiny Brain with an ImportanceAnchor on made-up scores of two matrices."""
    brain = make_brain("full_ft", tokenizer, prompt, tmp_path, seed=seed, counter_limit=2)
    params = dict(brain.model.named_parameters())
    names = ["llm.model.layers.0.self_attn.q_proj.weight", "llm.model.layers.1.mlp.up_proj.weight"]
    generator = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(params[n].shape, generator=generator) for n in names}
    brain.hparams.mitigations = [ImportanceAnchor(strength=strength, scores=scores)]
    return brain, scores


def test_importance_anchor_gradient_is_its_written_out_form_and_zero_at_the_base(
    tokenizer, prompt, tmp_path
):
    brain, scores = anchored_brain(tokenizer, prompt, tmp_path)
    anchor = brain.hparams.mitigations[0]
    anchor.on_fit_start(brain)
    model = brain.model
    assert anchor.penalty(model).item() == 0.0
    anchor.penalty(model).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    params = dict(model.named_parameters())
    base = {n: params[n].detach().clone() for n in scores}
    with torch.no_grad():
        for name in scores:
            params[name].add_(torch.randn_like(params[name]) * 0.1)
    model.zero_grad()
    anchor.penalty(model).backward()
    mean = sum(s.sum() for s in scores.values()) / sum(s.numel() for s in scores.values())
    for name, score in scores.items():
        expected = 2 * 0.5 * (score / mean) * (params[name].detach() - base[name])
        assert torch.allclose(params[name].grad, expected, atol=1e-6), name
    untouched = [p for n, p in params.items() if n not in scores and p.grad is not None]
    assert all(not p.grad.any() for p in untouched)  # only the scored weights are pulled


def test_importance_anchor_refuses_a_strategy_that_trains_no_scored_weight(
    tokenizer, prompt, tmp_path
):
    brain = make_brain("lora", tokenizer, prompt, tmp_path)
    scores = {"llm.model.layers.0.self_attn.q_proj.weight": torch.ones(1)}
    with pytest.raises(ValueError, match="use it with full_ft or layerwise_lr"):
        ImportanceAnchor(scores=scores).on_fit_start(brain)


def test_text_replay_batches_carry_text_only_and_add_their_loss(
    tokenizer, prompt, manifests, tmp_path
):
    brain = make_brain("full_ft", tokenizer, prompt, tmp_path)
    written = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    replay = TextReplay(dataset=written, batch_size=3, weight=0.7)
    replay.on_fit_start(brain)
    batch = replay.next_batch()
    assert not hasattr(batch, "sig") and len(batch.id) == 3
    with open(manifests["text"]) as handle:
        written_ids = {row["ID"] for row in csv.DictReader(handle)}
    assert set(batch.id) <= written_ids
    replay.batches = iter([batch])  # the loss of that very batch
    logits, labels = qa_forward(brain.modules.model, batch, "text", prompt)
    expected = 0.7 * torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100
    )
    assert replay.extra_loss(brain).item() == pytest.approx(expected.item(), rel=1e-5)


def test_text_distillation_is_zero_on_the_base_and_grows_as_the_llm_moves(
    tokenizer, prompt, manifests, tmp_path
):
    brain = make_brain("full_ft", tokenizer, prompt, tmp_path)
    written = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    kd = TextDistillation(dataset=written, batch_size=4, topk=8)
    kd.on_fit_start(brain)
    assert len(kd.cache) == len(written)
    assert abs(kd.extra_loss(brain).item()) < 1e-5
    with torch.no_grad():
        for p in brain.model.llm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert kd.extra_loss(brain).item() > 1e-3


def test_a_resumed_anchored_run_keeps_the_base_weights_as_its_anchor(
    tokenizer, prompt, manifests, tmp_path
):
    dataset = make_qa_dataset(manifests["speech"], prompt)
    loader = {"batch_size": 4}
    brain, _ = anchored_brain(tokenizer, prompt, tmp_path, strength=0.1)
    base = {n: b.clone() for n, (b, _) in ImportanceAnchorProbe.anchors_of(brain).items()}
    brain.hparams.epoch_counter.limit = 1
    brain.fit(brain.hparams.epoch_counter, dataset, dataset, train_loader_kwargs=loader,
              valid_loader_kwargs=loader)  # fmt: skip
    trained = dict(brain.model.named_parameters())
    assert any(not torch.equal(trained[n], base[n]) for n in base)
    resumed, _ = anchored_brain(tokenizer, prompt, tmp_path, strength=0.1)  # same folder
    resumed.hparams.epoch_counter.limit = 2
    resumed.fit(resumed.hparams.epoch_counter, dataset, dataset, train_loader_kwargs=loader,
                valid_loader_kwargs=loader)  # fmt: skip
    anchors = resumed.hparams.mitigations[0].anchors
    assert all(torch.equal(anchors[n][0], base[n]) for n in base)
    assert resumed.optimizer_step > 0


class ImportanceAnchorProbe:
    """The anchors a Brain's ImportanceAnchor takes at fit start, without training."""

    @staticmethod
    def anchors_of(brain):
        anchor = brain.hparams.mitigations[0]
        anchor.on_fit_start(brain)
        return anchor.anchors


def test_module_granular_rates_follow_the_rule_per_module_type(tmp_path):
    from speechbrain_sllm.strategies import LayerwiseLR, build_strategy, param_groups

    model = tiny_speech_llm(llama_config(vocab_size=64), seed=0)
    # per-layer sums [1, 2, 3] overall; each module type with its own order
    sums = {"q_proj": [3.0, 1.0, 2.0], "up_proj": [1.0, 1.0, 5.0], "down_proj": [2.0, 2.0, 2.0]}
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(
            {"layers": [{"layer": i, "sum": float(i + 1)} for i in range(3)],
             "layer_module_sum": sums}
        )
    )  # fmt: skip
    rule = LayerwiseLR(rule="importance", lam=0.4, profile=str(profile), granularity="module")
    strategy = build_strategy("layerwise_lr", layerwise_lr=rule)
    groups = {g["name"]: g for g in param_groups(model, strategy, 1e-3)}

    def written_out(values, layer):  # 1 - lam (I - min) / (max - min), within one module type
        low, high = min(values), max(values)
        return 1.0 if high == low else 1.0 - 0.4 * (values[layer] - low) / (high - low)

    for module, values in sums.items():
        for layer in range(3):
            group = groups[f"llm.layer.{layer:03d}.{module}"]
            assert group["lr"] == pytest.approx(1e-3 * written_out(values, layer)), group["name"]
            names = {id(p) for p in group["params"]}
            expected = [p for n, p in model.llm.named_parameters()
                        if f"layers.{layer}." in n and f".{module}." in n]  # fmt: skip
            assert names == {id(p) for p in expected}
    # the layer's other parameters (norms, k/v/o, gate) keep the per-layer rule: 1, 0.8, 0.6
    for layer, scale in enumerate([1.0, 0.8, 0.6]):
        assert groups[f"llm.layer.{layer:03d}"]["lr"] == pytest.approx(1e-3 * scale)
    with pytest.raises(ValueError, match="granularity 'module' needs rule 'importance'"):
        LayerwiseLR(rule="depth", granularity="module")


@pytest.mark.parametrize("mitigation", [TextReplay, TextDistillation])
def test_replay_from_the_spoken_training_set_leaves_its_audio_to_the_speech_batches(
    mitigation, tokenizer, prompt, manifests, tmp_path
):
    """The real-model study replays the written side of its spoken training set (one
    dataset): between replay batches the speech batches still get their audio."""
    brain = make_brain("full_ft", tokenizer, prompt, tmp_path)
    spoken = make_qa_dataset(manifests["speech"], prompt)
    replay = mitigation(dataset=spoken, batch_size=2)
    replay.on_fit_start(brain)
    for _ in range(2):
        assert not hasattr(replay.next_batch(), "sig")
        assert "sig" in spoken[0]
