"""Training settings reach the run: the per-step LR schedule from the first optimizer
step, sized for any epoch counter ``Brain.fit`` accepts."""

import math

import pytest
from helpers import make_brain

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.schedules import WarmupDecaySchedule


def expected_lr(step, base, warmup, total):
    """The schedule's formula written out: linear warmup from step 1, then cosine to 0."""
    if step <= warmup:
        return base * step / warmup
    progress = (step - warmup) / (total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


class LRRecordingBrain(SpeechLLMBrain):
    """Records the learning rate each optimizer step actually uses."""

    def optimizers_step(self):
        self.used_lrs.append([group["lr"] for group in self.optimizer.param_groups])
        super().optimizers_step()


def test_every_optimizer_step_uses_the_formulas_lr_from_step_one(
    tokenizer, prompt, manifests, tmp_path
):
    base, warmup_fraction = 1e-3, 0.25
    brain = make_brain("layerwise_lr", tokenizer, prompt, tmp_path, lr=base, counter_limit=2)
    brain.__class__ = LRRecordingBrain
    brain.used_lrs = []
    brain.lr_schedule = WarmupDecaySchedule(base, warmup_fraction=warmup_fraction)
    dataset = make_qa_dataset(manifests["speech"], prompt)  # 12 items
    brain.fit(
        brain.hparams.epoch_counter,
        dataset,
        dataset,
        train_loader_kwargs={"batch_size": 3},
        valid_loader_kwargs={"batch_size": 6},
    )
    total, warmup = 8, 2  # 4 batches x 2 epochs; 25% warmup
    assert brain.lr_schedule.total_steps == total
    assert len(brain.used_lrs) == total
    scales = [group["lr_scale"] for group in brain.optimizer.param_groups]
    assert len(set(scales)) > 1  # layer-wise groups keep their own scales
    for step, lrs in enumerate(brain.used_lrs, 1):
        for lr, scale in zip(lrs, scales):
            assert lr == pytest.approx(expected_lr(step, base, warmup, total) * scale), step


def test_fit_takes_any_iterable_epoch_counter_as_sb_brain_fit_does(
    tokenizer, prompt, manifests, tmp_path
):
    brain = make_brain("frozen_llm", tokenizer, prompt, tmp_path)
    brain.lr_schedule = WarmupDecaySchedule(1e-3, warmup_fraction=0.25)
    dataset = make_qa_dataset(manifests["speech"], prompt)  # 12 items
    brain.fit(range(1, 3), dataset, train_loader_kwargs={"batch_size": 4})
    assert brain.lr_schedule.total_steps == 6  # 3 batches x 2 epochs
    assert brain.optimizer_step == 6
