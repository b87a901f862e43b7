"""One key and one bounded memory for the package's exact tensor caches.

Three things are computed once per input and reused: a frozen encoder's
outputs (``EncoderOutputCache``), an encoder's Fbank features
(``FeatureCache``) and the transcript adaptors' decoder states. All key an
entry by ``tensor_key`` (BLAKE2b of the tensor's bytes, shape and dtype, plus
whatever else the result depends on) and keep entries in a ``TensorMemo``,
which drops the least recently used entry past its bound.

Authors
 * speechbrain-sllm developers 2026
"""

import collections
import hashlib

import torch


def tensor_key(tensor, *context):
    """A digest of a tensor's values, shape and dtype, and of ``context`` strings.

    Arguments
    ---------
    tensor : torch.Tensor
        Any tensor (any device and dtype).
    *context : str
        What else the cached result depends on (e.g. the weights' key, the precision).

    Returns
    -------
    str

    Example
    -------
    >>> tensor_key(torch.zeros(2, 3)) == tensor_key(torch.zeros(2, 3))
    True
    >>> tensor_key(torch.zeros(2, 3)) == tensor_key(torch.zeros(3, 2))
    False
    >>> tensor_key(torch.zeros(2), "bf16") == tensor_key(torch.zeros(2), "off")
    False
    """
    values = tensor.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    for text in (*context, str(tuple(values.shape)), str(values.dtype)):
        digest.update(text.encode() + b"\0")
    digest.update(values.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def module_key(module):
    """A digest of a module's class and every tensor of its state dict.

    Arguments
    ---------
    module : torch.nn.Module
        The module (e.g. a frozen encoder).

    Returns
    -------
    str

    Example
    -------
    >>> net = torch.nn.Linear(2, 2)
    >>> module_key(net) == module_key(net)
    True
    """
    digest = hashlib.blake2b(type(module).__name__.encode(), digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(tensor_key(tensor, name).encode())
    return digest.hexdigest()


class TensorMemo:
    """Tensors kept in memory by key, the least recently used dropped past ``max_items``.

    Arguments
    ---------
    max_items : int
        The bound (entries).

    Example
    -------
    >>> memo = TensorMemo(max_items=2)
    >>> for name in "abc":
    ...     memo.put(name, torch.zeros(1))
    >>> len(memo), "a" in memo, memo.get("c").shape
    (2, False, torch.Size([1]))
    """

    def __init__(self, max_items):
        if max_items < 0:
            raise ValueError(f"TensorMemo: max_items must be >= 0, got {max_items}.")
        self.max_items = max_items
        self.entries = collections.OrderedDict()

    def __len__(self):
        return len(self.entries)

    def __contains__(self, key):
        return key in self.entries

    def get(self, key):
        """The tensor under ``key`` (now the most recently used), or None."""
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key, tensor):
        """Keeps ``tensor`` under ``key``; drops the oldest entries past the bound."""
        self.entries[key] = tensor
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_items:
            self.entries.popitem(last=False)
