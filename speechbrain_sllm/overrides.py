"""Command-line overrides of a recipe yaml: resolved without building, and refused with the fix.

A retired key (``--ft_epochs``) is refused naming the key that replaced it
(``--finetune="{epochs: ...}"``); a yaml key that argparse would read as a
SpeechBrain run option is named before it is silently ignored.

Authors
 * speechbrain-sllm developers 2026
"""

import dataclasses
import io

import ruamel.yaml
from hyperpyyaml import resolve_references
from speechbrain.core import RunOptions

# Keys renamed in the recipes' yamls: an override with the old name is refused with the new
# one; a flat study key that became a field of a nested one names the field too
STUDY_FIELDS = {
    "finetune": {
        "ft_epochs": "epochs",
        "ft_batch_size": "batch_size",
        "ft_adaptor_lr": "adaptor_lr",
        "warmup_fraction": "warmup_fraction",
        "opt_class": "opt_class",
        "train_encoder": "train_encoder",
        "interpolation_alphas": "interpolation_alphas",
    },
    "align": {
        "alignment": "objectives",
        "align_objectives": "objectives",
        "align_ctc_epochs": "ctc_epochs",
        "align_ctc_lr": "ctc_lr",
        "align_ctc_scale": "ctc_scale",
        "align_ctc_norm_weight": "ctc_norm_weight",
        "align_targets": "targets",
        "align_epochs": "epochs",
        "align_lr": "lr",
        "align_distill_topk": "teacher_topk",
    },
    "importance": {
        "importance_estimator": "estimator",
        "importance_scope": "scope",
        "importance_fraction": "fraction",
        "importance_topk": "topk",
        "importance_batch_size": "batch_size",
        "zeroing_fraction": "zeroing_fraction",
    },
    "evaluation": {
        "eval_batch_size": "batch_size",
        "max_new_tokens": "max_new_tokens",
        "num_beams": "num_beams",
        "answer_match": "answer_match",
    },
    "anchor": {"anchor_strength": "strength"},
}
NESTED_FIELDS = {old: field for fields in STUDY_FIELDS.values() for old, field in fields.items()}
RENAMED_KEYS = {
    "save_folder": "manifest_folder",  # a study's manifests and audio (WebQuestions)
    "data_folder": "manifest_folder",  # MiniSpokenQA generates its data: no data_folder to read
    "layerwise_lambda": "layerwise_lr",  # the rule's lambda: --layerwise_lr="{lam: 0.2}"
    "strategies": "stages",  # a study's fine-tuning stages are named in `stages`
    "stop_after": "stages",  # --stages=[cascade,align] stops after stage 1
    "ft_lr": "stage_choices",  # each fine-tuning stage has its own `lr`
    "mitigation_choices": "stage_choices",  # a stage lists its mitigations
    "cascade_asr": "stage_choices",  # the cascade stage's `transcriber`
    "eval_files": "test_files",  # VoiceAssistant: the held-out sets are test sets
    **{old: key for key, fields in STUDY_FIELDS.items() for old in fields},
}

# Values renamed (one name per concept): the old one is refused naming the new
RENAMED_VALUES = {
    "self_distilled": "base_answers",  # a study's `targets`: the base LLM's own answers
    "distill": "text_teacher",  # an `align` objective: the LLM given text teaches itself
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
        new = RENAMED_KEYS[name]
        flag = (
            f'--{new}="{{{NESTED_FIELDS[name]}: ...}}"' if name in NESTED_FIELDS else f"--{new}=..."
        )
        return f"{hparams_file}: `{name}` is now `{new}` (one name per concept); use {flag}"
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
