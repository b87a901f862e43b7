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

from speechbrain_sllm.run_lock import lock_output_folder
from speechbrain_sllm.strategies.core import STRATEGIES
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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


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


# Keys renamed in the recipes' yamls: an override with the old name is refused with the new one
RENAMED_KEYS = {
    "save_folder": "manifest_folder",  # a study's manifests and audio (WebQuestions)
    "layerwise_lambda": "layerwise_lr",  # the rule's lambda: --layerwise_lr="{lam: 0.2}"
}


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
            handle.seek(0)
            keys = set(ruamel.yaml.YAML().load(handle) or {})
            raise KeyError(unknown_override_message(hparams_file, error, keys)) from None
    return dict(ruamel.yaml.YAML().load(io.StringIO(resolved.getvalue())))


def unknown_override_message(hparams_file, error, keys=()):
    """Names the override that matches no key: its new name, or how nested settings are set."""
    text = str(error.args[0]) if error.args else str(error)
    name = text.split("'")[1] if "'" in text else text
    if RENAMED_KEYS.get(name) in keys:
        return (
            f"{hparams_file}: `{name}` is now `{RENAMED_KEYS[name]}` (one name per concept); "
            f"use --{RENAMED_KEYS[name]}=..."
        )
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
    """Yaml keys that a ``--key`` override cannot set: argparse reads them as run options.

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
    return os.path.isdir(save) and any(name.startswith("CKPT") for name in os.listdir(save))


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


def check_model_folder(key, folder):
    """Names the missing or unreadable files of a local model folder, before loading it.

    Arguments
    ---------
    key : str
        The yaml key (``llm_source`` needs tokenizer files too).
    folder : str
        The local folder.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"`{key}`: {os.path.join(folder, 'config.json')} not found. Point --{key} at a "
            "saved model folder (save_pretrained writes config.json and the weights)."
        )
    if key == "llm_source" and not any(
        os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"`llm_source`: {folder!r} has no tokenizer files (one of {list(TOKENIZER_FILES)}). "
            "Save the tokenizer into the folder (tokenizer.save_pretrained(folder))."
        )
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, name))
            if problem:
                raise ValueError(
                    f"`{key}`: weight file {os.path.join(folder, name)} is unreadable "
                    f"({problem}). Copy or download it again."
                )


def safetensors_problem(path):
    """Why a ``.safetensors`` file cannot be loaded (truncated, bad header), or None.

    Reads only the header: its length, its JSON, and the end of the last
    tensor's bytes against the file's size.

    Arguments
    ---------
    path : str
        A ``.safetensors`` file.

    Returns
    -------
    str or None

    Example
    -------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> _ = open(path, "wb").write(b"\x10")
    >>> safetensors_problem(path)
    'shorter than its 8-byte header length'
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "shorter than its 8-byte header length"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"truncated: header of {length} bytes, file of {size} bytes"
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            return f"header is not valid JSON ({error})"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"truncated: {size} bytes, the tensors need {8 + length + max(ends)}"
    return None


def check_data_files(settings):
    """Names a data file (``train_file``, ``eval_files``) that is missing or holds no item.

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
    evaluation = settings.get("eval_files")
    if hasattr(evaluation, "items"):
        files.update({f"eval_files.{name}": path for name, path in evaluation.items()})
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
    if isinstance(folder, str):
        keep_previous_hyperparams(folder)
    with open(hparams_file) as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    check_encoder_window(hparams)
    if isinstance(folder, str) and not holds_checkpoints(settings):
        with open(os.path.join(folder, RUN_RECORD), "w") as handle:
            json.dump(shaping_settings(settings), handle, indent=1)
    return hparams
