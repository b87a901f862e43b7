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
from speechbrain_sllm.evaluation import EvaluationSettings

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


def test_transcript_adaptor_reads_the_decoders_states_of_its_own_transcript(real_models, tmp_path):
    from hyperpyyaml import load_hyperpyyaml
    from transformers import AutoTokenizer

    from speechbrain_sllm.model.encoders import HFWhisperEncoder
    from speechbrain_sllm.model.whisper_adaptors import WhisperTranscriptAdaptor

    wav_files, questions = spoken_questions(tmp_path)
    encoder = HFWhisperEncoder(source=real_models["whisper"], window="batch").eval()
    adaptor = WhisperTranscriptAdaptor(24, source=real_models["whisper"], upsample=2)
    tokenizer = AutoTokenizer.from_pretrained(real_models["whisper"])
    wavs, lens = padded(wav_files)
    with torch.no_grad():
        frames, frame_lens = encoder(wavs, lens)
    valid = torch.round(frame_lens * frames.shape[1]).long().tolist()
    alone = [adaptor.decoding.transcribe(frames[i : i + 1, : valid[i]]) for i in range(len(valid))]
    texts = {str(i): tokenizer.decode(tokens[0][0]) for i, tokens in enumerate(alone)}
    # frames trimmed to the clip: the transcript ends where the decoder starts over
    assert transcript_wer(texts, dict(zip(texts, questions))) < 15.0, texts
    # each state is the decoder's, teacher-forced on the prompt and the transcript
    tokens, states = alone[0][0][0], alone[0][1][0]
    ids = torch.tensor([adaptor.decoding.prompt + tokens])
    with torch.no_grad():
        forced = adaptor.decoder(input_ids=ids, encoder_hidden_states=frames[:1, : valid[0]])
    start = len(adaptor.decoding.prompt) - 1
    expected = forced.last_hidden_state[0, start : start + len(tokens)]
    assert torch.allclose(states, expected, atol=5e-4)  # cached decoding: float error only
    # the batch: each clip its own transcript, padding never read, upsampled lengths
    embeds, out_lens = adaptor(frames, frame_lens)
    sizes = [len(tokens[0][0]) for tokens in alone]
    assert embeds.shape == (len(sizes), 2 * max(sizes), 24)
    assert torch.allclose(out_lens, torch.tensor(sizes) / max(sizes))
    first = adaptor.proj(alone[0][1][0]).reshape(-1, 24)
    assert torch.allclose(embeds[0, : 2 * sizes[0]], first, atol=1e-5)
    # seen frames are not decoded again; only the projection trains
    adaptor.decoding.transcribe = None  # a second decoding would fail
    again, _ = adaptor(frames, frame_lens)
    assert torch.equal(again, embeds)
    again.sum().backward()
    assert adaptor.proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in adaptor.decoder.parameters())
    fragment = os.path.join(os.path.dirname(__file__), "..", "hparams", "adaptors")
    recipe = f"adaptor: !include:{fragment}/whisper_transcript.yaml\n    output_size: 24\n"
    built = load_hyperpyyaml(recipe + f"    source: {real_models['whisper']}\n")["adaptor"]
    assert built.decoding.prompt == adaptor.decoding.prompt and built.upsample == 2


def test_a_speech_llm_with_the_transcript_adaptor_is_exported_and_loads_back(real_models, tmp_path):
    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import HFTokenizer
    from speechbrain_sllm.inference import SpeechLLMInference
    from speechbrain_sllm.model.encoders import HFWhisperEncoder
    from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
    from speechbrain_sllm.model.whisper_adaptors import WhisperTranscriptAdaptor
    from speechbrain_sllm.model_export import (
        INFERENCE_TEMPLATE,
        export_trained_model,
        inference_settings,
    )
    from speechbrain_sllm.strategies import apply_strategy, build_strategy

    torch.manual_seed(0)
    encoder = HFWhisperEncoder(source=real_models["whisper"], window="batch")
    adaptor = WhisperTranscriptAdaptor(576, source=real_models["whisper"], hidden_size=64)
    model = SpeechLLM(load_causal_lm(real_models["llm"]), encoder, adaptor)
    strategy = build_strategy("frozen_llm")
    apply_strategy(model, strategy)  # stage 1: the LLM frozen, the adaptor trained
    assert not any(p.requires_grad for p in adaptor.decoder.parameters())
    assert all(p.requires_grad for p in adaptor.proj.parameters())
    hparams = {
        "llm_source": real_models["llm"],
        "encoder_source": real_models["whisper"],
        "prompt": ChatPrompt(HFTokenizer(real_models["llm"]), instruction="{question}"),
        "sample_rate": 16000,
        "evaluation": EvaluationSettings(max_new_tokens=8),
    }
    folder = str(tmp_path / "inference")
    settings = inference_settings(hparams, model)
    assert settings["adaptor_type"] == "WhisperTranscriptAdaptor"
    assert settings["adaptor_arguments"]["hidden_size"] == 64
    export_trained_model(model, strategy, INFERENCE_TEMPLATE, folder, settings)
    assistant = SpeechLLMInference.from_hparams(source=folder)
    rebuilt = assistant.mods.model.adaptor
    assert isinstance(rebuilt, WhisperTranscriptAdaptor)
    exported = torch.load(os.path.join(folder, "model.ckpt"), weights_only=True)
    assert exported and not any("decoder" in name for name in exported)
    for name, tensor in adaptor.proj.state_dict().items():  # the trained projection, loaded
        assert torch.equal(rebuilt.proj.state_dict()[name], tensor), name
    wav_files, _ = spoken_questions(tmp_path)
    assert isinstance(assistant.answer_file(wav_files[0]), str)


