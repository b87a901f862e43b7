"""One run per output folder: a live run's folder is refused to a second run, a dead
run's lock is taken over, and a live writer's checkpoint staging folder is never removed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from speechbrain_sllm.checkpointing import STAGING_OWNER, AtomicCheckpointer
from speechbrain_sllm.run_lock import LOCK_FILE, OutputFolderLocked, RunLock

HOLD_LOCK = """
import sys, time
from speechbrain_sllm.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def start_lock_holder(folder):
    """A separate live process that holds ``folder``'s lock (a run in progress)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    holder = start_lock_holder(tmp_path)
    try:
        with pytest.raises(
            OutputFolderLocked, match=rf"in use by another run \(PID {holder.pid} on"
        ):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no exit handler runs: the lock file stays
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING"):
        lock = RunLock(str(tmp_path)).acquire()
    assert f"taking over the lock of PID {holder.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", ACQUIRE_AND_EXIT, str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "held"
    assert not (tmp_path / LOCK_FILE).exists()


ACQUIRE_AND_EXIT = """
import os, sys
from speechbrain_sllm.run_lock import LOCK_FILE, RunLock
RunLock(sys.argv[1]).acquire()
print("held" if os.path.exists(os.path.join(sys.argv[1], LOCK_FILE)) else "not held")
"""


def test_a_pid_reused_by_another_process_does_not_keep_a_stale_lock(tmp_path):
    record = RunLock(str(tmp_path)).record()
    record["start_time"] = record["start_time"] + 12345  # same PID, another process start
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    RunLock(str(tmp_path)).acquire().release()


def test_stale_staging_cleanup_leaves_a_live_writers_staging_folder(tmp_path):
    holder = start_lock_holder(tmp_path / "other")
    try:
        live = tmp_path / "save" / ".staging-CKPT+live"
        dead = tmp_path / "save" / ".staging-CKPT+dead"
        for folder in (live, dead):
            folder.mkdir(parents=True)
        owner = json.loads((tmp_path / "other" / LOCK_FILE).read_text())
        (live / STAGING_OWNER).write_text(json.dumps(owner))
        (dead / STAGING_OWNER).write_text(json.dumps(dict(owner, pid=2**22 + 17)))
        ckpt = AtomicCheckpointer(str(tmp_path / "save"), {"net": torch.nn.Linear(2, 2)})
        saved = ckpt.save_checkpoint(name="mine")
    finally:
        holder.kill()
        holder.wait()
    names = sorted(os.listdir(tmp_path / "save"))
    assert names == [".staging-CKPT+live", saved.path.name]
    assert not (saved.path / STAGING_OWNER).exists()  # the marker never reaches a checkpoint


def test_a_second_recipe_run_on_a_live_folder_is_refused_and_changes_nothing(
    recipe_fixtures, tmp_path
):
    from test_recipes import ROWS, row_strategy, run_row

    row = next(r for r in ROWS if r["Dataset"] == "VoiceAssistant" and row_strategy(r) == "lora")
    out = tmp_path / "out"
    assert run_row(row, out, ["--debug_persistently"]).returncode == 0
    before = folder_snapshot(out)
    holder = start_lock_holder(out)  # the first run, still running
    try:
        started = time.time()
        second = run_row(row, out, ["--debug_persistently"])
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode != 0
    last = second.stderr.strip().splitlines()[-1]
    assert f"is in use by another run (PID {holder.pid} on host" in last, last
    assert "--output_folder" in last
    assert "Loading" not in second.stderr and time.time() - started < 60
    after = folder_snapshot(out)
    after.pop(LOCK_FILE)  # the holder's lock, left by its SIGKILL
    assert after == before  # results, checkpoints, logs and yaml untouched


def folder_snapshot(folder):
    """``{relative path: bytes}`` of every file under ``folder``."""
    snapshot = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                snapshot[os.path.relpath(path, folder)] = handle.read()
    return snapshot
