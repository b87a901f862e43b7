"""The two sides of a comparison: a base causal LM and a model tuned from it.

The tuned side may be an HF model folder (or hub id), a peft adapter folder
(merged into the base on load), or the weights of a composite speech LLM
(a ``.safetensors`` / ``.ckpt`` / ``.bin`` file, or a folder of sharded
safetensors) whose LLM tensors carry a prefix such as ``llm.``,
``language_model.`` or ``model.llm.``. Whatever its form, the tuned tensors
are loaded into a copy of the base model's architecture, so both sides are
scored by the same code; tensors that exist on one side only, or that
differ in shape, are refused by name unless ``shared_only`` asks to compare
the shared part.

Authors
 * speechbrain-sllm developers 2026
"""

import glob
import json
import logging
import os
from collections import Counter

import torch

from speechbrain_sllm.model.parameter_names import decoder_layer_index
from speechbrain_sllm.model.speech_llm import load_causal_lm

logger = logging.getLogger(__name__)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
NESTED_STATE_KEYS = ("state_dict", "model", "module")


class ComparisonError(ValueError):
    """Two checkpoints that cannot be compared as given, with the fix in the message."""


def is_peft_adapter(source):
    """Whether ``source`` is a local peft adapter folder (``adapter_config.json``)."""
    return os.path.isfile(os.path.join(str(source), "adapter_config.json"))


def weight_files(source):
    """The weight files of a checkpoint file or folder (shards in index order).

    Arguments
    ---------
    source : str
        A ``.safetensors`` / ``.bin`` / ``.pt`` / ``.ckpt`` file, or a folder
        holding one, or sharded files with their ``*.index.json``.

    Returns
    -------
    list of str
    """
    if os.path.isfile(source):
        return [source]
    for index_name in INDEX_FILES:
        index = os.path.join(source, index_name)
        if os.path.isfile(index):
            with open(index) as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            return [os.path.join(source, shard) for shard in shards]
    files = sorted(glob.glob(os.path.join(source, "*.safetensors")))
    if not files:
        files = sorted(
            path
            for suffix in TORCH_SUFFIXES
            for path in glob.glob(os.path.join(source, "*" + suffix))
        )
    if not files:
        raise ComparisonError(
            f"{source!r} holds no weight file (*.safetensors, {', '.join(TORCH_SUFFIXES)}); "
            "give the folder or file of the model's weights."
        )
    return files


def read_tensors(path):
    """``{name: tensor}`` of one weight file, read on the CPU with ``weights_only=True``.

    A torch file whose tensors sit under ``state_dict`` / ``model`` / ``module``
    (a training checkpoint) is unwrapped.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise ComparisonError(f"{path}: unreadable safetensors file ({error}).") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a pickle of code: say which file
        raise ComparisonError(
            f"{path}: not a tensor checkpoint loadable with weights_only=True ({error})."
        ) from error
    while isinstance(state, dict) and not all(torch.is_tensor(v) for v in state.values()):
        nested = [key for key in NESTED_STATE_KEYS if isinstance(state.get(key), dict)]
        if not nested:
            raise ComparisonError(
                f"{path}: holds no flat {{name: tensor}} mapping (keys {sorted(state)[:8]}); "
                "save the model's state_dict."
            )
        state = state[nested[0]]
    return state


def read_checkpoint(source):
    """Every tensor of a checkpoint file or folder, by name."""
    tensors = {}
    for path in weight_files(source):
        tensors.update(read_tensors(path))
    return tensors


def top_level_prefixes(names, depth=2):
    """The most common leading name components, e.g. ``['llm.', 'llm.model.', 'encoder.']``.

    Arguments
    ---------
    names : iterable of str
        Tensor names.
    depth : int
        Longest prefix, in dotted components.

    Returns
    -------
    list of str

    Example
    -------
    >>> top_level_prefixes(["llm.model.a", "llm.lm_head.weight", "encoder.x"])
    ['llm.', 'encoder.', 'llm.model.', 'llm.lm_head.']
    """
    counts = Counter()
    for name in names:
        parts = name.split(".")[:-1]
        for size in range(1, min(depth, len(parts)) + 1):
            counts[".".join(parts[:size]) + "."] += 1
    ordered = sorted(counts, key=lambda prefix: (prefix.count("."), -counts[prefix]))
    return ordered[:12]


def take_prefix(tensors, prefix, source):
    """The tensors whose names start with ``prefix``, renamed without it.

    Arguments
    ---------
    tensors : dict
        ``{name: tensor}`` of a composite checkpoint.
    prefix : str
        E.g. ``llm.`` or ``language_model.``.
    source : str
        The checkpoint (named in the error).

    Returns
    -------
    dict

    Example
    -------
    >>> take_prefix({"llm.w": 1, "enc.w": 2}, "llm.", "ckpt")
    {'w': 1}
    """
    taken = {
        name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)
    }
    if not taken:
        raise ComparisonError(
            f"--tuned_prefix {prefix!r} matches no tensor of {source!r}; its top-level "
            f"prefixes are {top_level_prefixes(tensors)}. Pass the one that holds the LLM "
            "(e.g. --tuned_prefix=llm.)."
        )
    return taken


def architecture_of(config):
    """What must agree between the two sides: model type, depth and widths."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")
    return {key: getattr(config, key, None) for key in keys}


