import pytest
import torch
from helpers import fixed_batch, make_brain

from speechbrain_sllm.schedules import WarmupDecaySchedule


def train_and_save(name, tokenizer, prompt, manifests, folder, steps=3):
    brain = make_brain(name, tokenizer, prompt, folder)
    brain.on_fit_start()  # optimizer + checkpoint registration (+ recovery when any)
    batch = fixed_batch(manifests["speech"], prompt)
    for _ in range(steps):
        brain.fit_batch(batch)
    brain.checkpointer.save_checkpoint()
    return brain, batch


def outputs(brain, batch):
    brain.modules.eval()
    with torch.no_grad():
        return brain.compute_forward(batch, None)[0]


@pytest.mark.parametrize("name", ["full_ft", "layerwise_lr", "lora", "lora_layerwise_lr"])
def test_save_then_load_reproduces_outputs_and_optimizer_exactly(
    name, tokenizer, prompt, manifests, tmp_path
):
    brain, batch = train_and_save(name, tokenizer, prompt, manifests, tmp_path)
    fresh = make_brain(name, tokenizer, prompt, tmp_path, seed=0)
    before = outputs(fresh, batch)
    fresh.on_fit_start()  # recovers the checkpoint
    assert not torch.equal(before, outputs(brain, batch))
    assert torch.equal(outputs(fresh, batch), outputs(brain, batch))
    for ours, theirs in zip(
        fresh.optimizer.state_dict()["state"].values(),
        brain.optimizer.state_dict()["state"].values(),
    ):
        assert torch.equal(ours["exp_avg"], theirs["exp_avg"])


def test_frozen_llm_checkpoint_holds_no_llm_tensor(tokenizer, prompt, manifests, tmp_path):
    brain, _ = train_and_save("frozen_llm", tokenizer, prompt, manifests, tmp_path)
    ckpt = brain.checkpointer.find_checkpoint()
    saved = torch.load(ckpt.paramfiles["model"], weights_only=True)
    assert saved and all(key.startswith(("adaptor.", "encoder.")) for key in saved)


def test_lora_checkpoint_holds_only_adapters_of_the_llm(tokenizer, prompt, manifests, tmp_path):
    brain, _ = train_and_save("lora", tokenizer, prompt, manifests, tmp_path)
    saved = torch.load(brain.checkpointer.find_checkpoint().paramfiles["model"], weights_only=True)
    llm_keys = [k for k in saved if k.startswith("llm.")]
    assert llm_keys and all("lora_" in k for k in llm_keys)


def test_checkpoint_of_another_strategy_is_rejected_clearly(tokenizer, prompt, manifests, tmp_path):
    train_and_save("lora", tokenizer, prompt, manifests, tmp_path)
    other = make_brain("full_ft", tokenizer, prompt, tmp_path)
    with pytest.raises(ValueError, match="does not match the model.*same strategy"):
        other.on_fit_start()


def test_schedule_warms_up_then_decays_and_resumes(tmp_path):
    opt = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 1.0}], lr=0.0
    )
    sched = WarmupDecaySchedule(1.0, warmup_steps=2, total_steps=6, decay="cosine")
    lrs = [sched(opt) for _ in range(6)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(0.0) and lrs[2] > lrs[3] > lrs[4]
    sched.save(tmp_path / "s.ckpt")
    again = WarmupDecaySchedule(1.0, warmup_steps=2, total_steps=6)
    again.load(tmp_path / "s.ckpt")
    assert again.step == 6


def test_rng_state_of_an_older_checkpoint_still_loads(tmp_path):
    """Before per-rank states, ``rng.ckpt`` held one dict: resuming such a run still works."""
    from speechbrain_sllm.checkpointing import RNGState

    path = str(tmp_path / "rng.ckpt")
    torch.save(RNGState.current(), path)
    expected = torch.rand(3)
    state = RNGState()
    state.load(path)
    state.apply_pending()
    assert torch.equal(torch.rand(3), expected)
