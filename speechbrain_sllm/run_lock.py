"""One run per output folder: a lock file held for the run, released at exit.

Two runs writing into one output folder interleave their logs, delete each
other's checkpoints (each keep-only pass) and staging folders, and can leave a
"best" checkpoint written by the other run. ``RunLock`` makes the second run
stop at start-up with the holder's PID and host. A lock left by a process that
no longer runs on this host (killed with SIGKILL, machine rebooted) is taken
over with a message.

Under torchrun the main process (global rank 0) holds the lock for the whole
job; the other ranks are part of the same run.

Authors
 * speechbrain-sllm developers 2026
"""

import atexit
import json
import logging
import os
import socket
import time

logger = logging.getLogger(__name__)
LOCK_FILE = ".run.lock"


class OutputFolderLocked(RuntimeError):
    """Another live run holds the output folder's lock."""


def process_start_time(pid):
    """The start time of process ``pid`` (clock ticks since boot), or None if it is not running.

    Telling a live holder from a dead one by PID alone fails when the PID was
    reused; the start time tells them apart (Linux ``/proc``; elsewhere only
    whether the PID exists).

    Arguments
    ---------
    pid : int
        Process id.

    Returns
    -------
    int or None
        The start time (0 where ``/proc`` is not available), None when no such process runs.

    Example
    -------
    >>> process_start_time(os.getpid()) is not None
    True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return 0


def holder_is_alive(holder):
    """Whether the process recorded in a lock still runs (always True for another host).

    Arguments
    ---------
    holder : dict
        The lock's record: ``pid``, ``host``, ``start_time``.

    Returns
    -------
    bool

    Example
    -------
    >>> holder_is_alive({"pid": os.getpid(), "host": socket.gethostname(),
    ...     "start_time": process_start_time(os.getpid())})
    True
    """
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here: assume it runs
    started = process_start_time(int(holder.get("pid", -1)))
    if started is None:
        return False
    recorded = holder.get("start_time")
    return not recorded or not started or started == recorded


class RunLock:
    """The lock of one output folder (``<folder>/.run.lock``), held by this process.

    Arguments
    ---------
    folder : str
        The run's output folder (created if missing).

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> lock = RunLock(folder).acquire()
    >>> RunLock(folder).acquire()
    Traceback (most recent call last):
    ...
    speechbrain_sllm.run_lock.OutputFolderLocked: ...
    >>> lock.release()
    >>> RunLock(folder).acquire().release()
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.held = False

    def record(self):
        """What the lock file says about its holder (this process)."""
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": process_start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def acquire(self):
        """Takes the lock, or raises ``OutputFolderLocked`` naming the live holder.

        Returns
        -------
        RunLock
            ``self``, held until ``release`` or the end of the process.
        """
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us or by a racing run: try again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self.clear_stale_lock()
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.record(), handle)
            self.held = True
            atexit.register(self.release)
            return self
        raise OutputFolderLocked(f"Could not take the lock {self.path}; rerun the command.")

    def holder(self):
        """The lock file's record, ``{}`` when it is unreadable (being written) or gone."""
        try:
            with open(self.path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def clear_stale_lock(self):
        """Removes the lock of a dead holder (with a message); raises for a live one."""
        holder = self.holder()
        if not holder:  # written this instant, or just removed: look again
            time.sleep(0.2)
            holder = self.holder()
            if not holder and os.path.exists(self.path):
                raise OutputFolderLocked(
                    f"{self.path} exists but cannot be read. If no other run uses "
                    f"{self.folder!r}, delete that file and rerun."
                )
        if not holder:
            return
        if holder_is_alive(holder):
            raise OutputFolderLocked(
                f"Output folder {self.folder!r} is in use by another run (PID "
                f"{holder.get('pid')} on host {holder.get('host')}, started "
                f"{holder.get('started')}). Wait for it to end, or give this run another "
                "--output_folder. Nothing in the folder was changed."
            )
        logger.warning(
            f"{self.path}: taking over the lock of PID {holder.get('pid')} on "
            f"{holder.get('host')} (started {holder.get('started')}), which no longer runs."
        )
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self):
        """Removes the lock file if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        if self.holder().get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def lock_output_folder(folder):
    """Locks ``folder`` for this run on the main process (global rank 0) only.

    Called before anything is written into the folder. Other torchrun ranks
    belong to the same run and return None.

    Arguments
    ---------
    folder : str
        The run's output folder.

    Returns
    -------
    RunLock or None
        The held lock (released at exit), None on other ranks.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return RunLock(folder).acquire()
