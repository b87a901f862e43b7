"""Mitigations beyond the paper: each changes what it should and nothing else."""

import pytest
import torch
from conftest import llama_config, tiny_speech_llm
from helpers import fixed_batch, make_brain

from speechbrain_sllm.evaluation import qa_forward
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
