"""The few collectives the package issues under torchrun, in one place.

Every function here is a no-op (or the identity) outside ``torch.distributed``,
so single-process code calls them unconditionally. Each is a collective: under
torchrun every rank must call it, in the same order (tests/test_distributed.py
runs each of them in a 2-process gloo group).

Authors
 * speechbrain-sllm developers 2026
"""

import gc
import logging
import pathlib

import torch
from speechbrain.utils.distributed import ddp_broadcast

logger = logging.getLogger(__name__)


def is_distributed():
    """Whether a ``torch.distributed`` process group is initialised.

    Example
    -------
    >>> is_distributed()
    False
    """
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world():
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed.

    Example
    -------
    >>> rank_and_world()
    (0, 1)
    """
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rank_shard(indices):
    """This rank's items of ``indices``: ``indices[rank::world]`` (no padding, no repeat).

    Arguments
    ---------
    indices : list
        Items to split across ranks (every rank must pass the same list).

    Returns
    -------
    list

    Example
    -------
    >>> rank_shard([0, 1, 2, 3, 4])
    [0, 1, 2, 3, 4]
    """
    rank, world = rank_and_world()
    return list(indices)[rank::world]


def gather_in_order(local_items, local_positions):
    """Gathers every rank's items and returns them in global order on every rank.

    Arguments
    ---------
    local_items : list
        This rank's results (picklable).
    local_positions : list of int
        The global position of each of ``local_items``.

    Returns
    -------
    list
        All items, sorted by position, each position exactly once.

    Example
    -------
    >>> gather_in_order(["b", "a"], [1, 0])
    ['a', 'b']
    """
    pairs = list(zip(local_positions, local_items))
    if is_distributed():
        shards = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shards, pairs)
        pairs = [pair for shard in shards for pair in shard]
    positions = [position for position, _ in pairs]
    if len(set(positions)) != len(positions):
        raise RuntimeError("gather_in_order: two ranks returned the same item position.")
    return [item for _, item in sorted(pairs, key=lambda pair: pair[0])]


def all_reduce_sum(values, device="cpu"):
    """Sums a list of numbers over ranks (float64); returns the sums as floats.

    Arguments
    ---------
    values : list of float
        This rank's partial sums.
    device : str or torch.device
        Device of the reduction (``cuda`` under NCCL).

    Returns
    -------
    list of float

    Example
    -------
    >>> all_reduce_sum([1.5, 2.0])
    [1.5, 2.0]
    """
    if not is_distributed():
        return [float(value) for value in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value, device="cpu"):
    """The largest of each rank's ``value`` (an int).

    Example
    -------
    >>> all_reduce_max(3)
    3
    """
    if not is_distributed():
        return int(value)
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def close_process_group():
    """Waits for every rank, then closes the process group: the end of a torchrun script.

    PyTorch asks every process to destroy its group before it exits. A gloo rank
    that left without it (its work written, the main process still writing
    plots) aborted at exit in CI ("terminate called without an active
    exception": torch's known failure when a gloo thread outlives the
    interpreter; twice in CI's torchrun tests, not reproduced in 30 local runs,
    so this follows the documented end rather than a reproduced cause). Here
    every rank waits at a barrier for the others, so none finalizes while
    another still works, then destroys the group while Python is whole. Under
    FSDP gloo's threads outlive ``destroy``, idle (torch's DTensor caches keep
    the device mesh, which holds the group). Call it on every rank, on success
    only (a rank that failed never reaches the barrier). A no-op outside
    ``torch.distributed``.

    Example
    -------
    >>> close_process_group()
    >>> is_distributed()
    False
    """
    if not is_distributed():
        return
    world = torch.distributed.get_world_size()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    gc.collect()  # what only reference cycles kept: the group's last holders, if any
    logger.info(f"Closed the process group of {world} ranks.")


def share_debug_checkpoint_folder(checkpointer):
    """Makes every rank use the main process's temporary checkpoint folder.

    In ``--debug`` mode (without ``--debug_persistently``) SpeechBrain gives each
    process its own temporary checkpoint folder: checkpoint deletion then runs a
    collective on one rank only, and after ``fit`` each rank would restore a
    different "best" checkpoint. All ranks of one run must share one folder.

    Arguments
    ---------
    checkpointer : speechbrain.utils.checkpoints.Checkpointer or None
        The Brain's checkpointer (unchanged when it has no debug folder).
    """
    if checkpointer is None or not hasattr(checkpointer, "tempdir") or not is_distributed():
        return
    shared = ddp_broadcast(str(checkpointer.checkpoints_dir))
    checkpointer.checkpoints_dir = pathlib.Path(shared)


def unwrap(module):
    """The module inside a DDP / DataParallel wrapper, else ``module``."""
    return getattr(module, "module", module)
