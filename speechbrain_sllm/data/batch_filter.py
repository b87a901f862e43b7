"""Items of a batch with unusable audio, left out of scoring and named.

An item whose audio holds a NaN or infinite sample scores as a NaN loss or an
empty answer; validation, test and the studies' evaluator score the batch
without it and name it instead (training drops it in ``brain_steps``).

Authors
 * speechbrain-sllm developers 2026
"""

import copy
import logging

import torch
from speechbrain.dataio.batch import PaddedBatch, PaddedData  # noqa: F401  (doctests)

logger = logging.getLogger(__name__)


def finite_audio_positions(batch):
    """Positions of a batch's items whose audio is finite (every item without audio).

    Arguments
    ---------
    batch : PaddedBatch
        From ``make_qa_dataset``.

    Returns
    -------
    list of int

    Example
    -------
    >>> batch = PaddedBatch([{"id": "a", "sig": torch.zeros(3)}, {"id": "b", "sig": torch.ones(2)}])
    >>> batch.sig.data[0, 1] = float("nan")
    >>> finite_audio_positions(batch)
    [1]
    """
    signal = getattr(batch, "sig", None)
    if signal is None:
        return list(range(len(batch.id)))
    return torch.isfinite(signal.data).all(dim=1).nonzero().flatten().tolist()


def batch_subset(batch, keep):
    """A copy of ``batch`` holding only the items at positions ``keep``.

    Arguments
    ---------
    batch : PaddedBatch
        Any batch (padded keys and list keys).
    keep : list of int
        Positions to keep, in order.

    Returns
    -------
    PaddedBatch

    Example
    -------
    >>> batch = PaddedBatch([{"id": "a", "sig": torch.zeros(3)}, {"id": "b", "sig": torch.ones(2)}])
    >>> subset = batch_subset(batch, [1])
    >>> subset.id, subset.sig.data.shape
    (['b'], torch.Size([1, 3]))
    """
    subset = copy.copy(batch)
    for key, value in vars(batch).items():
        if key.startswith("_"):  # PaddedBatch's own bookkeeping
            continue
        if isinstance(value, PaddedData):
            index = torch.tensor(keep, dtype=torch.long, device=value.data.device)
            setattr(subset, key, PaddedData(value.data[index], value.lengths[index]))
        else:
            setattr(subset, key, [value[position] for position in keep])
    return subset


def without_nonfinite_audio(batch, where):
    """``batch`` without its items whose audio is not finite, and their ids (logged).

    Such an item would score as a NaN loss or an empty answer; it is left out
    of every metric and named instead.

    Arguments
    ---------
    batch : PaddedBatch
        From ``make_qa_dataset``.
    where : str
        The set or stage, for the warning.

    Returns
    -------
    batch : PaddedBatch or None
        The finite items (None: no item left).
    dropped : list of str
        The ids left out.
    """
    keep = finite_audio_positions(batch)
    if len(keep) == len(batch.id):
        return batch, []
    dropped = [item for position, item in enumerate(batch.id) if position not in keep]
    logger.warning(f"{where}: items with non-finite audio left out of every metric: {dropped}")
    return (batch_subset(batch, keep) if keep else None), dropped
