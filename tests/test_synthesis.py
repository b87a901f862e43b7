"""Training speech: each synthesiser speaks the right text at 16 kHz (Whisper tiny.en
hears it), and SpeechBrain's augmentation keeps the manifests consistent."""

import csv
import sys

import pytest
import soundfile
import torch
from test_webquestions_recipe import RECIPE, write_llama_questions, write_webquestions

from speechbrain_sllm.cascade import WhisperTranscriber, transcript_wer
from speechbrain_sllm.data.augmentation import RenderingAugmenter
from speechbrain_sllm.data.tts import FliteTTS, Synthesisers

QUESTION = "Who was the first president of the United States?"
FLITE = pytest.mark.skipif(
    not FliteTTS.available(), reason="flite is not installed (apt-get install flite)"
)
VOICES = [
    pytest.param("en-us", id="espeak-en-us"),
    pytest.param("en-us+f3", id="espeak-en-us+f3"),
    *[
        pytest.param(f"flite:{voice}", id=f"flite-{voice}", marks=FLITE)
        for voice in FliteTTS.VOICES
    ],
]


@pytest.fixture(scope="module")
def transcriber(real_models):
    return WhisperTranscriber(real_models["whisper"])


def heard(transcriber, wav):
    """Whisper tiny.en's transcript of one clip."""
    return transcriber.transcribe(wav[None], torch.ones(1))[0]


@pytest.mark.parametrize("voice", VOICES)
def test_each_voice_speaks_the_text_at_16_khz(voice, transcriber, tmp_path):
    wav = Synthesisers(sample_rate=16000).synthesize(QUESTION, voice=voice, rate=165)
    path = tmp_path / "clip.wav"
    soundfile.write(path, wav.numpy(), 16000, subtype="PCM_16")
    samples, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000 and samples.ndim == 1 and 1.0 < len(samples) / rate < 6.0
    text = heard(transcriber, torch.from_numpy(samples))
    assert transcript_wer({"q": text}, {"q": QUESTION}) <= 50.0, text  # wrong text: ~100


def test_unknown_voices_are_named():
    with pytest.raises(ValueError, match="engine 'festival' unknown"):
        Synthesisers().synthesize(QUESTION, voice="festival:kal")
    if FliteTTS.available():
        with pytest.raises(ValueError, match="no voice 'bdl'"):
            Synthesisers().synthesize(QUESTION, voice="flite:bdl")


def test_augmentation_is_seeded_audible_and_leaves_the_global_rng(transcriber, tmp_path):
    augment = RenderingAugmenter(seed=3)
    voice = "flite:slt" if FliteTTS.available() else "en-us"
    clean = Synthesisers().synthesize(QUESTION, voice=voice, rate=165)
    state = torch.random.get_rng_state()
    first = augment(clean, index=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    others = [augment(clean, index=i) for i in range(8)]
    assert torch.equal(first, others[5])  # the same clip, the same draws, whatever came before
    assert not torch.equal(first, others[6])
    assert first.abs().max() <= 1.0
    assert first.shape != clean.shape or not torch.equal(first, clean)
    text = heard(transcriber, first)  # still speech: Whisper hears most words
    assert transcript_wer({"q": text}, {"q": QUESTION}) <= 50.0, text


def test_augmented_flite_renderings_keep_lengths_and_labels(tmp_path):
    if not FliteTTS.available():
        pytest.skip("flite is not installed (apt-get install flite)")
    sys.path.insert(0, RECIPE)
    from webquestions_prepare import prepare_webquestions

    webq = write_webquestions(tmp_path / "webq")
    llamaq = write_llama_questions(tmp_path / "llamaq")
    options = {"num_train": 4, "num_valid": 2, "num_test": 2, "num_llamaq": 2}
    paths = prepare_webquestions(
        webq, tmp_path / "prepared", llamaq, varied_renderings=2, voice_set="espeak+flite",
        augment_renderings=True, **options,
    )  # fmt: skip
    with open(paths["align"]) as handle:
        align = list(csv.DictReader(handle))
    train, varied = align[:4], align[4:]
    assert len(varied) == 8
    by_id = {row["ID"]: row for row in train}
    for row in varied:
        source = by_id[row["ID"].rsplit("_v", 1)[0]]
        assert (row["question"], row["answer"]) == (source["question"], source["answer"])
        info = soundfile.info(row["wav"])
        assert info.samplerate == 16000
        assert float(row["duration"]) == pytest.approx(info.frames / 16000, abs=1e-3)
    # the training voices alternate eSpeak and Flite
    with open(paths["train"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4