def check_same_architecture(base_config, tuned_config, tuned_source):
    """Refuses a tuned model whose architecture or layer count differs from the base's."""
    base, tuned = architecture_of(base_config), architecture_of(tuned_config)
    differences = {key: (base[key], tuned[key]) for key in base if base[key] != tuned[key]}
    if differences:
        listed = ", ".join(f"{k}: base {b!r}, tuned {t!r}" for k, (b, t) in differences.items())
        raise ComparisonError(
            f"The tuned model {tuned_source!r} is not the base model's architecture ({listed}). "
            "Compare a model with the LLM it was fine-tuned from."
        )


def canonical_names(model):
    """``{state name: parameter name}``: every tensor name of ``model`` and the parameter it is.

    Tied weights (e.g. ``lm_head.weight`` sharing ``model.embed_tokens.weight``)
    map to the first name ``named_parameters`` gives them.
    """
    first = {id(param): name for name, param in model.named_parameters()}
    return {
        name: first[id(tensor)]
        for name, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) in first
    }


def match_tensors(model, tensors, source, shared_only=False):
    """The tuned tensors renamed to ``model``'s parameter names, checked against it.

    Arguments
    ---------
    model : transformers.PreTrainedModel
        The base architecture (its parameters give names and shapes).
    tensors : dict
        The tuned LLM's tensors (prefix already removed).
    source : str
        The tuned checkpoint (named in errors).
    shared_only : bool
        Compare the shared part: tensors on one side only are left out, and a
        tensor whose first dimension is longer on one side (an extended
        vocabulary) is compared on the shared rows.

    Returns
    -------
    matched : dict
        ``{parameter name: tensor}`` to load.
    excluded : list of str
        Parameters of the base left out of the comparison.
    """
    canonical = canonical_names(model)
    params = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    matched, extra, resized, resized_targets = {}, [], [], set()
    for name, tensor in tensors.items():
        target = canonical.get(name)
        if target is None:
            if name not in buffers:
                extra.append(name)
            continue
        if target in matched:  # a tied alias saved twice
            continue
        expected = params[target].shape
        if tensor.shape != expected:
            if not (shared_only and same_but_first_dim(tensor.shape, expected)):
                resized.append(f"{name}: tuned {tuple(tensor.shape)}, base {tuple(expected)}")
                resized_targets.add(target)
                continue
            logger.warning(
                f"{name}: tuned {tuple(tensor.shape)}, base {tuple(expected)}: compared on the "
                f"first {expected[0]} rows (--shared_only)."
            )
            tensor = tensor[: expected[0]]
        matched[target] = tensor
    if not matched:
        raise ComparisonError(
            f"No tensor of {source!r} has a name of the base model's (e.g. "
            f"{next(iter(params))!r}); its top-level prefixes are {top_level_prefixes(tensors)}. "
            "For a composite speech-LLM checkpoint pass the LLM's prefix (--tuned_prefix=llm.)."
        )
    check_same_depth(params, tensors, source)
    missing = sorted(set(params) - set(matched) - resized_targets)
    problems = one_side_problems(missing, extra, resized, source)
    if problems and not shared_only:
        raise ComparisonError(problems + " Pass --shared_only=True to compare the shared part.")
    if problems:
        logger.warning(problems + " Comparing the shared part only (--shared_only).")
    return matched, sorted(set(missing) | resized_targets)


