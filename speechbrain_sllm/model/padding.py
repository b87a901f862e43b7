"""Padded batches: absolute lengths from SpeechBrain's relative ones, and unpadding.

Authors
 * speechbrain-sllm developers 2026
"""

import torch


def absolute_lengths(relative_lengths, time, minimum=1):
    """Item lengths, in steps, of relative lengths on a padded axis of ``time`` steps.

    ``round(relative * time)``, at least ``minimum``, as a long tensor on the CPU.

    Arguments
    ---------
    relative_lengths : torch.Tensor
        ``(B,)`` SpeechBrain relative lengths (1.0 = the whole padded axis).
    time : int
        Length of the padded axis.
    minimum : int
        Smallest count returned (1: every item keeps a step; 0: empty items stay empty).

    Returns
    -------
    torch.Tensor
        ``(B,)`` long.

    Example
    -------
    >>> absolute_lengths(torch.tensor([1.0, 0.5, 0.01]), 10)
    tensor([10,  5,  1])
    >>> absolute_lengths(torch.tensor([0.0]), 10, minimum=0)
    tensor([0])
    """
    counts = torch.round(relative_lengths.detach().cpu().float() * time).long()
    return counts.clamp(min=minimum)


def unpad(padded):
    """Splits a ``PaddedData`` of id sequences back into per-item lists.

    Arguments
    ---------
    padded : speechbrain.dataio.batch.PaddedData
        ``data (B, L)`` and relative ``lengths (B,)``.

    Returns
    -------
    list of torch.Tensor

    Example
    -------
    >>> from speechbrain.dataio.batch import PaddedData
    >>> unpad(PaddedData(torch.tensor([[1, 2, 3], [4, 0, 0]]), torch.tensor([1.0, 1 / 3])))
    [tensor([1, 2, 3]), tensor([4])]
    """
    data, lengths = padded
    counts = absolute_lengths(lengths, data.shape[1], minimum=0).tolist()
    return [data[b, :n] for b, n in enumerate(counts)]
