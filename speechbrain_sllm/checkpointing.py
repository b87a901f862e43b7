"""Compact checkpoints: only trainable tensors, and a per-group LR schedule.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import logging
import os
import random
import shutil

import numpy
import torch
from speechbrain.utils.checkpoints import (
    DEFAULT_SAVE_HOOKS,
    METAFNAME,
    PARAMFILE_EXT,
    Checkpoint,
    Checkpointer,
    get_default_hook,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import (
    MainProcessContext,
    ddp_barrier,
    ddp_broadcast,
    if_main_process,
)

from speechbrain_sllm.distributed import unwrap
from speechbrain_sllm.run_lock import RunLock, holder_is_alive

logger = logging.getLogger(__name__)
STAGING_OWNER = ".owner.json"  # in a staging folder: the process writing it


@register_checkpoint_hooks
class TrainableState:
    """Checkpoints the trainable tensors of a module (adaptor, LoRA, unfrozen LLM).

    A frozen LLM is never copied into a checkpoint: a LoRA run on an 8B model
    writes megabytes. The parameters saved are the ones with
    ``requires_grad=True`` when the checkpoint is written.

    Arguments
    ---------
    module : torch.nn.Module
        The model (e.g. ``SpeechLLM`` after ``apply_strategy``).

    Example
    -------
    >>> import tempfile, os
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> net[0].requires_grad_(False)  # doctest: +ELLIPSIS
    Linear(...)
    >>> state = TrainableState(net)
    >>> sorted(state.state_dict())
    ['1.bias', '1.weight']
    >>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
    >>> state.save(path)
    >>> state.load(path)
    """

    def __init__(self, module):
        self.module = module

    def state_dict(self):
        """Trainable parameters by name (detached, on their device)."""
        return {
            name: param.detach()
            for name, param in unwrap(self.module).named_parameters()
            if param.requires_grad
        }

    @mark_as_saver
    def save(self, path):
        """Writes the trainable tensors to ``path``."""
        torch.save(self.state_dict(), path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Loads tensors written by ``save`` (``weights_only=True``).

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain hook signature).
        """
        del end_of_epoch
        saved = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(unwrap(self.module).named_parameters())
        missing = sorted(set(self.state_dict()) - set(saved))
        unknown = sorted(set(saved) - set(params))
        if missing or unknown:
            raise ValueError(
                f"Checkpoint {path!r} does not match the model: missing {missing[:5]}, "
                f"unknown {unknown[:5]}. Resume with the same strategy and model settings "
                "that wrote it, or start a fresh output folder."
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                if params[name].shape != tensor.shape:
                    raise ValueError(
                        f"Checkpoint {path!r}: {name} has shape {tuple(tensor.shape)}, "
                        f"model expects {tuple(params[name].shape)}."
                    )
                params[name].copy_(tensor)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; says where, how much space is free, and what to do.

    Arguments
    ---------
    folder : str or pathlib.Path
        The checkpoint folder.
    error : Exception
        The underlying write failure.
    """

    def __init__(self, folder, error):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free"
        except OSError:
            free = "free space unknown"
        super().__init__(
            f"Could not write a checkpoint in {folder} ({free}): {error}. The previous "
            "checkpoint is untouched. Free disk space (or point `save_folder` / "
            "`output_folder` at a larger disk) and rerun the same command to resume."
        )


def staging_owner(staging):
    """The record of the process writing a staging folder (``{}`` if none or unreadable)."""
    try:
        with open(os.path.join(staging, STAGING_OWNER)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


class AtomicCheckpointer(Checkpointer):
    """A ``Checkpointer`` whose checkpoints appear whole or not at all.

    SpeechBrain writes ``CKPT.yaml`` first and the parameter files after it, so a
    process killed while saving leaves a directory that looks complete and
    cannot be loaded. Here every file is written into a hidden staging
    directory, ``CKPT.yaml`` last, and the directory is renamed into place
    (atomic on POSIX): the previous checkpoint stays the latest one until the
    new one is complete. Saving happens on the main process only.

    Arguments
    ---------
    checkpoints_dir : str
        Where checkpoints are kept.
    recoverables : dict or None
        Objects to save and load.
    **kwargs : dict
        Passed to ``Checkpointer``.

    Example
    -------
    >>> import tempfile
    >>> net = torch.nn.Linear(2, 2)
    >>> ckpt = AtomicCheckpointer(tempfile.mkdtemp(), {"net": net})
    >>> saved = ckpt.save_checkpoint()
    >>> ckpt.recover_if_possible().path == saved.path
    True
    """

    def save_checkpoint(self, meta=None, end_of_epoch=True, name=None, verbosity=logging.INFO):
        """Saves all recoverables atomically; returns the ``Checkpoint`` on every rank.

        Under torchrun the whole save body runs on the main process nested in
        SpeechBrain's ``MainProcessContext``, so the save hooks that SpeechBrain
        wraps in ``main_process_only`` (optimizer, epoch counter, the package's
        recoverables) run there without a collective of their own. Then every
        rank joins exactly one broadcast (the new checkpoint) and one barrier.
        Recoverables marked ``collective`` (FSDP shards, every rank's random
        states) are written first, by every rank, into the same staging folder.
        """
        final = None
        if if_main_process():
            final = self._checkpoint_path(name)
        final = ddp_broadcast(final)
        staging = final.parent / f".staging-{final.name}"
        self._save_collective(staging)
        checkpoint = None
        with MainProcessContext():
            if if_main_process():
                checkpoint = self._save_staged(final, meta or {}, end_of_epoch, verbosity)
        checkpoint = ddp_broadcast(checkpoint)
        ddp_barrier()
        return checkpoint

    def _checkpoint_path(self, name):
        """The new checkpoint's folder, with a fresh staging folder beside it (main process)."""
        final = (
            self._new_checkpoint_dirpath()
            if name is None
            else self._custom_checkpoint_dirpath(name)
        )
        self.remove_stale_staging()
        staging = final.parent / f".staging-{final.name}"
        try:
            os.makedirs(staging)
            with open(staging / STAGING_OWNER, "w") as handle:
                json.dump(RunLock(self.checkpoints_dir).record(), handle)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)  # created before the disk filled
            raise CheckpointWriteError(self.checkpoints_dir, error) from error
        return final

    def _save_collective(self, staging):
        """Every rank writes its part of the collective recoverables (FSDP shards); a
        failed write removes the staging folder (main process) and names the fix."""
        try:
            for key, obj in self.recoverables.items():
                if getattr(obj, "collective", False):
                    obj.collective_save(staging / f"{key}{PARAMFILE_EXT}")
        except (OSError, RuntimeError) as error:
            if if_main_process():
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointWriteError(self.checkpoints_dir, error) from error
        ddp_barrier()

    def _save_staged(self, final, meta, end_of_epoch, verbosity):
        staging = final.parent / f".staging-{final.name}"
        try:
            paramfiles = {}
            for key, obj in self.recoverables.items():
                paramfiles[key] = final / f"{key}{PARAMFILE_EXT}"
                if not getattr(obj, "collective", False):
                    self._save_one(key, obj, staging / f"{key}{PARAMFILE_EXT}")
            saved_meta = self._save_checkpoint_metafile(staging / METAFNAME, meta, end_of_epoch)
            os.remove(staging / STAGING_OWNER)
            os.replace(staging, final)
        except (OSError, RuntimeError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointWriteError(self.checkpoints_dir, error) from error
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, f"Saved an {kind} checkpoint in {final}")
        return Checkpoint(final, saved_meta, paramfiles)

    def remove_stale_staging(self):
        """Deletes ``.staging-*`` folders left by saves that were killed (main process).

        A staging folder records the process writing it; one whose writer is
        another live process (on another host: assumed live) is left alone.
        """
        if not os.path.isdir(self.checkpoints_dir):
            return
        for entry in os.scandir(self.checkpoints_dir):
            if not (entry.name.startswith(".staging-") and entry.is_dir()):
                continue
            owner = staging_owner(entry.path)
            if owner and owner.get("pid") != os.getpid() and holder_is_alive(owner):
                logger.warning(
                    f"Leaving {entry.path}: PID {owner.get('pid')} on {owner.get('host')} "
                    "is writing it (two runs share this save folder)"
                )
                continue
            logger.info(f"Removing {entry.path}, left by an interrupted save")
            shutil.rmtree(entry.path, ignore_errors=True)

    def _save_one(self, key, obj, path):
        if key in self.custom_save_hooks:
            self.custom_save_hooks[key](obj, path)
            return
        hook = get_default_hook(obj, DEFAULT_SAVE_HOOKS)
        if hook is None:
            raise RuntimeError(f"Don't know how to save {type(obj)} ({key}); add a save hook.")
        hook(obj, path)


