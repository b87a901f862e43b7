"""Inference with a trained speech LLM, the SpeechBrain way, and export of a trained run.

``export_trained_model`` writes a self-contained folder from a finished run:

* ``model.ckpt``: the trainable tensors (adaptor, LoRA or the fine-tuned LLM);
* ``strategy.json``: how the LLM was trained (LoRA settings are needed to rebuild it);
* ``hyperparams.yaml``: ``INFERENCE_TEMPLATE`` with the run's settings filled in;
* ``lora_adapter/`` (LoRA runs): a standard peft adapter folder that plain
  ``transformers`` + ``peft`` load onto the base LLM.

``SpeechLLMInference.from_hparams(source=folder)`` then answers or transcribes
audio files or batches.

Authors
 * speechbrain-sllm developers 2026
"""

import dataclasses
import json
import os
import re
import shutil

import torch
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from speechbrain_sllm.checkpointing import TrainableState
from speechbrain_sllm.data.dataio import AudioError, load_audio
from speechbrain_sllm.fsdp import is_sharded
from speechbrain_sllm.model.adaptors import ADAPTOR_TYPES, adaptor_type_of
from speechbrain_sllm.model.fingerprint import check_fingerprint, write_fingerprint
from speechbrain_sllm.model.speech_llm import SpeechLLM
from speechbrain_sllm.strategies import LoRASettings, apply_strategy
from speechbrain_sllm.strategies.core import Strategy

CHECKPOINT_FILE = "model.ckpt"
STRATEGY_FILE = "strategy.json"
# the hyperparams.yaml of every exported Whisper / wav2vec2 + HF causal LM model
INFERENCE_TEMPLATE = os.path.join(os.path.dirname(__file__), "inference_hyperparams.yaml")
ADAPTER_FOLDER = "lora_adapter"


def speech_inputs(model, prompt, wavs, wav_lens):
    """The left-padded generation inputs of a batch of spoken questions.

    Arguments
    ---------
    model : SpeechLLM
        The model.
    prompt : ChatPrompt
        Prompt builder (the speech is spliced at its placeholder).
    wavs : torch.Tensor
        ``(B, S)`` waveforms on the model's device.
    wav_lens : torch.Tensor
        ``(B,)`` relative lengths.

    Returns
    -------
    dict
        Output of ``SpeechLLM.build_batch(..., padding_side="left")``.
    """
    prefix, suffix = prompt.speech_prompt()
    speech = model.speech_embeddings(wavs, wav_lens)
    count = len(speech)
    return model.build_batch([prefix] * count, speech, [suffix] * count, padding_side="left")


def generated_texts(model, tokenizer, inputs, max_new_tokens=32, num_beams=1):
    """Generates from left-padded ``inputs`` and decodes each answer to text.

    Arguments
    ---------
    model : SpeechLLM
        The model (eval mode).
    tokenizer : HFTokenizer or SentencePieceTokenizer
        Decodes the generated ids.
    inputs : dict
        Output of ``SpeechLLM.build_batch(..., padding_side="left")``.
    max_new_tokens : int
        Decoding budget.
    num_beams : int
        Beam size (1: greedy).

    Returns
    -------
    list of str
    """
    outputs = model.generate(
        inputs,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    return [tokenizer.decode(out) for out in outputs]


def speech_answers(model, prompt, tokenizer, wavs, wav_lens, max_new_tokens=32, num_beams=1):
    """Generates the text answer to each spoken question of a batch.

    Arguments
    ---------
    model : SpeechLLM
        The model (eval mode).
    prompt : ChatPrompt
        Prompt builder (the speech is spliced at its placeholder).
    tokenizer : HFTokenizer or SentencePieceTokenizer
        Decodes the generated ids.
    wavs : torch.Tensor
        ``(B, S)`` waveforms on the model's device.
    wav_lens : torch.Tensor
        ``(B,)`` relative lengths.
    max_new_tokens : int
        Decoding budget.
    num_beams : int
        Beam size (1: greedy).

    Returns
    -------
    list of str
    """
    inputs = speech_inputs(model, prompt, wavs, wav_lens)
    return generated_texts(model, tokenizer, inputs, max_new_tokens, num_beams)


def rebuild_trained_speech_llm(folder, llm, encoder, adaptor):
    """Rebuilds the architecture of a trained ``SpeechLLM`` (LoRA wrapping included).

    The trained tensors are loaded afterwards by the inference yaml's
    ``pretrainer`` (``TrainableState`` of this model, from ``model.ckpt``).

    Arguments
    ---------
    folder : str
        Folder written by ``export_trained_model``.
    llm : transformers.PreTrainedModel
        The base LLM the run started from.
    encoder : SpeechEncoder
        The speech encoder of the run.
    adaptor : torch.nn.Module
        A freshly built adaptor of the run's shape.

    Returns
    -------
    SpeechLLM
    """
    with open(os.path.join(folder, STRATEGY_FILE)) as handle:
        saved = json.load(handle)
    lora = LoRASettings(**saved["lora"]) if saved.get("lora") else None
    # the learning-rate rule does not matter here: only which tensors were trained
    strategy = Strategy(
        name=saved["name"],
        train_llm=saved["train_llm"],
        lora=lora,
        train_encoder=saved["train_encoder"],
    )
    return apply_strategy(SpeechLLM(llm, encoder, adaptor), strategy)


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
        ``sample_rate``, ``max_new_tokens``, ``num_beams``).
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
        "max_new_tokens": hparams["max_new_tokens"],
        "num_beams": hparams["num_beams"],
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
    if "source" in arguments:
        arguments["source"] = source(arguments["source"])
    return arguments