def layer_count(names):
    """Number of decoder layers named in ``names`` (highest index + 1; 0 without layers)."""
    indices = [decoder_layer_index(name) for name in names]
    return max((i for i in indices if i is not None), default=-1) + 1


def check_same_depth(base_names, tuned_names, source):
    """Refuses a tuned checkpoint with another number of decoder layers than the base."""
    base, tuned = layer_count(base_names), layer_count(tuned_names)
    if base != tuned:
        raise ComparisonError(
            f"The tuned checkpoint {source!r} has {tuned} decoder layers, the base model {base}: "
            "compare a model with the LLM it was fine-tuned from."
        )


def same_but_first_dim(shape_a, shape_b):
    """Whether two shapes differ only in their first dimension (rows of a vocabulary)."""
    return len(shape_a) == len(shape_b) and tuple(shape_a[1:]) == tuple(shape_b[1:])


def one_side_problems(missing, extra, resized, source):
    """One message listing the tensors of one side only and of other shapes ('' if none)."""

    def listed(names):
        """At most six names, and how many more."""
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    parts = []
    if missing:
        parts.append(
            f"{len(missing)} base tensor(s) missing from the tuned side ({listed(missing)})"
        )
    if extra:
        parts.append(f"{len(extra)} tuned tensor(s) the base lacks ({listed(extra)})")
    if resized:
        parts.append(f"{len(resized)} tensor(s) of another shape ({listed(resized)})")
    if not parts:
        return ""
    return f"{source!r} and the base model differ: " + "; ".join(parts) + "."


def load_tuned_llm(base_source, tuned_source, prefix=None, shared_only=False, **load_kwargs):
    """The tuned LLM in the base model's architecture, and the parameters left out.

    Arguments
    ---------
    base_source : str
        The base LLM (folder or hub id).
    tuned_source : str
        HF model folder / hub id, peft adapter folder, or composite checkpoint.
    prefix : str or None
        Prefix of the LLM's tensors in a composite checkpoint.
    shared_only : bool
        See ``match_tensors``.
    **load_kwargs : dict
        ``load_causal_lm`` options (``dtype``, ``trust_remote_code``).

    Returns
    -------
    model : transformers.PreTrainedModel
    excluded : list of str
        Base parameter names not compared.
    """
    model = load_causal_lm(base_source, **load_kwargs)
    if is_peft_adapter(tuned_source) and not prefix:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(model, tuned_source).merge_and_unload()
        return merged, []
    tensors = tuned_tensors(tuned_source, model.config, prefix)
    matched, excluded = match_tensors(model, tensors, tuned_source, shared_only)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in matched.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model, excluded


def tuned_tensors(tuned_source, base_config, prefix):
    """The tuned side's LLM tensors (architecture checked when it has a config)."""
    folder = tuned_source if os.path.isdir(tuned_source) else None
    if folder is None and not os.path.isfile(tuned_source):
        from huggingface_hub import snapshot_download  # a hub id

        folder = snapshot_download(tuned_source, allow_patterns=["*.json", "*.safetensors"])
    if folder is not None and os.path.isfile(os.path.join(folder, "config.json")) and not prefix:
        from transformers import AutoConfig

        check_same_architecture(base_config, AutoConfig.from_pretrained(folder), tuned_source)
    tensors = read_checkpoint(folder or tuned_source)
    if prefix:
        return take_prefix(tensors, prefix, tuned_source)
    return tensors
