"""Export of a trained run: a self-contained folder that ``SpeechLLMInference`` loads.

``export_trained_model`` writes, staged and renamed into place:

* ``model.ckpt``: the trainable tensors (adaptor, LoRA or the fine-tuned LLM);
* ``strategy.json``: how the LLM was trained (LoRA settings are needed to rebuild it);
* ``hyperparams.yaml``: ``INFERENCE_TEMPLATE`` with the run's settings filled in;
* ``base_model.json``: the base LLM's fingerprint (``speechbrain_sllm.model.fingerprint``);
* ``lora_adapter/`` (LoRA runs): a standard peft adapter folder that plain
  ``transformers`` + ``peft`` load onto the base LLM.

Authors
 * speechbrain-sllm developers 2026
"""

import dataclasses
import json
import os
import re
import shutil

import torch
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from speechbrain_sllm.checkpointing import TrainableState
from speechbrain_sllm.fsdp import is_sharded
from speechbrain_sllm.model.adaptors import ADAPTOR_TYPES, adaptor_type_of
from speechbrain_sllm.model.fingerprint import write_fingerprint

CHECKPOINT_FILE = "model.ckpt"
STRATEGY_FILE = "strategy.json"
# the hyperparams.yaml of every exported Whisper / wav2vec2 + HF causal LM model
INFERENCE_TEMPLATE = os.path.join(os.path.dirname(__file__), "inference_hyperparams.yaml")
ADAPTER_FOLDER = "lora_adapter"


def whole_trainable_state(model):
    """The trainable tensors of ``model`` as whole tensors, for export.

    Unsharded: ``TrainableState``'s tensors. FSDP-sharded: a collective (every
    rank calls it) that gathers one tensor at a time into CPU memory of the
    main process only (``torch.distributed.checkpoint``'s full, CPU-offloaded
    state dict), so no device ever holds the whole model; other ranks get ``{}``.

    Arguments
    ---------
    model : torch.nn.Module
        The trained model.

    Returns
    -------
    dict
        ``{name: tensor}`` with ``TrainableState``'s names.

    Example
    -------
    >>> net = torch.nn.Linear(2, 2)
    >>> sorted(whole_trainable_state(net))
    ['bias', 'weight']
    """
    trainable = TrainableState(model).state_dict()
    if not is_sharded(model):
        return trainable
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    gathered = get_model_state_dict(model, options=options)
    return {name: gathered[name] for name in trainable if name in gathered}


def export_trained_model(model, strategy, inference_yaml, folder, settings, trainable=None):
    """Writes a folder that ``SpeechLLMInference.from_hparams`` loads.

    Arguments
    ---------
    model : SpeechLLM
        The trained model (best checkpoint loaded; LoRA not merged).
    strategy : Strategy
        The strategy it was trained with.
    inference_yaml : str
        The template of ``hyperparams.yaml`` (``INFERENCE_TEMPLATE``).
    folder : str
        Output folder: written in a staging folder, then renamed into place
        (an earlier export is replaced whole; see ``replace_folder``).
    settings : dict
        Top-level keys of the template to fill in (``llm_source``,
        ``encoder_source``, ``adaptor_type``, ``adaptor_arguments``, ``instruction``, ...).
    trainable : dict or None
        The trainable tensors, whole (``whole_trainable_state``; None: read
        from ``model``, which must then not be sharded).
    """
    staging = sibling(folder, ".staging-")
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
    os.makedirs(staging)
    if trainable is None:
        trainable = whole_trainable_state(model)
    torch.save(trainable, os.path.join(staging, CHECKPOINT_FILE))
    saved = {
        "name": strategy.name,
        "train_llm": strategy.train_llm,
        "train_encoder": strategy.train_encoder,
        "lora": dataclasses.asdict(strategy.lora) if strategy.lora else None,
    }
    with open(os.path.join(staging, STRATEGY_FILE), "w") as handle:
        json.dump(saved, handle, indent=1)
    with open(os.path.join(staging, "hyperparams.yaml"), "w") as handle:
        handle.write(filled_template(inference_yaml, settings))
    if "llm_source" in settings:
        write_fingerprint(staging, settings["llm_source"])
    if strategy.lora is not None:
        llm_state = {name[4:]: t for name, t in trainable.items() if name.startswith("llm.")}
        model.llm.save_pretrained(os.path.join(staging, ADAPTER_FOLDER), state_dict=llm_state)
        sort_adapter_config(os.path.join(staging, ADAPTER_FOLDER, "adapter_config.json"))
    replace_folder(staging, folder)


def sort_adapter_config(path):
    """Rewrites a peft ``adapter_config.json`` with its set-valued lists sorted.

    peft writes ``target_modules`` from a Python set, in an order that changes
    from one process to the next; sorted, two exports of the same run are
    byte-identical.

    Arguments
    ---------
    path : str
        The adapter's ``adapter_config.json``.
    """
    with open(path) as handle:
        config = json.load(handle)
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    with open(path + ".tmp", "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def sibling(folder, prefix):
    """A hidden folder next to ``folder``: ``<parent>/<prefix><name>``."""
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder), prefix + os.path.basename(folder))


