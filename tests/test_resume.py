"""Exact resume after SIGKILL, atomic checkpoints, and non-finite losses."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import fixed_batch, make_brain

from speechbrain_sllm.checkpointing import AtomicCheckpointer, TrainableState

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_job.py")


def run_job(*args):
    return subprocess.run([sys.executable, JOB, *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("strategy", ["full_ft", "layerwise_lr", "lora"])
def test_killed_run_resumes_to_the_same_weights_and_optimizer_bitwise(
    strategy, tokenizer, manifests, tmp_path
):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    common = (tokenizer.model_path, manifests["speech"])
    assert run_job(strategy, straight, *common).returncode == 0
    died = run_job(strategy, killed, *common, 9)  # epoch 2, mid-epoch (6 steps per epoch)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert not (killed / "final.pt").exists()
    resumed = run_job(strategy, killed, *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(killed / "final.pt", weights_only=True)
    assert_same_final_state(a, b)


def assert_same_final_state(a, b):
    assert a["model"].keys() == b["model"].keys() and a["model"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"].keys() == b["optimizer"].keys() and a["optimizer"]
    for key, state in a["optimizer"].items():
        for field, value in state.items():
            assert torch.equal(value, b["optimizer"][key][field]), (key, field)


def run_torchrun_job(*args, processes=2):
    import socket

    with socket.socket() as probe:  # a free port for this run's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--master_port={port}", JOB, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_process_run_killed_mid_epoch_resumes_like_an_uninterrupted_one(
    distributed, tokenizer, manifests, tmp_path
):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    common = (tokenizer.model_path, manifests["speech"])
    done = run_torchrun_job("full_ft", straight, *common, "none", distributed)
    assert done.returncode == 0, done.stderr[-3000:]
    died = run_torchrun_job("full_ft", killed, *common, 5, distributed)  # epoch 2 of 3 steps each
    assert died.returncode != 0 and not (killed / "final.pt").exists(), died.stderr[-3000:]
    checkpoints = [p for p in os.listdir(killed / "save") if p.startswith("CKPT")]
    assert checkpoints, "no checkpoint before the kill"
    if distributed == "fsdp":  # sharded: one DCP folder written by both ranks
        entry = killed / "save" / checkpoints[0] / "model.ckpt"
        assert entry.is_dir() and len(list(entry.glob("*.distcp"))) == 2
    resumed = run_torchrun_job("full_ft", killed, *common, "none", distributed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final_state(
        torch.load(straight / "final.pt", weights_only=True),
        torch.load(killed / "final.pt", weights_only=True),
    )


def test_the_mitigations_train_under_torchrun_and_resume_like_an_uninterrupted_run(
    tokenizer, manifests, tmp_path
):
    """Two gloo processes (DDP), all three mitigations in one run (each adds its own term
    and state): the ranks stay identical with the extra forwards, and a run killed
    mid-epoch resumes to the uninterrupted run's weights and optimizer state, bit for bit
    (replay's batch order, the teacher and the anchor's base restored)."""
    name = "full_ft+replay+text_kd+anchor"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    common = (tokenizer.model_path, manifests["speech"])
    done = run_torchrun_job(name, straight, *common, "none", "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    died = run_torchrun_job(name, killed, *common, 5, "ddp")
    assert died.returncode != 0 and not (killed / "final.pt").exists(), died.stderr[-3000:]
    resumed = run_torchrun_job(name, killed, *common, "none", "ddp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    started = {line for line in resumed.stderr.splitlines() if line.startswith("starting after")}
    assert len(started) == 1 and started != {"starting after optimizer step 0"}, (
        started
    )  # both ranks
    first = torch.load(straight / "final.pt", weights_only=True)
    second = torch.load(killed / "final.pt", weights_only=True)
    assert first["ranks_agree"] and second["ranks_agree"]
    assert_same_final_state(first, second)


def test_checkpoint_interrupted_while_saving_leaves_the_previous_one_loadable(tmp_path):
    net = torch.nn.Linear(3, 3)
    ckpt = AtomicCheckpointer(str(tmp_path), {"net": net})
    first = ckpt.save_checkpoint(name="first")
    saved = net.weight.detach().clone()

    class Exploding(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise KeyboardInterrupt("killed while saving")

    ckpt.add_recoverable("late", Exploding())
    with torch.no_grad():
        net.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(name="second")
    del ckpt.recoverables["late"]
    assert [c.path for c in ckpt.list_checkpoints()] == [first.path]
    assert ckpt.recover_if_possible().path == first.path
    assert torch.equal(net.weight, saved)


def test_non_finite_losses_skip_steps_then_stop_with_a_clear_error(
    tokenizer, prompt, manifests, tmp_path
):
    brain = make_brain("full_ft", tokenizer, prompt, tmp_path, nonfinite_patience=2)
    brain.init_optimizers()
    batch = fixed_batch(manifests["speech"], prompt)
    state = TrainableState(brain.modules.model)
    before = {k: v.clone() for k, v in state.state_dict().items()}
    brain.compute_objectives = lambda *args: torch.tensor(float("nan"), requires_grad=True)
    brain.nonfinite_count = 0
    for _ in range(2):
        brain.fit_batch(batch)
    assert brain.skipped_steps == 2
    after = state.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was corrupted
    with pytest.raises(FloatingPointError, match="exceed nonfinite_patience=2"):
        brain.fit_batch(batch)


WRITE_FAILURE_JOB = """
import resource, signal, sys, torch
from speechbrain_sllm.checkpointing import AtomicCheckpointer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
folder = sys.argv[1]
small = torch.nn.Linear(4, 4)
ckpt = AtomicCheckpointer(folder, {"net": small})
ckpt.save_checkpoint(name="first")
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
ckpt.add_recoverable("big", torch.nn.Linear(1000, 1000))  # 4 MB: cannot be written
ckpt.save_checkpoint(name="second")
"""


def test_a_failed_checkpoint_write_names_the_folder_and_fix_and_keeps_the_previous_one(
    tmp_path,
):
    folder = tmp_path / "save"
    (folder / ".staging-CKPT+killed").mkdir(parents=True)  # left by a save killed earlier
    result = subprocess.run(
        [sys.executable, "-c", WRITE_FAILURE_JOB, str(folder)], capture_output=True, text=True
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "CheckpointWriteError" in message and str(folder) in message, message
    assert "GiB free" in message and "Free disk space" in message and "untouched" in message
    assert sorted(os.listdir(folder)) == ["CKPT+first"]  # no staging folder left, old one kept
    net = torch.nn.Linear(4, 4)
    assert AtomicCheckpointer(str(folder), {"net": net}).recover_if_possible() is not None


def test_fsdp_checkpoint_of_two_ranks_resumes_on_one(tokenizer, manifests, tmp_path):
    common = (tokenizer.model_path, manifests["speech"])
    died = run_torchrun_job("full_ft", tmp_path, *common, 5, "fsdp")
    assert died.returncode != 0 and not (tmp_path / "final.pt").exists()
    resumed = run_torchrun_job("full_ft", tmp_path, *common, "none", "fsdp", processes=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "random states of 2 ranks, running on 1" in resumed.stderr
    started = [line for line in resumed.stderr.splitlines() if line.startswith("starting after")]
    assert len(started) == 1 and started[0] != "starting after optimizer step 0", started
    assert (tmp_path / "final.pt").is_file()


@pytest.mark.parametrize("failing", ["owner record", "collective state"])
def test_a_checkpoint_write_failing_at_any_file_leaves_no_staging_folder(
    failing, tmp_path, monkeypatch
):
    """Disk full while the staging folder's first file or a collective state (the random
    generators of every rank) is written: the error names the folder, nothing is left."""
    import errno

    from speechbrain_sllm import checkpointing

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = tmp_path / "save"
    ckpt = checkpointing.AtomicCheckpointer(
        str(folder), {"net": torch.nn.Linear(4, 4), "rng": checkpointing.RNGState()}
    )
    ckpt.save_checkpoint(name="first")
    if failing == "owner record":
        monkeypatch.setattr(checkpointing.json, "dump", no_space)
    else:
        monkeypatch.setattr(checkpointing.RNGState, "collective_save", no_space)
    with pytest.raises(checkpointing.CheckpointWriteError, match="No space left"):
        ckpt.save_checkpoint(name="second")
    assert sorted(os.listdir(folder)) == ["CKPT+first"]