def test_one_whisper_checkpoint_is_read_once_and_each_part_keeps_its_own_weights(
    real_models, monkeypatch
):
    """In a study's scope the encoder, the transcript adaptor's decoder and the cascade's
    recogniser read the checkpoint once between them; each holds its own copy (one trains,
    the others do not move), equal to the checkpoint's; the scope's end frees it. Outside
    a scope (a training recipe) each part reads its own and nothing is held."""
    from transformers import PreTrainedModel

    from speechbrain_sllm.model import pretrained
    from speechbrain_sllm.model.encoders import HFWhisperEncoder
    from speechbrain_sllm.model.whisper_adaptors import WhisperTranscriptAdaptor

    reads, original = [], PreTrainedModel.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        reads.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counted))
    source = real_models["whisper"]
    with pretrained.sharing_pretrained():
        encoder = HFWhisperEncoder(source=source)
        adaptor = WhisperTranscriptAdaptor(32, source)
        transcriber = WhisperTranscriber(source)
        assert pretrained._whisper_checkpoint.cache_info().currsize == 1
    assert reads == ["WhisperForConditionalGeneration"]
    assert pretrained._whisper_checkpoint.cache_info().currsize == 0  # freed
    heard = transcriber.model.model
    for mine, theirs in ((encoder.encoder, heard.encoder), (adaptor.decoder, heard.decoder)):
        pairs = zip(mine.state_dict().values(), theirs.state_dict().values())
        assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in pairs)
    with torch.no_grad():
        next(encoder.encoder.parameters()).add_(1.0)
    assert not torch.equal(next(encoder.encoder.parameters()), next(heard.encoder.parameters()))
    HFWhisperEncoder(source=source)  # outside a scope: the part alone, nothing held
    assert reads == ["WhisperForConditionalGeneration", "WhisperModel"]
    assert pretrained._whisper_checkpoint.cache_info().currsize == 0


def test_bridge_adaptor_hands_the_llm_the_embeddings_of_what_whisper_heard(real_models, tmp_path):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speechbrain_sllm.model.adaptors import build_adaptor
    from speechbrain_sllm.model.encoders import HFWhisperEncoder
    from speechbrain_sllm.model.whisper_adaptors import WhisperBridgeAdaptor, bridge_table

    table = bridge_table(real_models["whisper"], real_models["llm"])
    adaptor = WhisperBridgeAdaptor(576, real_models["whisper"], table, real_models["llm"])
    llm_tokenizer = AutoTokenizer.from_pretrained(real_models["llm"])
    embeddings = AutoModelForCausalLM.from_pretrained(real_models["llm"]).get_input_embeddings()
    # the table: a Whisper token's text as the mean of the LLM's embeddings of that text
    whisper_tokenizer = AutoTokenizer.from_pretrained(real_models["whisper"])
    split = next(  # a Whisper token whose text the LLM splits in two or more
        token
        for token in range(1000, adaptor.decoding.eos)
        if len(llm_tokenizer(whisper_tokenizer.decode([token]), add_special_tokens=False).input_ids)
        > 1
    )
    single = whisper_tokenizer.convert_tokens_to_ids(whisper_tokenizer.tokenize(" France"))[0]
    for token in (single, split):
        text = whisper_tokenizer.decode([token])
        expected = embeddings.weight[llm_tokenizer(text, add_special_tokens=False).input_ids]
        assert torch.allclose(adaptor.bridge[token], expected.mean(0), atol=1e-6), text
    assert adaptor.bridge.shape == (adaptor.decoding.eos, 576)  # the text tokens only
    # untrained, the nearest LLM tokens of its outputs spell the spoken question
    wav_files, questions = spoken_questions(tmp_path)
    encoder = HFWhisperEncoder(source=real_models["whisper"], window="batch").eval()
    wavs, lens = padded(wav_files[:1])
    with torch.no_grad():
        frames, frame_lens = encoder(wavs, lens)
        out, _ = adaptor(frames, frame_lens)
    nearest = (F.normalize(out[0], dim=-1) @ F.normalize(embeddings.weight, dim=-1).T).argmax(-1)
    heard = {"0": llm_tokenizer.decode(nearest)}
    assert transcript_wer(heard, {"0": questions[0]}) < 15.0, heard
    # the bridge and the residual train (the residual from zero); the decoder does not
    adaptor.requires_grad_(True)
    adaptor(frames, frame_lens)[0].sum().backward()
    assert adaptor.bridge.grad.abs().sum() > 0 and adaptor.proj[2].weight.grad.abs().sum() > 0
    assert torch.equal(adaptor.proj[2].weight, torch.zeros_like(adaptor.proj[2].weight))
    assert not any(p.requires_grad for p in adaptor.decoder.parameters())
    # train_table=False: the same table, only the residual trains
    kept = WhisperBridgeAdaptor(576, real_models["whisper"], table, train_table=False)
    kept.requires_grad_(True)
    assert torch.equal(kept.bridge, adaptor.bridge) and not kept.bridge.requires_grad
    kept(frames, frame_lens)[0].sum().backward()
    assert kept.bridge.grad is None and kept.proj[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="set output_size to the LLM's width"):
        WhisperBridgeAdaptor(64, real_models["whisper"], table)
    with pytest.raises(ValueError, match="build it with bridge_table"):
        WhisperBridgeAdaptor(576, real_models["whisper"], table[:-1])
    # an export rebuilds the table from the recorded sources
    rebuilt = build_adaptor("WhisperBridgeAdaptor", adaptor.arguments)
    assert torch.equal(rebuilt.bridge, adaptor.bridge)
