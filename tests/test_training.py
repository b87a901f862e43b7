"""Training settings reach the run: SpeechBrain run options (default < yaml < command
line) and the per-step LR schedule from the first optimizer step."""

import math
import os
import shlex

import pytest
import speechbrain as sb
from conftest import ROOT
from helpers import make_brain
from hyperpyyaml import load_hyperpyyaml

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.checkpointing import WarmupDecaySchedule
from speechbrain_sllm.data.dataio import make_qa_dataset

RECIPE_YAML = "recipes/VoiceAssistant/SpokenQA/speechllm/hparams/whisper_llm.yaml"
MODEL_FLAGS = (
    "--data_folder=tests/fixtures/spokenqa --llm_source=tests/fixtures/tiny_llm "
    "--encoder_source=tests/fixtures/tiny_whisper --encoder_dim=16 --llm_dim=32"
)
# run option: (yaml value, command-line flag, command-line value)
RUN_OPTIONS = {
    "precision": ("bf16", "--precision=fp32", "fp32"),
    "max_grad_norm": (1.0, "--max_grad_norm=3.5", 3.5),
    "grad_accumulation_factor": (4, "--grad_accumulation_factor=2", 2),
    "ckpt_interval_minutes": (30, "--ckpt_interval_minutes=7", 7),
    "device": ("cpu", "--device=cpu", "cpu"),
}


def recipe_brain(flags, yaml_device=None):
    """The recipe's Brain, built as train.py builds it, from the yaml and ``flags``.

    The recipe yaml has no ``device`` key; ``yaml_device`` adds one.
    """
    argv = [os.path.join(ROOT, RECIPE_YAML), *shlex.split(MODEL_FLAGS), *flags]
    _, run_opts, overrides = sb.parse_arguments(argv)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with open(RECIPE_YAML) as handle:
            hparams = load_hyperpyyaml(handle, overrides)
    finally:
        os.chdir(cwd)
    if yaml_device is not None:
        hparams["device"] = yaml_device
    return SpeechLLMBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=None,
    )


def test_run_options_come_from_the_yaml_when_the_command_line_is_silent(recipe_fixtures):
    brain = recipe_brain([], yaml_device="cpu")
    for option, (yaml_value, _, _) in RUN_OPTIONS.items():
        assert getattr(brain, option) == yaml_value, option


@pytest.mark.parametrize("option", sorted(RUN_OPTIONS))
def test_a_run_option_on_the_command_line_wins_over_the_yaml(option, recipe_fixtures):
    _, flag, value = RUN_OPTIONS[option]
    brain = recipe_brain([flag], yaml_device="meta" if option == "device" else None)
    assert getattr(brain, option) == value


def test_ckpt_interval_steps_from_the_command_line_can_replace_the_yamls_minutes(
    recipe_fixtures,
):
    brain = recipe_brain(["--ckpt_interval_minutes=0", "--ckpt_interval_steps=50"])
    assert (brain.ckpt_interval_minutes, brain.ckpt_interval_steps) == (0, 50)


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
    brain.hparams.lr_schedule = WarmupDecaySchedule(base, warmup_fraction=warmup_fraction)
    dataset = make_qa_dataset(manifests["speech"], prompt)  # 12 items
    brain.fit(
        brain.hparams.epoch_counter,
        dataset,
        dataset,
        train_loader_kwargs={"batch_size": 3},
        valid_loader_kwargs={"batch_size": 6},
    )
    total, warmup = 8, 2  # 4 batches x 2 epochs; 25% warmup
    assert brain.hparams.lr_schedule.total_steps == total
    assert len(brain.used_lrs) == total
    scales = [group["lr_scale"] for group in brain.optimizer.param_groups]
    assert len(set(scales)) > 1  # layer-wise groups keep their own scales
    for step, lrs in enumerate(brain.used_lrs, 1):
        for lr, scale in zip(lrs, scales):
            assert lr == pytest.approx(expected_lr(step, base, warmup, total) * scale), step