@register_checkpoint_hooks
class RNGState:
    """Checkpoints the random generators (python, numpy, torch CPU and CUDA) of every rank.

    With it, a run resumed from an intra-epoch checkpoint draws the same dropout
    masks as the uninterrupted run, so resumption is exact. Under torchrun each
    rank has its own streams: saving gathers them (a collective, see
    ``AtomicCheckpointer``) and each rank restores its own. Loading only stores
    the state; ``apply_pending()`` restores it, and the Brain calls it right
    before the first batch after recovery (creating the data iterator draws
    from the torch generator, which must not shift the restored stream).

    Example
    -------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "rng.ckpt")
    >>> RNGState().collective_save(path)
    >>> first = torch.rand(1)
    >>> rng = RNGState()
    >>> rng.load(path)
    >>> rng.apply_pending()
    >>> torch.equal(torch.rand(1), first)
    True
    """

    collective = True

    def __init__(self):
        self.pending = None

    @staticmethod
    def current():
        """This process's generator states."""
        state = {
            "python": random.getstate(),
            "numpy": numpy_state_as_tensors(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @mark_as_saver
    def save(self, path):
        """Writes this process's states only (a plain SpeechBrain ``Checkpointer``)."""
        torch.save([self.current()], path)

    def collective_save(self, path):
        """Gathers every rank's generator states; the main process writes them."""
        state = self.current()
        states = [state]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            # tensors travel as numpy arrays (pickled tensors do not load back here)
            torch.distributed.all_gather_object(states, tensors_as(state, "numpy"))
            states = [tensors_as(rank_state, "torch") for rank_state in states]
        if if_main_process():
            torch.save(states, path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Reads this rank's generator states (applied by ``apply_pending``)."""
        del end_of_epoch
        states = torch.load(path, weights_only=True)
        if isinstance(states, dict):  # written before states were kept per rank
            states = [states]
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if len(states) != world:
            logger.warning(
                f"{path}: random states of {len(states)} ranks, running on {world}; "
                "resuming with rank 0's (the run continues, not bit-exactly)."
            )
            rank = 0
        self.pending = states[rank]

    def apply_pending(self):
        """Restores the generators loaded last (no-op when nothing is pending)."""
        state, self.pending = self.pending, None
        if state is None:
            return
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def tensors_as(value, kind):
    """``value`` with every tensor turned into a numpy array (``kind="numpy"``) or back.

    Example
    -------
    >>> tensors_as(tensors_as({"a": (torch.ones(2), 3)}, "numpy"), "torch")
    {'a': (tensor([1., 1.]), 3)}
    """
    if isinstance(value, dict):
        return {key: tensors_as(item, kind) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tensors_as(item, kind) for item in value)
    if kind == "numpy" and isinstance(value, torch.Tensor):
        return value.numpy()
    if kind == "torch" and isinstance(value, numpy.ndarray):
        return torch.from_numpy(value)
    return value


def numpy_state_as_tensors():
    """numpy's global RNG state with its key array as a tensor (``weights_only`` safe)."""
    name, keys, pos, has_gauss, cached = numpy.random.get_state()
    return (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