def export_recipe_run(hparams, inference_yaml=INFERENCE_TEMPLATE):
    """Exports a recipe's trained model to ``<output_folder>/inference``.

    Every rank calls it (an FSDP model is gathered); the main process writes.

    Arguments
    ---------
    hparams : dict
        The recipe's loaded yaml (``model``, ``training_strategy``, ``llm_source``,
        ``encoder_source``, ``prompt``, ``sample_rate``, ``max_new_tokens``,
        ``num_beams``).
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


class UntrustedYamlError(ValueError):
    """An exported yaml that names objects outside the allow-list."""


class SpeechLLMInference(Pretrained):
    """Answers spoken questions (or transcribes speech) with an exported speech LLM.

    Load with ``SpeechLLMInference.from_hparams(source=folder)``, where ``folder``
    was written by ``export_trained_model`` (the recipes write ``<output>/inference``).

    Arguments
    ---------
    *args : tuple
        See ``speechbrain.inference.interfaces.Pretrained``.
    **kwargs : dict
        See ``speechbrain.inference.interfaces.Pretrained``.
    """

    HPARAMS_NEEDED = ["prompt", "tokenizer", "sample_rate", "max_new_tokens"]
    MODULES_NEEDED = ["model"]

    @classmethod
    def from_hparams(
        cls, source, hparams_file="hyperparams.yaml", overrides=None, trust_yaml=False, **kwargs
    ):
        """Loads an exported folder; its own location fills ``trained_folder``.

        Loading a yaml runs the objects it names. By default every ``!new:``,
        ``!name:``, ``!apply:`` and ``!module:`` target must belong to this
        package, speechbrain, torch, transformers or peft (not their shell / hub
        runners) and the file may not ``!include`` another one; anything else is
        refused with the targets named, before any of it runs.

        Arguments
        ---------
        source : str
            The exported folder.
        hparams_file : str
            The yaml inside it.
        overrides : dict or None
            Further yaml overrides.
        trust_yaml : bool
            Load a yaml whose targets are off the allow-list (only one you wrote or read).
        **kwargs : dict
            Passed to SpeechBrain's ``Pretrained.from_hparams`` (``run_opts``, ...).

        Returns
        -------
        SpeechLLMInference
        """
        if not os.path.isdir(source):
            raise FileNotFoundError(
                f"SpeechLLMInference: {source!r} is not a folder; pass the folder written "
                "by export_trained_model (a recipe's <output_folder>/inference)."
            )
        check_export_files(source, hparams_file)
        if not trust_yaml:
            check_yaml_targets(os.path.join(source, hparams_file))
        check_model_sources(source, hparams_file, overrides)
        overrides = dict(overrides or {}, trained_folder=os.path.abspath(source))
        return super().from_hparams(
            source=source,
            hparams_file=hparams_file,
            overrides=overrides,
            savedir=os.path.abspath(source),
            **kwargs,
        )

    def answer_batch(self, wavs, wav_lens):
        """Answers (or transcribes) a batch of waveforms.

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, S)`` waveforms at ``sample_rate``.
        wav_lens : torch.Tensor
            ``(B,)`` relative lengths.

        Returns
        -------
        list of str
        """
        finite = torch.isfinite(wavs).all(dim=1)
        if not finite.all():
            positions = (~finite).nonzero().flatten().tolist()
            raise AudioError(
                f"Audio at batch positions {positions} holds NaN or infinite samples: the model "
                "would answer it with noise. Check the file or the loader that produced it."
            )
        with torch.no_grad(), self.inference_ctx:
            return speech_answers(
                self.mods.model,
                self.hparams.prompt,
                self.hparams.tokenizer,
                wavs.to(self.device),
                wav_lens.to(self.device),
                max_new_tokens=self.hparams.max_new_tokens,
                num_beams=getattr(self.hparams, "num_beams", 1),
            )

    def answer_file(self, path):
        """Answers the spoken question in an audio file (any rate, mono or not).

        Arguments
        ---------
        path : str
            Audio file.

        Returns
        -------
        str
        """
        wav = load_audio(path, self.hparams.sample_rate)
        try:
            return self.answer_batch(wav.unsqueeze(0), torch.ones(1))[0]
        except AudioError as error:
            raise AudioError(f"{path}: {error}") from error

    def transcribe_file(self, path):
        """Transcribes an audio file (a model trained on ASR, e.g. the LibriSpeech recipe).

        Arguments
        ---------
        path : str
            Audio file.

        Returns
        -------
        str
        """
        return self.answer_file(path)

    def forward(self, wavs, wav_lens):
        """See ``answer_batch``."""
        return self.answer_batch(wavs, wav_lens)
