"""Inference with a trained speech LLM, the SpeechBrain way.

``SpeechLLMInference.from_hparams(source=folder)`` loads a folder written by
``speechbrain_sllm.model_export.export_trained_model`` (a recipe's
``<output_folder>/inference``), after the checks of
``speechbrain_sllm.export_checks``, and answers or transcribes audio files or
batches. The generation helpers here are shared with evaluation.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import os

import torch
from speechbrain.inference.interfaces import Pretrained

from speechbrain_sllm.data.dataio import AudioError, load_audio
from speechbrain_sllm.export_checks import (
    check_export_files,
    check_model_sources,
    check_yaml_targets,
)
from speechbrain_sllm.model.speech_llm import SpeechLLM
from speechbrain_sllm.model_export import STRATEGY_FILE
from speechbrain_sllm.strategies import LoRASettings, apply_strategy
from speechbrain_sllm.strategies.core import Strategy


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

    def forward(self, wavs, wav_lens):
        """See ``answer_batch``."""
        return self.answer_batch(wavs, wav_lens)
