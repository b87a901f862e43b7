"""A fingerprint of a base LLM folder, so that an export refuses another base model.

An export holds only the trained tensors (LoRA, adaptor, or the LLM's own when
fully fine-tuned); every other weight comes from the base LLM it names. Loaded
onto another model of the same shape it would answer with other weights and
no error. The fingerprint is the hash of the model's ``config.json`` (its
architecture) and of the first row of three of its stored tensors (its
weights), read from the safetensors files without loading the model.

Authors
 * speechbrain-sllm developers 2026
"""

import glob
import hashlib
import json
import os

import torch
from safetensors import safe_open

FINGERPRINT_FILE = "base_model.json"
# config keys that change with the saving library or the dtype, not with the model
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
SAMPLED_TENSORS = 3


class BaseModelMismatchError(ValueError):
    """An export loaded onto a base LLM other than the one it was trained from."""


def config_digest(folder):
    """SHA-256 of a model folder's ``config.json`` without its volatile keys.

    Arguments
    ---------
    folder : str
        A Hugging Face model folder.

    Returns
    -------
    str
    """
    with open(os.path.join(folder, "config.json")) as handle:
        config = json.load(handle)
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sampled_tensor_digests(folder):
    """SHA-256 of the first row of the first, middle and last stored tensor (by name).

    Arguments
    ---------
    folder : str
        A Hugging Face model folder with ``*.safetensors`` files.

    Returns
    -------
    dict
        ``{tensor name: digest}`` (empty when the folder has no safetensors file).
    """
    locations = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as handle:
            locations.update({name: path for name in handle.keys()})
    names = sorted(locations)
    if not names:
        return {}
    step = max((len(names) - 1) // (SAMPLED_TENSORS - 1), 1)
    chosen = sorted(set(names[::step][: SAMPLED_TENSORS - 1] + [names[-1]]))
    digests = {}
    for name in chosen:
        with safe_open(locations[name], framework="pt") as handle:
            tensor_slice = handle.get_slice(name)
            row = tensor_slice[:1] if tensor_slice.get_shape() else handle.get_tensor(name)
        raw = row.contiguous().flatten().view(torch.uint8)  # any dtype, bf16 included
        digests[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return digests


def base_model_fingerprint(source):
    """The fingerprint of a local base LLM folder (None for a hub id: not checked).

    Arguments
    ---------
    source : str
        The ``llm_source`` of a run: a folder or a hub id.

    Returns
    -------
    dict or None
        ``config_sha256`` and ``tensor_sha256`` (``{name: digest}``).
    """
    if not os.path.isfile(os.path.join(source, "config.json")):
        return None
    return {
        "config_sha256": config_digest(source),
        "tensor_sha256": sampled_tensor_digests(source),
    }


def write_fingerprint(folder, source):
    """Writes ``<folder>/base_model.json``: the base LLM's source and fingerprint.

    Arguments
    ---------
    folder : str
        The export folder (being written).
    source : str
        The base LLM's folder or hub id.
    """
    record = {"llm_source": source, "fingerprint": base_model_fingerprint(source)}
    with open(os.path.join(folder, FINGERPRINT_FILE), "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)


def check_fingerprint(folder, source):
    """Refuses a base LLM whose fingerprint differs from the one the export recorded.

    Arguments
    ---------
    folder : str
        The export folder.
    source : str
        The base LLM about to be loaded (the yaml's ``llm_source`` or its override).
    """
    path = os.path.join(folder, FINGERPRINT_FILE)
    if not os.path.isfile(path):
        return  # an export from before fingerprints: nothing to compare with
    with open(path) as handle:
        recorded = json.load(handle)
    expected, found = recorded.get("fingerprint"), base_model_fingerprint(source)
    if expected is None or found is None or expected == found:
        return
    what = "architecture (config.json)"
    if expected["config_sha256"] == found["config_sha256"]:
        what = "weights (same config.json, other tensors)"
    raise BaseModelMismatchError(
        f"{folder} was trained from the base LLM {recorded.get('llm_source')!r}; "
        f"{source!r} has other {what}. The export holds only the trained tensors, so on "
        "another base model it would answer with other weights. Pass the original base "
        'model: overrides={"llm_source": "<its folder>"}.'
    )
