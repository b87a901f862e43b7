"""The cascade reference: Whisper's own decoder transcribes, the text LLM answers."""

import csv
import os

import pytest
import soundfile
import torch
from conftest import LLAMA_QUESTIONS

from speechbrain_sllm.cascade import (
    WhisperTranscriber,
    read_questions,
    transcript_wer,
    write_transcribed_manifest,
)
from speechbrain_sllm.data.tts import EspeakTTS

QUESTIONS = [
    "What is the capital of France?",
    "Who was the first president of the United States?",
    "What is the highest mountain peak in North America?",
]


def spoken_questions(folder):
    """(wav paths, questions): LLaMA Questions' first recordings, or eSpeak clips."""
    tsv = os.path.join(LLAMA_QUESTIONS, "llama_questions_300.tsv")
    if os.path.isfile(tsv):
        with open(tsv, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))[:4]
        wavs = [os.path.join(LLAMA_QUESTIONS, row["Wav Filename"]) for row in rows]
        return wavs, [row["Questions"] for row in rows]
    tts, wavs = EspeakTTS(), []
    for index, question in enumerate(QUESTIONS):
        wavs.append(os.path.join(folder, f"{index}.wav"))
        soundfile.write(wavs[-1], tts.synthesize(question).numpy(), 16000)
    return wavs, QUESTIONS


def padded(wav_files):
    """A padded batch and SpeechBrain's relative lengths."""
    clips = [torch.tensor(soundfile.read(path, dtype="float32")[0]) for path in wav_files]
    longest = max(len(clip) for clip in clips)
    wavs = torch.stack([torch.nn.functional.pad(c, (0, longest - len(c))) for c in clips])
    return wavs, torch.tensor([len(clip) / longest for clip in clips])


def test_whisper_decoder_transcribes_spoken_questions(real_models, tmp_path):
    wav_files, questions = spoken_questions(tmp_path)
    transcriber = WhisperTranscriber(real_models["whisper"])
    wavs, lens = padded(wav_files)
    texts = transcriber.transcribe(wavs, lens)
    assert len(texts) == len(questions)
    ids = [str(i) for i in range(len(texts))]
    wer = transcript_wer(dict(zip(ids, texts)), dict(zip(ids, questions)))
    assert wer < 15.0, list(zip(texts, questions))
    # padding does not leak into a clip's transcript: alone or in the batch, the same
    alone = transcriber.transcribe(wavs[1:2, : int(lens[1] * wavs.shape[1])], torch.ones(1))
    assert alone == texts[1:2]


def test_transcript_wer_counts_word_errors_after_normalisation():
    refs = {"a": "Who wrote Romeo and Juliet?", "b": "What is the capital of France?"}
    hyps = {"a": "who wrote romeo and juliet", "b": "what is capital of spain"}
    # case and punctuation do not count; the article "the" is dropped from b's reference,
    # leaving 5 + 5 reference words and one substitution (france -> spain)
    assert transcript_wer(hyps, refs) == pytest.approx(100 * 1 / 10)
    hyps["a"] = "who wrote"  # three deletions more
    assert transcript_wer(hyps, refs) == pytest.approx(100 * 4 / 10)


def test_transcribed_manifest_replaces_only_the_question(tmp_path):
    manifest = tmp_path / "test.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "wav", "duration", "question", "answer"])
        writer.writerow(["q1", "1.wav", "2.0", "what is the capital of france", "Paris"])
        writer.writerow(["q2", "2.wav", "2.5", "who wrote hamlet", "Shakespeare|W. Shakespeare"])
    out = write_transcribed_manifest(
        str(manifest), {"q1": "what is the capital of francs"}, str(tmp_path / "out" / "test.csv")
    )
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [
        {
            "ID": "q1",
            "wav": "1.wav",
            "duration": "2.0",
            "question": "what is the capital of francs",
            "answer": "Paris",
        }
    ]
    assert read_questions(out) == {"q1": "what is the capital of francs"}


class HalfRight:
    """An evaluator double: every scored set gets 50% (records what it was given)."""

    def __init__(self):
        self.scored = []

    def qa_accuracy(self, dataset, mode, output_file=None):
        self.scored.append((sorted(dataset), mode))
        return 50.0


def test_an_empty_transcript_counts_as_a_wrong_answer(tmp_path):
    from speechbrain_sllm.cascade import cascade_reference

    manifest = tmp_path / "test.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "wav", "duration", "question", "answer"])
        for item in ("q1", "q2", "q3", "q4"):
            writer.writerow([item, f"{item}.wav", "1.0", f"question {item}", "x"])
    heard = {"q1": "question q1", "q2": "question q2", "q3": "question q3", "q4": ""}
    transcribed = write_transcribed_manifest(str(manifest), heard, str(tmp_path / "t.csv"))
    evaluator = HalfRight()
    results = cascade_reference(
        {"set": transcribed}, {"set": str(manifest)}, evaluator,
        lambda path: [row["ID"] for row in csv.DictReader(open(path)) if row["question"]],
        str(tmp_path),
    )  # fmt: skip
    assert evaluator.scored == [(["q1", "q2", "q3"], "text")]
    assert results["set_s2t"] == pytest.approx(50.0 * 3 / 4) and results["set_unheard"] == 1
    assert results["set_wer"] == pytest.approx(100 * 2 / 8)  # q4's two words deleted


def test_whisper_base_from_its_two_pypi_parts_transcribes_and_encodes(whisper_base, tmp_path):
    """The stronger encoder option: Whisper base (6 layers, 512 dims) converted like tiny.en."""
    from speechbrain_sllm.model.encoders import HFWhisperEncoder

    wav_files, questions = spoken_questions(tmp_path)
    transcriber = WhisperTranscriber(whisper_base)
    texts = transcriber.transcribe(*padded(wav_files))
    ids = [str(i) for i in range(len(texts))]
    wer = transcript_wer(dict(zip(ids, texts)), dict(zip(ids, questions)))
    assert wer < 15.0, list(zip(texts, questions))
    encoder = HFWhisperEncoder(source=whisper_base, window="batch")
    features, _ = encoder(*padded(wav_files[:1]))
    assert features.shape[-1] == encoder.output_size == 512
