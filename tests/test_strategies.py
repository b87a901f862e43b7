import pytest
import torch
from conftest import llama_config
from helpers import fixed_batch, llm_state, make_brain, write_profile

from speechbrain_sllm.model.speech_llm import load_causal_lm
from speechbrain_sllm.strategies import (
    STRATEGIES,
    LayerwiseLR,
    LoRASettings,
    apply_lora,
    build_strategy,
    load_layer_importance,
)


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_reduces_loss_on_a_fixed_batch(name, tokenizer, prompt, manifests, tmp_path):
    brain = make_brain(name, tokenizer, prompt, tmp_path, lr=2e-2)
    brain.init_optimizers()
    batch = fixed_batch(manifests["speech"], prompt)
    brain.modules.eval()  # no dropout: the loss on the batch is a deterministic function
    with torch.no_grad():
        before = brain.compute_objectives(brain.compute_forward(batch, None), batch, None).item()
    for _ in range(10):
        brain.fit_batch(batch)
    with torch.no_grad():
        after = brain.compute_objectives(brain.compute_forward(batch, None), batch, None).item()
    assert after < 0.8 * before


def test_importance_rule_sets_group_lrs(tokenizer, prompt, tmp_path):
    brain = make_brain("layerwise_lr", tokenizer, prompt, tmp_path, lr=1e-3)
    brain.init_optimizers()
    lrs = {g["name"]: g["lr"] for g in brain.optimizer.param_groups}
    # profile importance [1, 2, 3]: scales 1.0, 0.8, 0.6
    assert lrs["llm.layer.000"] == pytest.approx(1e-3)
    assert lrs["llm.layer.001"] == pytest.approx(0.8e-3)
    assert lrs["llm.layer.002"] == pytest.approx(0.6e-3)
    assert lrs["llm.other"] == pytest.approx(1e-3)
    assert lrs["adaptor"] == pytest.approx(1e-3)


def test_depth_rule_decays_towards_the_input():
    rule = LayerwiseLR(rule="depth", decay=0.5)
    assert rule.scales(3) == [0.25, 0.5, 1.0]
    assert rule.non_layer(3) == 0.125


def test_lora_layerwise_applies_scales_to_adapters(tokenizer, prompt, tmp_path):
    brain = make_brain("lora_layerwise_lr", tokenizer, prompt, tmp_path, lr=1e-3)
    brain.init_optimizers()
    for group in brain.optimizer.param_groups:
        if group["name"].startswith("llm.layer"):
            assert all(p.ndim == 2 for p in group["params"])  # only LoRA A/B matrices
    lrs = {g["name"]: g["lr"] for g in brain.optimizer.param_groups}
    assert lrs["llm.layer.002"] == pytest.approx(0.6e-3)


def test_lora_optimizer_groups_hold_the_adapters_adaptor_and_encoder(tokenizer, prompt, tmp_path):
    brain = make_brain("lora", tokenizer, prompt, tmp_path)
    model = brain.model
    ours = sum(p.numel() for name, p in model.llm.named_parameters() if "lora_" in name)
    assert ours == sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    brain.init_optimizers()
    grouped = sum(p.numel() for g in brain.optimizer.param_groups for p in g["params"])
    adaptor_and_encoder = sum(
        p.numel() for m in (model.adaptor, model.encoder) for p in m.parameters()
    )
    assert grouped == ours + adaptor_and_encoder


@pytest.mark.parametrize("name", ["lora", "frozen_llm"])
def test_frozen_parameters_do_not_change(name, tokenizer, prompt, manifests, tmp_path):
    brain = make_brain(name, tokenizer, prompt, tmp_path)
    brain.init_optimizers()
    frozen = {
        n: p.detach().clone() for n, p in brain.model.llm.named_parameters() if not p.requires_grad
    }
    batch = fixed_batch(manifests["speech"], prompt)
    for _ in range(3):
        brain.fit_batch(batch)
    now = dict(brain.model.llm.named_parameters())
    assert frozen and all(torch.equal(now[n], v) for n, v in frozen.items())


def test_full_ft_changes_every_llm_layer(tokenizer, prompt, manifests, tmp_path):
    brain = make_brain("full_ft", tokenizer, prompt, tmp_path)
    brain.init_optimizers()
    before = llm_state(brain.model)
    brain.fit_batch(fixed_batch(manifests["speech"], prompt))
    after = llm_state(brain.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".layers.0." in n for n in changed) and any(".layers.2." in n for n in changed)


def test_gradient_clipping_covers_all_parameter_groups(tokenizer, prompt, manifests, tmp_path):
    brain = make_brain("layerwise_lr", tokenizer, prompt, tmp_path, max_grad_norm=1e-3)
    brain.init_optimizers()
    seen = {}
    step = brain.optimizer.step

    def capture(*args, **kwargs):
        grads = [
            p.grad for g in brain.optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        seen["norm"] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])
        )
        seen["groups"] = len(brain.optimizer.param_groups)
        return step(*args, **kwargs)

    brain.optimizer.step = capture
    brain.fit_batch(fixed_batch(manifests["speech"], prompt))
    assert seen["groups"] > 3
    assert seen["norm"] <= 1e-3 * 1.01


def test_unknown_strategy_and_missing_settings_are_rejected():
    with pytest.raises(ValueError, match="Unknown strategy 'fullft'"):
        build_strategy("fullft")
    with pytest.raises(ValueError, match="needs LoRA settings"):
        build_strategy("lora")


def test_lora_target_that_matches_nothing_names_the_available_modules():
    llm = load_causal_lm(config=llama_config())
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear module.*q_proj"):
        apply_lora(llm, LoRASettings(rank=2, target_modules=["q_proj", "qkv"]))


def test_profile_with_wrong_layer_count_is_rejected(tmp_path):
    path = write_profile(tmp_path / "p.json", [1.0, 2.0])
    with pytest.raises(ValueError, match="has 2 layers but the LLM has 3"):
        load_layer_importance(path, 3)
    with pytest.raises(FileNotFoundError, match="run the importance stage"):
        load_layer_importance(str(tmp_path / "missing.json"), 3)


@pytest.mark.parametrize("adaptor_lr", [None, 2e-5])
def test_study_adaptor_lr_sets_the_adaptor_rate_of_every_strategy(adaptor_lr):
    from conftest import tiny_speech_llm

    from speechbrain_sllm.strategies import apply_strategy, param_groups
    from speechbrain_sllm.study import FinetuneSettings, FinetuneStage

    settings = FinetuneSettings(lora=LoRASettings(rank=4), adaptor_lr=adaptor_lr)
    stage = FinetuneStage("lora", 2e-4, settings)
    strategy = stage.strategy_object()
    model = tiny_speech_llm(llama_config(vocab_size=64), seed=0)
    apply_strategy(model, strategy)
    rates = {g["name"]: g["lr"] for g in param_groups(model, strategy, stage.lr)}
    assert rates["llm"] == pytest.approx(2e-4)  # LoRA's own rate
    assert rates["adaptor"] == pytest.approx(adaptor_lr or 2e-4)
