"""OpenMP waiting chosen from how busy the CPU is, before torch loads.

torch's OpenMP threads spin while they wait for work. On a quiet machine that
is fastest; beside another CPU-bound process on a small machine the spinning
threads steal its cores and each other's. Measured on a 2-core CPU
(``benchmarks/openmp_spin.py``, 15 training steps of the study's LM, wall
time relative to torch's default):

==========================  =====  ===================
setting                     quiet  1 competing process
==========================  =====  ===================
default (libgomp spins)     x1.00  x1.00 (3.7x quiet)
GOMP_SPINCOUNT=10000        x0.96  x1.45
GOMP_SPINCOUNT=1000         x1.18  x0.64
OMP_WAIT_POLICY=PASSIVE     x1.58  x0.55
1 thread                    x1.60  x0.48
==========================  =====  ===================

No setting wins both, so the choice is made at start-up: when other
processes already keep at least half a CPU busy, OpenMP threads wait
passively; on a quiet machine torch's default is kept. Any of
``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``OMP_NUM_THREADS`` set by the
user wins. ``speechbrain_sllm/__init__.py`` runs this first, so importing the
package before torch (as every entry point does) is enough.

Authors
 * speechbrain-sllm developers 2026
"""

import os
import sys
import time

USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
BUSY_CPUS = 0.5


def busy_cpus(seconds=0.1):
    """CPUs kept busy by all processes over ``seconds`` (from ``/proc/stat``), or None.

    Arguments
    ---------
    seconds : float
        Sampling window.

    Returns
    -------
    float or None
        None where ``/proc/stat`` is not available.

    Example
    -------
    >>> busy = busy_cpus(0.01)
    >>> busy is None or busy >= 0.0
    True
    """

    def snapshot():
        """Total and idle CPU time so far (the first line of /proc/stat)."""
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total_before, idle_before = snapshot()
        time.sleep(seconds)
        total_after, idle_after = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_after - total_before
    if elapsed <= 0:
        return None
    cpus = os.cpu_count() or 1
    return cpus * (1.0 - (idle_after - idle_before) / elapsed)


def choose_openmp_waiting(environ=None, busy=None):
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` when the CPU is already busy (see the module).

    Does nothing once torch is loaded (OpenMP read its settings then) or when
    the user set any OpenMP variable.

    Arguments
    ---------
    environ : dict or None
        Environment to update (``os.environ`` by default).
    busy : float or None
        Busy CPUs (measured when None).

    Returns
    -------
    str
        What was decided, for the log.

    Example
    -------
    >>> choose_openmp_waiting(environ={}, busy=1.0)
    'OMP_WAIT_POLICY=PASSIVE (1.0 CPUs busy before start)'
    >>> choose_openmp_waiting(environ={"OMP_NUM_THREADS": "1"}, busy=1.0)
    'left to the user (OMP_NUM_THREADS)'
    """
    environ = os.environ if environ is None else environ
    user = [key for key in USER_KEYS if key in environ]
    if user:
        return f"left to the user ({', '.join(user)})"
    if environ is os.environ and "torch" in sys.modules:
        return "unchanged (torch was imported first)"
    busy = busy_cpus() if busy is None else busy
    if busy is not None and busy >= BUSY_CPUS:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"OMP_WAIT_POLICY=PASSIVE ({busy:.1f} CPUs busy before start)"
    return "torch default (quiet machine)"
