"""Pretrained checkpoints read once per study and shared by the parts built from them.

A study with a Whisper adaptor uses one Whisper checkpoint three times: the
speech encoder, the adaptor's decoder and the cascade's recogniser. Each part
gets its own copy of the weights (one part may train while another only
decodes), but inside ``sharing_pretrained()`` (a study's whole run) the
checkpoint is read from disk once: ``pretrained_whisper`` keeps the last
checkpoint it read (one at most) until the outermost scope ends. Outside a
scope nothing is held (a training recipe, one process per GPU, keeps no
second copy of Whisper in host memory). The vocabulary bridge needs only the
LLM's input embeddings: ``llm_input_embeddings`` reads that one tensor, not
the whole LLM.

Authors
 * speechbrain-sllm developers 2026
"""

import contextlib
import copy
import functools
import json
import logging
import os

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)  # the bound: one Whisper checkpoint held at a time
def _whisper_checkpoint(source, cache_dir):
    """The checkpoint as ``WhisperForConditionalGeneration``, read from disk once."""
    from transformers import WhisperForConditionalGeneration

    logger.info(f"Reading the Whisper checkpoint {source} (shared by its parts)")
    return WhisperForConditionalGeneration.from_pretrained(source, cache_dir=cache_dir).eval()


_SCOPES = []  # the open ``sharing_pretrained`` scopes


@contextlib.contextmanager
def sharing_pretrained():
    """A scope (e.g. a study's run) in which each Whisper checkpoint is read once.

    Example
    -------
    >>> with sharing_pretrained():
    ...     pass
    >>> _whisper_checkpoint.cache_info().currsize
    0
    """
    _SCOPES.append(True)
    try:
        yield
    finally:
        _SCOPES.pop()
        if not _SCOPES:
            release_pretrained()


def pretrained_whisper(source, cache_dir=None, with_head=False):
    """A fresh copy of a pretrained Whisper, read once per ``sharing_pretrained`` scope.

    Arguments
    ---------
    source : str
        A local folder or a hub id.
    cache_dir : str or None
        HF cache folder.
    with_head : bool
        True: the ``WhisperForConditionalGeneration`` (a recogniser); False: its
        ``WhisperModel`` (encoder and decoder, for a speech encoder or an adaptor).

    Returns
    -------
    transformers.WhisperModel or transformers.WhisperForConditionalGeneration
        Its own tensors: training it leaves the other copies as they were.
    """
    if not _SCOPES:  # nothing shares it: read the part alone, hold nothing
        from transformers import WhisperForConditionalGeneration, WhisperModel

        model_class = WhisperForConditionalGeneration if with_head else WhisperModel
        return model_class.from_pretrained(source, cache_dir=cache_dir).eval()
    checkpoint = _whisper_checkpoint(source, cache_dir)
    return copy.deepcopy(checkpoint if with_head else checkpoint.model)


def release_pretrained():
    """Frees the held checkpoint (the next ``pretrained_whisper`` in a scope reads it again)."""
    _whisper_checkpoint.cache_clear()


def llm_input_embeddings(source, cache_dir=None):
    """The input embedding matrix of a causal LM, read alone from its safetensors files.

    Falls back to loading the whole LLM when the checkpoint has no safetensors
    file holding the tensor (e.g. only ``pytorch_model.bin``).

    Arguments
    ---------
    source : str
        A local folder or a hub id.
    cache_dir : str or None
        HF cache folder.

    Returns
    -------
    torch.Tensor
        ``(vocabulary, hidden size)`` in float32.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, cache_dir=cache_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    weight = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is weight)
    tensor = read_safetensor(source, name, cache_dir)
    if tensor is None:
        logger.info(f"{source}: no safetensors file holds {name}; loading the whole LLM for it")
        llm = AutoModelForCausalLM.from_pretrained(source, cache_dir=cache_dir)
        tensor = llm.get_input_embeddings().weight.detach()
    return tensor.float()


def read_safetensor(source, name, cache_dir=None):
    """One tensor of a checkpoint's safetensors files (one file or an indexed set).

    Arguments
    ---------
    source : str
        A local folder or a hub id.
    name : str
        The tensor's key (``model.embed_tokens.weight``).
    cache_dir : str or None
        HF cache folder.

    Returns
    -------
    torch.Tensor or None
        None when no safetensors file of ``source`` holds ``name``.
    """
    from safetensors import safe_open

    index = checkpoint_file(source, "model.safetensors.index.json", cache_dir)
    if index is not None:
        with open(index) as handle:
            shard = json.load(handle)["weight_map"].get(name)
        path = checkpoint_file(source, shard, cache_dir) if shard else None
    else:
        path = checkpoint_file(source, "model.safetensors", cache_dir)
    if path is None:
        return None
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(name) if name in handle.keys() else None


def checkpoint_file(source, filename, cache_dir=None):
    """The local path of one file of a checkpoint (a folder's, or the hub cache's); None if absent."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    return cached_file(
        source,
        filename,
        cache_dir=cache_dir,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
