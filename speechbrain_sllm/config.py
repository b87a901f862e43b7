"""Loading a recipe's yaml with its settings checked before anything expensive runs.

``load_hyperpyyaml`` builds every object of a recipe yaml, the LLM included,
so a wrong path or strategy used to surface after minutes of loading, and
after ``create_experiment_directory`` had overwritten the output folder's
``hyperparams.yaml``. ``load_recipe_hparams`` first resolves the yaml's
references and overrides WITHOUT building anything, checks the settings, and
only then builds the objects.

Authors
 * speechbrain-sllm developers 2026
"""

import dataclasses
import io
import json
import os
import shutil
import time

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from speechbrain.core import RunOptions

from speechbrain_sllm.strategies.core import STRATEGIES

SOURCE_KEYS = ("llm_source", "encoder_source")
RUN_RECORD = "run.json"


def looks_like_a_path(source):
    """Whether a model ``source`` is meant as a local folder rather than a hub id.

    Arguments
    ---------
    source : str
        A ``*_source`` value.

    Returns
    -------
    bool

    Example
    -------
    >>> looks_like_a_path("meta-llama/Llama-3.2-1B"), looks_like_a_path("./models/llama")
    (False, True)
    """
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or "\\" in source


def plain_settings(hparams_file, overrides):
    """The yaml's top-level settings with references and overrides resolved, nothing built.

    Arguments
    ---------
    hparams_file : str
        The recipe yaml.
    overrides : str or dict
        Command-line overrides (from ``speechbrain.parse_arguments``).

    Returns
    -------
    dict
        Top-level keys; scalars as values, objects as ruamel nodes.
    """
    with open(hparams_file) as handle:
        try:
            resolved = resolve_references(handle, overrides, overrides_must_match=True)
        except KeyError as error:
            if "Override" not in str(error):
                raise
            raise KeyError(unknown_override_message(hparams_file, error)) from None
    return dict(ruamel.yaml.YAML().load(io.StringIO(resolved.getvalue())))


def unknown_override_message(hparams_file, error):
    """Names the override that matches no key and how nested settings are overridden."""
    text = str(error.args[0]) if error.args else str(error)
    name = text.split("'")[1] if "'" in text else text
    prefix = name.split("_")[0]
    hint = (
        f' Nested settings take a mapping: --{prefix}="{{{name[len(prefix) + 1 :]}: ...}}".'
        if "_" in name
        else ""
    )
    return (
        f"{hparams_file}: the override `{name}` matches no top-level key of this yaml.{hint} "
        "See the yaml for the keys a recipe takes."
    )


def keys_read_as_run_options(keys):
    """Yaml keys that ``--key=...`` cannot override: argparse reads them as run options.

    SpeechBrain parses the command line with argparse, which accepts any
    unambiguous prefix of an option: ``--distributed=fsdp`` silently becomes
    ``--distributed_backend=fsdp`` and the yaml key ``distributed`` keeps its
    value. A key equal to a run option is fine (SpeechBrain reads those from
    the yaml too).

    Arguments
    ---------
    keys : iterable of str
        Top-level yaml keys.

    Returns
    -------
    dict
        ``{key: [run options it is a prefix of]}``.

    Example
    -------
    >>> keys_read_as_run_options(["distributed", "lora", "device"])
    {'distributed': ['distributed_backend', 'distributed_launch']}
    """
    options = [field.name for field in dataclasses.fields(RunOptions)]
    shadowed = {
        key: [option for option in options if option.startswith(key)]
        for key in keys
        if key not in options
    }
    return {key: found for key, found in shadowed.items() if found}


def check_settings(settings):
    """Raises a clear error for a bad key, model path or strategy (before anything is built).

    Arguments
    ---------
    settings : dict
        From ``plain_settings``.
    """
    for key, options in keys_read_as_run_options(settings).items():
        raise ValueError(
            f"yaml key `{key}` cannot be set from the command line: argparse reads "
            f"--{key}=... as SpeechBrain's run option --{options[0]}. Rename the key "
            "(no SpeechBrain run option may start with it)."
        )
    for key in SOURCE_KEYS:
        source = settings.get(key)
        if isinstance(source, str) and looks_like_a_path(source):
            if not os.path.isdir(os.path.expanduser(source)):
                raise FileNotFoundError(
                    f"`{key}`: folder {source!r} not found. Set --{key} to a local model "
                    "folder (with config.json) or to a hub id such as org/model."
                )
    strategy = settings.get("strategy")
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise ValueError(f"`strategy`: {strategy!r} is unknown; use one of {STRATEGIES}.")


def check_existing_run(settings):
    """Refuses an output folder whose checkpoints were written by another strategy.

    Arguments
    ---------
    settings : dict
        From ``plain_settings`` (``output_folder``, ``save_folder``, ``strategy``).
    """
    folder = settings.get("output_folder")
    if not isinstance(folder, str) or not os.path.isfile(os.path.join(folder, RUN_RECORD)):
        return
    with open(os.path.join(folder, RUN_RECORD)) as handle:
        previous = json.load(handle).get("strategy")
    save = settings.get("save_folder", os.path.join(folder, "save"))
    has_checkpoints = os.path.isdir(save) and any(
        name.startswith("CKPT") for name in os.listdir(save)
    )
    if has_checkpoints and previous != settings.get("strategy"):
        raise ValueError(
            f"`output_folder` {folder!r} holds checkpoints of strategy {previous!r}, not "
            f"{settings.get('strategy')!r}. Resume with --strategy={previous}, or give "
            "another --output_folder. Nothing in the folder was changed."
        )


def keep_previous_hyperparams(folder):
    """Renames an existing ``hyperparams.yaml`` to ``hyperparams.<time>.yaml`` (kept).

    Arguments
    ---------
    folder : str
        The output folder.
    """
    path = os.path.join(folder, "hyperparams.yaml")
    if os.path.isfile(path):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
        shutil.copy2(path, os.path.join(folder, f"hyperparams.{stamp}.yaml"))


def load_recipe_hparams(hparams_file, overrides):
    """Checks a recipe's settings, then builds its yaml (``load_hyperpyyaml``).

    Arguments
    ---------
    hparams_file : str
        The recipe yaml.
    overrides : str or dict
        Command-line overrides.

    Returns
    -------
    dict
        The loaded hyperparameters.
    """
    settings = plain_settings(hparams_file, overrides)
    check_settings(settings)
    check_existing_run(settings)
    folder = settings.get("output_folder")
    if isinstance(folder, str):
        keep_previous_hyperparams(folder)
    with open(hparams_file) as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    if isinstance(folder, str):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, RUN_RECORD), "w") as handle:
            json.dump({"strategy": settings.get("strategy")}, handle)
    return hparams
