"""Each trained stage's settings, recorded beside its checkpoints and compared on a rerun.

A study resumes each stage from the checkpoints in its folder. Rerun in the
same ``output_folder`` with other settings (``--replay="{weight: 4.0}"``, other
targets, another rate), a finished stage would be restored from checkpoints
trained with the old ones and reported under the new. So each trained stage
writes ``stage.json`` (its settings, flattened to dotted keys) into its folder,
and a run whose settings differ from a folder that holds checkpoints is refused
before anything is built or written, naming each differing setting.

What a stage's checkpoints depend on: the stage's own entry of ``stage_choices``
and the yaml's top-level settings, except the settings that only say where files
are or how the trained model is scored (``NOT_TRAINING_KEYS``: scoring runs again
on every rerun), the parts of other stages and the settings of a strategy the
stage does not use (``stage_record``).

Authors
 * speechbrain-sllm developers 2026
"""

import json
import logging
import os
import pydoc

import speechbrain as sb

from speechbrain_sllm.outputs import write_json

logger = logging.getLogger(__name__)
STAGE_RECORD = "stage.json"
NOT_TRAINING_KEYS = (
    "stages",
    "stage_choices",
    "output_folder",
    "manifest_folder",
    "data_folder",
    "llama_questions_folder",
    "skip_prep",
    "prepare_on_change",
    "encoder_cache",
    "evaluation",
    "importance",
    "num_test",
    "num_llamaq",
)
SHOWN_DIFFERENCES = 12


def node_tag(node):
    """The yaml tag of a ruamel node (such as ``!new:``), or None for a plain value.

    Example
    -------
    >>> node_tag({"lr": 0.1}) is None
    True
    """
    return getattr(getattr(node, "tag", None), "value", None)


