"""Stage-1 alignment by distillation: the frozen LLM given speech learns to answer as it
does given text (binned top-k KL, teacher cached per item)."""

import pytest
import torch
from helpers import fixed_batch, llm_state, make_brain

from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.distillation import (
    DistillationBrain,
    TeacherCache,
    answer_logits,
    binned_kl,
    distillation_loss,
    teacher_bins,
)
from speechbrain_sllm.evaluation import qa_forward


def full_kl(teacher_logits, student_logits):
    """KL(teacher || student) summed over positions, written out over the whole vocabulary."""
    p = torch.softmax(teacher_logits.double(), dim=-1)
    log_q = torch.log_softmax(student_logits.double(), dim=-1)
    return (p * (p.log() - log_q)).sum()


def test_binned_kl_covering_the_vocabulary_equals_the_written_out_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 12), torch.randn(5, 12)
    indices, bins = teacher_bins(teacher, k=12)
    assert binned_kl(student, indices, bins).item() == pytest.approx(
        full_kl(teacher, student).item(), rel=1e-5
    )


def test_binned_kl_with_top_k_counts_the_rest_of_the_vocabulary_as_one_bin():
    torch.manual_seed(1)
    teacher, student = torch.randn(4, 10), torch.randn(4, 10)
    indices, bins = teacher_bins(teacher, k=3)
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    expected = 0.0
    for row in range(4):
        top = indices[row].tolist()
        rest = [token for token in range(10) if token not in top]
        p_bins = torch.cat([p[row, top], p[row, rest].sum(0, keepdim=True)])
        q_bins = torch.cat([q[row, top], q[row, rest].sum(0, keepdim=True)])
        expected += (p_bins * (p_bins.log() - q_bins.log())).sum().item()
    assert binned_kl(student, indices, bins).item() == pytest.approx(expected, rel=1e-5)
    # a student that moves mass off the teacher's top-k pays for it
    worse = student.clone()
    worse.scatter_(1, indices, -10.0)
    assert binned_kl(worse, indices, bins) > binned_kl(teacher, indices, bins)


def test_loss_and_gradient_are_zero_when_student_and_teacher_inputs_coincide(
    tokenizer, prompt, manifests, tmp_path
):
    brain = make_brain("full_ft", tokenizer, prompt, tmp_path)  # the LLM takes gradients
    batch = fixed_batch(manifests["speech"], prompt, size=4)
    model = brain.modules.model
    with torch.no_grad():
        logits, labels = qa_forward(model, batch, "text", prompt)
    cache = TeacherCache(k=8)
    cache.store(list(batch.id), answer_logits(logits, labels))
    student, labels = qa_forward(model, batch, "text", prompt)  # the same input
    loss = distillation_loss(student, labels, list(batch.id), cache)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.abs().max().item() < 1e-5 for g in grads)
    speech, labels = qa_forward(model, batch, "speech", prompt)  # another input
    assert distillation_loss(speech, labels, list(batch.id), cache).item() > 1e-3


def distillation_brain(tokenizer, prompt, tmp_path, k=8):
    brain = make_brain("frozen_llm", tokenizer, prompt, tmp_path, lr=3e-3, counter_limit=3)
    brain.__class__ = DistillationBrain
    brain.hparams.teacher_cache = TeacherCache(k=k)
    return brain


def test_cached_teacher_equals_a_recomputed_text_pass(tokenizer, prompt, manifests, tmp_path):
    brain = distillation_brain(tokenizer, prompt, tmp_path)
    batch = fixed_batch(manifests["speech"], prompt, size=4)
    brain.compute_forward(batch, stage=None)
    cache = brain.hparams.teacher_cache
    assert len(cache) == 4
    with torch.no_grad():
        logits, labels = qa_forward(brain.modules.model, batch, "text", prompt)
    for item, item_logits in zip(batch.id, answer_logits(logits, labels)):
        indices, bins = teacher_bins(item_logits, 8)
        cached_indices, cached_bins = cache[item]
        assert torch.equal(cached_indices, indices)
        assert torch.allclose(cached_bins, bins, atol=1e-6)


def test_distillation_trains_the_adaptor_and_leaves_the_llm_unchanged(
    tokenizer, prompt, manifests, tmp_path
):
    brain = distillation_brain(tokenizer, prompt, tmp_path)
    model = brain.modules.model
    before, adaptor = (
        llm_state(model),
        {n: p.detach().clone() for n, p in model.adaptor.named_parameters()},
    )
    dataset = make_qa_dataset(manifests["speech"], prompt)  # 12 items
    batch = fixed_batch(manifests["speech"], prompt, size=12)
    with torch.no_grad():
        first = brain.compute_objectives(brain.compute_forward(batch, None), batch, None)
    brain.fit(range(1, 4), dataset, train_loader_kwargs={"batch_size": 4, "shuffle": False})
    with torch.no_grad():
        last = brain.compute_objectives(brain.compute_forward(batch, None), batch, None)
    assert last.item() < first.item()
    after = llm_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any(not torch.equal(p, adaptor[n]) for n, p in model.adaptor.named_parameters())
