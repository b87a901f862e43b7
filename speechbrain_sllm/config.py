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

import json
import os
import shutil
import time

from hyperpyyaml import load_hyperpyyaml

from speechbrain_sllm.model_sources import check_model_folder, looks_like_a_path
from speechbrain_sllm.overrides import keys_read_as_run_options, plain_settings
from speechbrain_sllm.run_lock import lock_output_folder
from speechbrain_sllm.strategies.core import STRATEGIES
from speechbrain_sllm.study.stage_record import (
    check_stage_folders,
    folder_holds_checkpoints,
    write_stage_records,
)
from speechbrain_sllm.value_checks import device_problem, value_problems

SOURCE_KEYS = ("llm_source", "encoder_source")
SHAPING_KEYS = (
    "strategy",
    "train_encoder",
    "llm_source",
    "encoder_source",
    "encoder_dim",
    "llm_dim",
    "lora",
    "adaptor",
    "adaptor_type",
    "adaptor_choices",
)
RUN_RECORD = "run.json"


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
            check_model_folder(key, os.path.expanduser(source))
    strategy = settings.get("strategy")
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise ValueError(f"`strategy`: {strategy!r} is unknown; use one of {STRATEGIES}.")
    problems = value_problems(settings)
    if problems:
        raise ValueError("Settings out of range (fix them on the command line or in the yaml):\n  "
                         + "\n  ".join(problems))  # fmt: skip


def shaping_settings(settings):
    """The settings that shape the trainable tensors, as plain JSON values.

    A checkpoint holds tensors of these shapes: resuming it with another LoRA
    rank, adaptor size, strategy or model fails, so they are recorded with the
    run (``run.json``) and compared on a resume. LoRA settings count only for
    a strategy that uses LoRA; local model folders are compared as absolute paths.

    Arguments
    ---------
    settings : dict
        From ``plain_settings``.

    Returns
    -------
    dict
        ``{key: value}``; mapping-valued keys (``lora``, ``adaptor``) hold their
        scalar children; ``adaptor_choices`` only the chosen ``adaptor_type``'s.

    Example
    -------
    >>> shaping_settings({"strategy": "full_ft", "lora": {"rank": 8}, "llm_dim": 32})
    {'strategy': 'full_ft', 'llm_dim': 32}
    >>> shaping_settings({"adaptor_type": "A", "adaptor_choices": {"A": {"size": 2}, "B": {}}})
    {'adaptor_type': 'A', 'adaptor_choices': {'A': {'size': 2}}}
    """
    shaping = {}
    for key in SHAPING_KEYS:
        if key not in settings or (key == "lora" and "lora" not in str(settings.get("strategy"))):
            continue
        value = settings[key]
        if key == "adaptor_choices":
            chosen = settings.get("adaptor_type")
            arguments = value.get(chosen, {}) if hasattr(value, "get") else {}
            value = {chosen: {name: child for name, child in arguments.items() if is_plain(child)}}
        elif hasattr(value, "items"):
            value = {name: child for name, child in value.items() if is_plain(child)}
        elif not is_plain(value):
            continue
        if key in SOURCE_KEYS and isinstance(value, str) and looks_like_a_path(value):
            value = os.path.abspath(os.path.expanduser(value))
        shaping[key] = value
    return shaping


