"""Shared fixtures: tiny HF configs, a sentencepiece tokenizer and real spoken QA data."""

import os

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, WhisperConfig

from speechbrain_sllm.data.prompts import ChatPrompt
from speechbrain_sllm.data.synthetic import (
    make_knowledge_base,
    make_qa_pairs,
    speak_pairs,
    text_rows,
    write_manifest,
)
from speechbrain_sllm.data.tokenizers import train_sentencepiece
from speechbrain_sllm.data.tts import EspeakTTS
from speechbrain_sllm.model.adaptors import FrameStackAdaptor
from speechbrain_sllm.model.encoders import FbankTransformerEncoder
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm

HIDDEN = 32


def tiny_lm_config(config_class, vocab_size=64, layers=3):
    return config_class(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        initializer_range=0.2,  # input-sensitive logits, so a frozen LLM can be steered
    )


def llama_config(vocab_size=64, layers=3):
    return tiny_lm_config(LlamaConfig, vocab_size, layers)


def qwen2_config(vocab_size=64, layers=3):
    return tiny_lm_config(Qwen2Config, vocab_size, layers)


def tiny_whisper_config(max_source_positions=50):
    return WhisperConfig(
        d_model=16,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        num_mel_bins=20,
        max_source_positions=max_source_positions,
    )


@pytest.fixture(params=["llama", "qwen2"])
def llm_config(request):
    return llama_config() if request.param == "llama" else qwen2_config()


def tiny_speech_llm(config=None, seed=0):
    torch.manual_seed(seed)
    llm = load_causal_lm(config=config or llama_config())
    encoder = FbankTransformerEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, freeze=False)
    adaptor = FrameStackAdaptor(16, HIDDEN, stack=2, hidden_size=32)
    return SpeechLLM(llm, encoder, adaptor)


@pytest.fixture(scope="session")
def kb_pairs():
    return make_qa_pairs(make_knowledge_base(3, seed=7))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, kb_pairs):
    texts = [f"User: {p['question']}" for p in kb_pairs] + [p["answer"] for p in kb_pairs]
    texts += ["Assistant:"] * 5
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm")), vocab_size=64)


@pytest.fixture(scope="session")
def prompt(tokenizer):
    return ChatPrompt(tokenizer)


@pytest.fixture(scope="session")
def manifests(tmp_path_factory, kb_pairs):
    """Real spoken questions (eSpeak NG) for 3 invented countries: speech + text manifests."""
    folder = str(tmp_path_factory.mktemp("qa"))
    pairs = [p for p in kb_pairs if p["template"] == 0]
    rows = speak_pairs(
        pairs, os.path.join(folder, "wav"), [("en-us", 220)], EspeakTTS(), "utt", progress=False
    )
    paths = {"speech": os.path.join(folder, "speech.csv"), "text": os.path.join(folder, "text.csv")}
    write_manifest(rows, paths["speech"])
    write_manifest(text_rows(pairs, "txt"), paths["text"])
    return paths
