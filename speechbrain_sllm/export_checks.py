"""What ``SpeechLLMInference.from_hparams`` checks before an export's yaml runs.

Loading a yaml runs the objects it names: an export's ``hyperparams.yaml`` may
only name objects of the allow-list (``check_yaml_targets``). The folder must
hold every file, a whole ``model.ckpt`` (``check_export_files``), and the base
models it names where they are, the base LLM the one it was trained from
(``check_model_sources``).

Authors
 * speechbrain-sllm developers 2026
"""

import json
import os
import re

from speechbrain_sllm.model.fingerprint import check_fingerprint
from speechbrain_sllm.model_export import CHECKPOINT_FILE, STRATEGY_FILE


class UntrustedYamlError(ValueError):
    """An exported yaml that names objects outside the allow-list."""


# What an exported hyperparams.yaml may build: loading a yaml runs every object it names
TRUSTED_PACKAGES = ("speechbrain_sllm.", "speechbrain.", "torch.", "transformers.", "peft.")
CODE_RUNNERS = ("speechbrain.utils.superpowers.", "torch.hub.")  # run shell commands / hub code
YAML_TARGET = re.compile(r"!(new|name|apply|module):\s*([^\s\[\]{},]+)")


def untrusted_yaml_targets(path):
    r"""The objects a yaml would build that are not on the allow-list, and any ``!include``.

    Arguments
    ---------
    path : str
        A HyperPyYAML file.

    Returns
    -------
    list of str
        ``!tag:target`` of each refused target (empty: every target is allowed).

    Example
    -------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "h.yaml")
    >>> _ = open(path, "w").write("a: !new:torch.nn.Linear [1, 1]\nb: !apply:os.system [ls]\n")
    >>> untrusted_yaml_targets(path)
    ['!apply:os.system']
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    refused = [
        f"!{tag}:{target}" for tag, target in YAML_TARGET.findall(text) if not trusted(target)
    ]
    refused += [f"!include:{name}" for name in re.findall(r"!include:\s*(\S+)", text)]
    return sorted(set(refused))


def trusted(target):
    """Whether a yaml target is in a trusted package and is not one of its code runners."""
    dotted = target + "."
    return dotted.startswith(TRUSTED_PACKAGES) and not dotted.startswith(CODE_RUNNERS)


def check_yaml_targets(path):
    """Refuses a yaml that would build anything off the allow-list, naming each target."""
    refused = untrusted_yaml_targets(path)
    if refused:
        raise UntrustedYamlError(
            f"{path} would run {refused} when loaded: a yaml is code, and only objects of "
            f"{[p.rstrip('.') for p in TRUSTED_PACKAGES]} are loaded by default. If you wrote "
            "or read this file, pass trust_yaml=True to load it anyway."
        )


def check_export_files(folder, hparams_file="hyperparams.yaml"):
    """Names a file of an export that is missing, or a ``model.ckpt`` that is truncated.

    Arguments
    ---------
    folder : str
        The exported folder.
    hparams_file : str
        Its yaml.
    """
    import zipfile

    for name in (hparams_file, CHECKPOINT_FILE, STRATEGY_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(
                f"Export {folder!r} has no {name}: it is incomplete. Export the run again "
                "(export_recipe_run / the recipe), or copy the whole folder."
            )
    checkpoint = os.path.join(folder, CHECKPOINT_FILE)
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"{checkpoint} is truncated or not a torch checkpoint ({error}); export the run "
            "again, or copy the file whole."
        ) from error


def yaml_scalar(path, key):
    """The value of a top-level ``key: value`` line of a yaml (None when absent).

    Exports write their settings as JSON values (``filled_template``); a plain
    scalar written by hand is read as its text.
    """
    with open(path) as handle:
        match = re.search(rf"^{key}:\s*(.*?)\s*(#.*)?$", handle.read(), flags=re.M)
    if match is None:
        return None
    try:
        return json.loads(match.group(1))
    except json.JSONDecodeError:
        return match.group(1).strip("'\"")


MODEL_SOURCE_KEYS = ("llm_source", "encoder_source")


def check_model_sources(folder, hparams_file="hyperparams.yaml", overrides=None):
    """Names a base-model folder that moved, and refuses another base LLM (fingerprint).

    Arguments
    ---------
    folder : str
        The exported folder.
    hparams_file : str
        Its yaml.
    overrides : dict or None
        The caller's overrides (a new ``llm_source`` / ``encoder_source``).
    """
    overrides = overrides or {}
    sources = {}
    for key in MODEL_SOURCE_KEYS:
        sources[key] = overrides.get(key, yaml_scalar(os.path.join(folder, hparams_file), key))
        value = sources[key]
        if isinstance(value, str) and os.path.isabs(value) and not os.path.isdir(value):
            raise FileNotFoundError(
                f"{folder}: `{key}` is the folder {value!r}, which no longer exists (moved or "
                f"deleted since the export). Pass where it is now: "
                f'SpeechLLMInference.from_hparams(source=..., overrides={{"{key}": "<folder>"}}).'
            )
    if isinstance(sources["llm_source"], str):
        check_fingerprint(folder, sources["llm_source"])