def replace_folder(staging, folder):
    """Moves a complete ``staging`` folder to ``folder``, replacing an earlier one.

    Two renames: the earlier folder aside, the new one into place. A process
    killed at any point leaves the earlier folder whole, the new one whole, or
    no folder (the earlier one then waits beside it as ``.old-<name>``), never
    a mix of files of both.

    Arguments
    ---------
    staging : str
        The complete new folder.
    folder : str
        Where it goes.

    Example
    -------
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> for name in ("new", "out"):
    ...     os.makedirs(os.path.join(root, name))
    ...     _ = open(os.path.join(root, name, name), "w").write(name)
    >>> replace_folder(os.path.join(root, "new"), os.path.join(root, "out"))
    >>> sorted(os.listdir(root)), os.listdir(os.path.join(root, "out"))
    (['out'], ['new'])
    """
    old = sibling(folder, ".old-")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def filled_template(inference_yaml, settings):
    """The text of ``inference_yaml`` with the top-level keys of ``settings`` filled in."""
    with open(inference_yaml) as handle:
        text = handle.read()
    for key, value in settings.items():
        text, count = re.subn(
            rf"^{key}:.*$", f"{key}: {json.dumps(value)}", text, count=1, flags=re.M
        )
        if count != 1:
            raise KeyError(f"{inference_yaml}: no top-level key {key!r} to fill in.")
    return text


def inference_settings(hparams, model):
    """The keys of an inference yaml that describe a trained model, from its run's hparams.

    Arguments
    ---------
    hparams : dict
        The run's yaml (``llm_source``, ``encoder_source``, ``prompt``,
        ``sample_rate``, ``evaluation``: its ``max_new_tokens`` and ``num_beams``).
    model : SpeechLLM
        The trained model (its encoder window, LLM dtype and adaptor).

    Returns
    -------
    dict
    """

    def source(path):
        """A local folder as an absolute path (the export may be loaded from elsewhere)."""
        return os.path.abspath(path) if os.path.isdir(path) else path

    return {
        "llm_source": source(hparams["llm_source"]),
        "encoder_source": source(hparams["encoder_source"]),
        "encoder_window": getattr(model.encoder, "window", "full"),
        "llm_dtype": str(model.llm.dtype).replace("torch.", ""),
        "adaptor_type": adaptor_type_of(model.adaptor),
        "adaptor_arguments": adaptor_arguments(model.adaptor, source),
        "instruction": hparams["prompt"].instruction,
        "sample_rate": hparams["sample_rate"],
        "max_new_tokens": hparams["evaluation"].max_new_tokens,
        "num_beams": hparams["evaluation"].num_beams,
    }


def adaptor_arguments(adaptor, source):
    """The arguments that rebuild ``adaptor`` (its checkpoint folder made absolute).

    Arguments
    ---------
    adaptor : torch.nn.Module
        An adaptor of ``speechbrain_sllm.model.adaptors``.
    source : callable
        Maps a ``source`` argument to the path an export records.

    Returns
    -------
    dict
    """
    if adaptor_type_of(adaptor) is None or not hasattr(adaptor, "arguments"):
        raise TypeError(
            f"{type(adaptor).__name__} cannot be exported: the inference yaml rebuilds "
            f"one of speechbrain_sllm.model.adaptors' {list(ADAPTOR_TYPES)}."
        )
    arguments = dict(adaptor.arguments)
    if arguments.get("source") is None and "source" in arguments:
        raise TypeError(
            f"{type(adaptor).__name__} built from a config (no `source`) cannot be "
            "exported: the inference yaml loads the decoder from its checkpoint."
        )
    for key in ("source", "llm_source"):  # the checkpoints the rebuild loads
        if arguments.get(key) is not None:
            arguments[key] = source(arguments[key])
    return arguments


def export_stage(model, strategy, folder, hparams, inference_yaml=INFERENCE_TEMPLATE):
    """Writes ``<folder>/inference`` for ``SpeechLLMInference.from_hparams`` (LoRA: a peft adapter).

    Every rank calls it (an FSDP model is gathered); the main process writes.

    Arguments
    ---------
    model : SpeechLLM
        The trained model (LoRA not merged).
    strategy : Strategy
        Its strategy.
    folder : str
        The stage's folder.
    hparams : dict
        The run's yaml (see ``inference_settings``).
    inference_yaml : str
        The template of ``hyperparams.yaml``.

    Returns
    -------
    str
        The exported folder.
    """
    export = os.path.join(folder, "inference")
    frozen_adaptor = model.adaptor is not None and not strategy.train_adaptor
    if frozen_adaptor:  # the export carries the adaptor a later stage kept as it was
        model.adaptor.requires_grad_(True)
    try:
        trainable = whole_trainable_state(model)
    finally:
        if frozen_adaptor:
            model.adaptor.requires_grad_(False)
    if if_main_process():
        settings = inference_settings(hparams, model)
        export_trained_model(model, strategy, inference_yaml, export, settings, trainable)
    ddp_barrier()
    return export


def export_recipe_run(hparams, inference_yaml=INFERENCE_TEMPLATE):
    """Exports a recipe's trained model to ``<output_folder>/inference``.

    Every rank calls it (an FSDP model is gathered); the main process writes.

    Arguments
    ---------
    hparams : dict
        The recipe's loaded yaml (``model``, ``training_strategy``, ``llm_source``,
        ``encoder_source``, ``prompt``, ``sample_rate``, ``evaluation``).
    inference_yaml : str
        The template of ``hyperparams.yaml`` (default: the package's).

    Returns
    -------
    str
        The exported folder.
    """
    model = hparams["model"]
    settings = inference_settings(hparams, model)
    folder = os.path.join(hparams["output_folder"], "inference")
    trainable = whole_trainable_state(model)  # a collective under FSDP
    if if_main_process():
        strategy = hparams["training_strategy"]
        export_trained_model(model, strategy, inference_yaml, folder, settings, trainable)
    ddp_barrier()
    return folder