def is_plain(value):
    """Whether a yaml value is a scalar or a list of scalars (JSON-comparable)."""
    if isinstance(value, (list, tuple)):
        return all(is_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


def override_flag(key, value):
    """The command-line override that sets ``key`` to ``value``.

    Example
    -------
    >>> override_flag("lora", {"rank": 8, "alpha": 16})
    '--lora="{rank: 8, alpha: 16}"'
    >>> override_flag("strategy", "lora")
    '--strategy=lora'
    """
    if isinstance(value, dict):
        inner = ", ".join(f"{name}: {json.dumps(child)}" for name, child in value.items())
        return f'--{key}="{{{inner}}}"'
    return f"--{key}={value}"


def holds_checkpoints(settings):
    """Whether the run's ``save_folder`` holds a checkpoint."""
    folder = settings.get("output_folder")
    save = settings.get("save_folder", os.path.join(folder, "save"))
    return folder_holds_checkpoints(save)


def check_existing_run(settings):
    """Refuses to resume checkpoints written with other tensor-shaping settings.

    Compares ``shaping_settings`` with the folder's ``run.json`` when the
    folder holds checkpoints, before anything is built or written, and names
    each differing setting with the folder's value and the override to use.

    Arguments
    ---------
    settings : dict
        From ``plain_settings`` (``output_folder``, ``save_folder``, ...).
    """
    folder = settings.get("output_folder")
    record = os.path.join(folder, RUN_RECORD) if isinstance(folder, str) else ""
    if not os.path.isfile(record) or not holds_checkpoints(settings):
        return
    with open(record) as handle:
        previous = json.load(handle)
    current = shaping_settings(settings)
    differing = [key for key in previous if key in current and previous[key] != current[key]]
    if not differing:
        return
    lines = [
        f"  {key}: {previous[key]!r} in the folder, {current[key]!r} now "
        f"(resume with {override_flag(key, previous[key])})"
        for key in differing
    ]
    raise ValueError(
        f"`output_folder` {folder!r} holds checkpoints trained with other settings that "
        "shape the trained tensors:\n" + "\n".join(lines) + "\nResume with the folder's "
        "values, or give another --output_folder. Nothing in the folder was changed."
    )


def keep_previous_hyperparams(folder):
    """Keeps an existing ``hyperparams.yaml`` as ``hyperparams.<time>.yaml``, once per content.

    A rerun with the same settings finds a copy with the same bytes and adds none,
    so the folder holds one copy per distinct setting.

    Arguments
    ---------
    folder : str
        The output folder.
    """
    path = os.path.join(folder, "hyperparams.yaml")
    if not os.path.isfile(path):
        return
    with open(path, "rb") as handle:
        content = handle.read()
    for name in os.listdir(folder):
        if name.startswith("hyperparams.") and name != "hyperparams.yaml":
            with open(os.path.join(folder, name), "rb") as handle:
                if handle.read() == content:
                    return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    shutil.copy2(path, os.path.join(folder, f"hyperparams.{stamp}.yaml"))


def check_data_files(settings):
    """Names a data file (``train_file``, ``test_files``) that is missing or holds no item.

    A ``train_file`` that is a folder or a ``.parquet`` file is VoiceAssistant-400K as
    published: the folder must hold parquet shards.

    Runs before any model loads, unless ``skip_prep`` (the manifests exist).

    Arguments
    ---------
    settings : dict
        From ``plain_settings``.
    """
    if settings.get("skip_prep"):
        return
    files = {"train_file": settings.get("train_file")}
    evaluation = settings.get("test_files")
    if hasattr(evaluation, "items"):
        files.update({f"test_files.{name}": path for name, path in evaluation.items()})
    for key, path in files.items():
        if not isinstance(path, str):
            continue
        if key == "train_file" and (os.path.isdir(path) or path.endswith(".parquet")):
            check_parquet_source(path)
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"`{key}`: data file {path!r} not found; fix --{key.split('.')[0]}."
            )
        with open(path, "rb") as handle:
            if not any(line.strip() for line in handle):
                raise ValueError(
                    f"`{key}`: data file {path!r} holds no item (empty). Point --"
                    f"{key.split('.')[0]} at a JSON-lines file with one item per line."
                )


def check_parquet_source(path):
    """Names a parquet ``train_file`` (a shard or a folder of shards) that holds no shard."""
    import glob

    if os.path.isfile(path):
        return
    if not glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
        raise FileNotFoundError(
            f"`train_file`: {path!r} holds no .parquet file; point --train_file at "
            "VoiceAssistant-400K's folder of shards, a .parquet file or a JSON-lines file."
        )


def check_device(run_opts):
    """Refuses a CUDA ``--device`` that torch cannot see, naming the option.

    Arguments
    ---------
    run_opts : RunOptions, dict or None
        SpeechBrain's run options (``device``).
    """
    device = (
        run_opts.get("device") if isinstance(run_opts, dict) else getattr(run_opts, "device", None)
    )
    if device_problem(device):
        raise ValueError(device_problem(device))
    if not isinstance(device, str) or not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= count:
        raise RuntimeError(
            f"--device={device}: torch sees {count} CUDA device(s) on this machine "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run with "
            "--device=cpu, or install a CUDA build of torch on a machine with a GPU."
        )


def check_encoder_window(hparams):
    """Refuses a ``max_duration`` longer than the encoder's window (e.g. Whisper's 30 s).

    Arguments
    ---------
    hparams : dict
        The loaded yaml (``max_duration``, ``model`` or ``encoder``).
    """
    max_duration = hparams.get("max_duration")
    encoder = getattr(hparams.get("model"), "encoder", None) or hparams.get("encoder")
    window = getattr(encoder, "window_seconds", None)
    if max_duration is None or window is None or max_duration <= window:
        return
    raise ValueError(
        f"`max_duration` {max_duration} s is longer than the window of the encoder "
        f"{hparams.get('encoder_source', type(encoder).__name__)!r} ({window:g} s): longer "
        f"clips cannot be encoded. Set --max_duration={window:g} (or less)."
    )


def load_recipe_hparams(hparams_file, overrides, run_opts=None):
    """Checks a recipe's settings, locks its output folder, then builds its yaml.

    Arguments
    ---------
    hparams_file : str
        The recipe yaml.
    overrides : str or dict
        Command-line overrides.
    run_opts : RunOptions or None
        SpeechBrain's run options (``--device`` is checked).

    Returns
    -------
    dict
        The loaded hyperparameters.
    """
    settings = plain_settings(hparams_file, overrides)
    check_settings(settings)
    check_device(run_opts)
    check_data_files(settings)
    folder = settings.get("output_folder")
    if isinstance(folder, str):
        lock_output_folder(folder)  # before anything is written into the folder
    check_existing_run(settings)
    untrained_stages = check_stage_folders(settings) if "stage_choices" in settings else {}
    if isinstance(folder, str):
        keep_previous_hyperparams(folder)
    with open(hparams_file) as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    check_encoder_window(hparams)
    if isinstance(folder, str) and not holds_checkpoints(settings):
        with open(os.path.join(folder, RUN_RECORD), "w") as handle:
            json.dump(shaping_settings(settings), handle, indent=1)
    write_stage_records(settings, untrained_stages)
    return hparams