def flat_settings(node, prefix=""):
    """A yaml node as ``{dotted key: scalar}``; a tagged node's tag under ``<key>.tag``.

    Arguments
    ---------
    node : object
        A plain setting or a ruamel node (mapping, sequence, scalar).
    prefix : str
        The node's dotted key.

    Returns
    -------
    dict

    Example
    -------
    >>> flat_settings({"lr": 0.1, "mitigations": [{"weight": 1.0}]}, "full_ft")
    {'full_ft.lr': 0.1, 'full_ft.mitigations.0.weight': 1.0}
    """
    flat = {}
    tag = node_tag(node)
    if tag and prefix:
        flat[f"{prefix}.tag"] = str(tag)
    if hasattr(node, "items"):
        children = node.items()
    elif isinstance(node, (list, tuple)):
        children = enumerate(node)
    else:
        return {prefix: node if isinstance(node, (int, float, bool, type(None))) else str(node)}
    for key, child in children:
        flat.update(flat_settings(child, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def stage_record(settings, name):
    """What the checkpoints of stage ``name`` depend on, as ``{dotted key: value}``.

    The stage's own entry of ``stage_choices`` (its settings, strategy, mitigations),
    and the yaml's top-level settings but three kinds: ``NOT_TRAINING_KEYS``, the parts
    of other stages only (another stage's mitigation or settings: ``--anchor`` does not
    touch ``full_ft+replay``), and the settings of a strategy the stage does not train
    with (``lora`` for ``full_ft``, ``layerwise_lr`` for ``lora``). Paths inside the
    output folder are written relative to it (``<output_folder>/...``), so a moved
    study folder still resumes.

    Arguments
    ---------
    settings : dict
        The study's plain settings (``overrides.plain_settings``).
    name : str
        The stage's key in ``stage_choices``.

    Returns
    -------
    dict

    Example
    -------
    >>> anchor, lora = {"strength": 0.1}, {"rank": 8}
    >>> settings = {"output_folder": "out", "seed": 1, "num_test": 9, "anchor": anchor,
    ...     "lora": lora, "stage_choices": {"full_ft": {"strategy": "full_ft", "lora": lora},
    ...     "full_ft+anchor": {"strategy": "full_ft", "mitigations": [anchor]}}}
    >>> stage_record(settings, "full_ft")
    {'seed': 1, 'stage_choices.full_ft.strategy': 'full_ft'}
    """
    choices = settings["stage_choices"]
    own = choices[name]
    others = [part for key, entry in choices.items() if key != name for part in parts(entry)]
    kept = {
        key: value
        for key, value in settings.items()
        if key not in NOT_TRAINING_KEYS and not (value in others and value not in parts(own))
    }
    kept[f"stage_choices.{name}"] = own
    unused = unused_strategy_settings(own)
    record = {
        key: value
        for key, value in flat_settings(kept).items()
        if not any(part in unused for part in key.split("."))
    }
    folder = str(settings.get("output_folder", "")).rstrip("/")
    for key, value in record.items():
        if folder and isinstance(value, str) and value.startswith(folder + "/"):
            record[key] = "<output_folder>" + value[len(folder) :]
    return record


def parts(entry):
    """A stage entry's arguments, list items one by one (what a top-level key may be)."""
    if not hasattr(entry, "values"):
        return []
    found = []
    for value in entry.values():
        found.extend(value if isinstance(value, (list, tuple)) else [value])
    return found


def unused_strategy_settings(entry):
    """The strategy settings a stage entry does not train with (``lora``, ``layerwise_lr``)."""
    strategy = str(entry.get("strategy", "")) if hasattr(entry, "get") else ""
    return {key for key in ("lora", "layerwise_lr") if strategy and key not in strategy}


def trained_stage_folders(settings):
    """``{name: folder}`` of the listed stages that train (a ``training_folder`` class attribute).

    Arguments
    ---------
    settings : dict
        The study's plain settings (``stages``, ``stage_choices``, ``output_folder``).

    Returns
    -------
    dict
    """
    choices, folders = settings.get("stage_choices") or {}, {}
    for name in settings.get("stages") or []:
        tag = str(node_tag(choices.get(name)) or "")
        stage_class = pydoc.locate(tag.split(":", 1)[1]) if tag.startswith("!new:") else None
        pattern = getattr(stage_class, "training_folder", None)
        if pattern:
            folders[name] = os.path.join(settings["output_folder"], pattern.format(name=name))
    return folders


def folder_holds_checkpoints(folder):
    """Whether ``folder`` or a folder below it holds a SpeechBrain checkpoint (``CKPT*``).

    Example
    -------
    >>> folder_holds_checkpoints("no/such/folder")
    False
    """
    for _, subfolders, _ in os.walk(folder):
        if any(sub.startswith("CKPT") for sub in subfolders):
            return True
    return False


def read_record(folder):
    """The ``stage.json`` of ``folder`` as a dict, or None when there is none."""
    path = os.path.join(folder, STAGE_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def record_differences(previous, current):
    """Lines naming each setting that differs between two stage records."""
    keys = [key for key in previous if key not in current] + [
        key for key in current if previous.get(key, object()) != current[key]
    ]
    lines = []
    for key in keys:
        before = repr(previous[key]) if key in previous else "(not set)"
        now = repr(current[key]) if key in current else "(not set)"
        lines.append(f"    {key}: {before} in the folder, {now} now")
    if len(lines) > SHOWN_DIFFERENCES:
        lines = lines[:SHOWN_DIFFERENCES] + [f"    ... and {len(lines) - SHOWN_DIFFERENCES} more"]
    return lines


def check_stage_folders(settings):
    """Refuses a rerun whose settings differ from those a trained stage's checkpoints hold.

    Runs before anything is built or written; names every refused stage, its
    folder and each differing setting. A folder with checkpoints and no record
    (written before records existed) is resumed with a warning.

    Arguments
    ---------
    settings : dict
        The study's plain settings.

    Returns
    -------
    dict
        ``{name: folder}`` of the listed trained stages without checkpoints yet
        (for ``write_stage_records``).
    """
    refused, untrained = [], {}
    for name, folder in trained_stage_folders(settings).items():
        if not folder_holds_checkpoints(folder):
            untrained[name] = folder
            continue
        previous = read_record(folder)
        if previous is None:
            logger.warning(f"{folder} holds checkpoints but no {STAGE_RECORD}: not checked.")
            continue
        lines = record_differences(previous, stage_record(settings, name))
        if lines:
            refused.append(f"  stage {name!r} ({folder}):\n" + "\n".join(lines))
    if refused:
        raise ValueError(
            "These stages hold checkpoints trained with other settings; resuming them would "
            "report the old training under the new settings:\n" + "\n".join(refused) + "\n"
            "Rerun with the folder's settings, give another --output_folder, or remove the "
            "stage's folder to train it again. Nothing in the folder was changed."
        )
    return untrained


def write_stage_records(settings, untrained):
    """Writes the ``stage.json`` of each trained stage that holds no checkpoint yet.

    Arguments
    ---------
    settings : dict
        The study's plain settings.
    untrained : dict
        ``{name: folder}`` from ``check_stage_folders``.
    """
    if not sb.utils.distributed.if_main_process():
        return
    for name, folder in untrained.items():
        write_json(stage_record(settings, name), os.path.join(folder, STAGE_RECORD))
