import json
import os

import pytest
import soundfile
import torch
from conftest import llama_config

from speechbrain_sllm.data.dataio import (
    AudioError,
    drop_bad_items,
    load_audio,
    load_manifest,
    make_qa_dataset,
)
from speechbrain_sllm.data.synthetic import write_manifest
from speechbrain_sllm.metrics import QAAccuracyStats, answer_matches, normalize_answer
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm


def write_wav(path, samples, rate, channels=1):
    data = torch.randn(samples, channels).numpy() * 0.1
    soundfile.write(path, data if channels > 1 else data[:, 0], rate)
    return str(path)


def test_audio_is_resampled_and_downmixed(tmp_path):
    stereo = write_wav(tmp_path / "s.wav", 22050, 22050, channels=2)
    wav = load_audio(stereo, sample_rate=16000)
    assert wav.shape == (16000,)
    flac = write_wav(tmp_path / "f.flac", 8000, 8000)
    assert load_audio(flac).shape == (16000,)


def test_bad_audio_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(AudioError, match=r"missing\.wav.*does not exist"):
        load_audio(str(tmp_path / "missing.wav"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF0000WAVEfmt garbage")
    with pytest.raises(AudioError, match=r"corrupt\.wav.*cannot be read"):
        load_audio(str(corrupt))
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, torch.zeros(0).numpy(), 16000)
    with pytest.raises(AudioError, match="is empty"):
        load_audio(str(empty))
    long = write_wav(tmp_path / "long.wav", 48000, 16000)
    with pytest.raises(AudioError, match="over max_duration=2"):
        load_audio(long, max_duration=2)


def test_bad_items_are_skipped_counted_and_logged(tmp_path, prompt, caplog):
    good = write_wav(tmp_path / "good.wav", 16000, 16000)
    long = write_wav(tmp_path / "long.wav", 16000 * 5, 16000)
    one_sample = write_wav(tmp_path / "one.wav", 1, 16000)
    truncated = write_wav(tmp_path / "cut.wav", 80, 16000)  # 5 ms
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    rows = [
        {"ID": "ok", "wav": good, "question": "What is up?", "answer": "Sky"},
        {"ID": "missing", "wav": str(tmp_path / "nope.wav"), "question": "Q?", "answer": "A"},
        {"ID": "corrupt", "wav": str(tmp_path / "bad.wav"), "question": "Q?", "answer": "A"},
        {"ID": "too_long", "wav": long, "question": "Q?", "answer": "A"},
        {"ID": "no_answer", "wav": good, "question": "Q?", "answer": " "},
        {"ID": "one_sample", "wav": one_sample, "question": "Q?", "answer": "A"},
        {"ID": "truncated", "wav": truncated, "question": "Q?", "answer": "A"},
    ]
    for row in rows:
        row.update({"duration": 1.0, "relation": "", "entity": "", "template": 0})
    manifest = str(tmp_path / "m.csv")
    write_manifest(rows, manifest)
    fields = ["question", "answer", "wav"]
    dataset, skipped = drop_bad_items(load_manifest(manifest), fields, 3.0, min_duration=0.1)
    assert dataset.data_ids == ["ok"]
    assert skipped == {
        "missing audio file": 1,
        "unreadable audio file": 1,
        "audio longer than max_duration": 1,
        "empty answer": 1,
        "audio shorter than min_duration": 2,
    }
    assert "skipped 6 items" in caplog.text
    qa = make_qa_dataset(manifest, prompt, max_duration=3.0)
    assert len(qa) == 1 and qa[0]["sig"].shape == (16000,)


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the recipe's data preparation"):
        load_manifest(str(tmp_path / "train.csv"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"must end in \.csv or \.json"):
        load_manifest(str(tmp_path / "x.txt"))


def test_prompt_longer_than_the_context_is_rejected():
    config = llama_config()
    config.max_position_embeddings = 8
    model = SpeechLLM(load_causal_lm(config=config))
    with pytest.raises(ValueError, match="Batch item 1 has 10 positions.*context of 8"):
        model.build_batch([[4], [4] * 6], answers=[[5, 3], [5, 5, 5, 3]])


def test_answer_normalisation_and_matching():
    assert normalize_answer("  The Zorba-Land! ") == "zorbaland"
    assert answer_matches("The answer is Taimou.", "taimou")
    assert not answer_matches("Taimoun", "taimou")
    assert answer_matches("Taimou", "Taimou", answer_match="exact")
    assert not answer_matches("It is Taimou", "Taimou", answer_match="exact")
    stats = QAAccuracyStats()
    stats.append(
        ["a", "b", "c", "d"], ["x", "taimou", "no", "Vouzan"], ["y", "Taimou", "yes", "vouzan"]
    )
    assert stats.summarize("accuracy") == 50.0


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("A spider has 8 legs.", "Eight"),
        ("There are 248 of them", "Two hundred fourty eight"),  # LLaMA Questions' spelling
        ("about sixty thousand", "60,000"),
        ("Twenty-four hours", "twenty four"),
        ("one hundred and five", "105"),
    ],
)
def test_number_words_match_digits(prediction, reference):
    assert answer_matches(prediction, reference)


def test_number_words_do_not_match_other_numbers():
    assert not answer_matches("eighty", "Eight")
    assert not answer_matches("It has 18 legs", "eight")
    assert not answer_matches("two hundred", "Two hundred fourty eight")


def test_empty_question_or_answer_in_prompts_is_rejected(prompt):
    with pytest.raises(ValueError, match="empty question"):
        prompt.text_prompt("  ")
    with pytest.raises(ValueError, match="empty answer"):
        prompt.answer_ids("")
    assert os.path.isfile(prompt.tokenizer.model_path)


SYNTHESIS_SCRIPT = """
import hashlib
from speechbrain_sllm.data.tts import EspeakTTS
tts = EspeakTTS()
for text, voice in [("what is the capital of zorbaland", "en-us+f3"), ("who rules vouzan", "en-us+f2")]:
    print(hashlib.sha1(tts.synthesize(text, voice=voice).numpy().tobytes()).hexdigest())
"""


def test_synthesis_is_deterministic_across_processes():
    """Breath-noise voices (+f2, +f3) draw random numbers: each utterance is re-seeded."""
    import subprocess
    import sys

    outputs = [
        subprocess.run(
            [sys.executable, "-c", SYNTHESIS_SCRIPT], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(3)
    ]
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0].split()) == 2


def exact_mcnemar_p(lost, gained):
    """The two-sided exact McNemar test written out: twice the binomial(n, 1/2) tail."""
    import math

    n = lost + gained
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_paired_test_counts_changed_items_and_gives_the_exact_binomial_p_value():
    import random

    from speechbrain_sllm.metrics import paired_test

    assert paired_test([True] * 5 + [False] * 3, [False] * 5 + [False] * 3) == {
        "lost": 5,
        "gained": 0,
        "p": pytest.approx(2 / 32),
    }
    rng = random.Random(0)
    for _ in range(20):
        before = [rng.random() < 0.5 for _ in range(60)]
        after = [b if rng.random() < 0.7 else rng.random() < 0.3 for b in before]
        lost = sum(b and not a for b, a in zip(before, after))
        gained = sum(a and not b for b, a in zip(before, after))
        result = paired_test(before, after)
        assert (result["lost"], result["gained"]) == (lost, gained)
        assert result["p"] == pytest.approx(exact_mcnemar_p(lost, gained), rel=1e-9)


def test_rewriting_a_manifest_with_the_same_rows_keeps_the_file(tmp_path):
    """Later stages record a manifest's size and mtime: an identical rewrite must not
    make them redo their work (e.g. the study's base_answers targets)."""
    from speechbrain_sllm.data.dataio import write_csv_manifest

    path = str(tmp_path / "train.csv")
    rows = [{"ID": "a", "question": "q", "answer": "x"}]
    write_csv_manifest(rows, ["ID", "question", "answer"], path)
    os.utime(path, ns=(1, 1))
    write_csv_manifest(rows, ["ID", "question", "answer"], path)
    assert os.stat(path).st_mtime_ns == 1
    write_csv_manifest(rows + rows, ["ID", "question", "answer"], path)
    assert os.stat(path).st_mtime_ns != 1 and open(path).read().count("a,q,x") == 2


def test_a_source_copied_with_new_times_is_still_prepared_and_new_content_is_not(tmp_path):
    """The record keeps each source's digest: a copy (same bytes, new modification
    time, as on another machine) counts as prepared; the same size with other bytes
    does not; a record written before digests still matches by size and time."""
    from speechbrain_sllm.data.preparation import completion_record, is_prepared, staged_preparation

    source, folder = tmp_path / "questions.json", str(tmp_path / "prepared")
    source.write_text('["what is it"]')
    os.makedirs(folder)
    with staged_preparation(folder, completion_record([str(source)], {"n": 1})) as staging:
        open(os.path.join(staging, "train.csv"), "w").write("ID\n")
    os.utime(source, ns=(5, 5))  # a copy: the same bytes, another time
    assert is_prepared(folder, completion_record([str(source)], {"n": 1}), ["train.csv"])
    assert not is_prepared(folder, completion_record([str(source)], {"n": 2}), ["train.csv"])
    source.write_text('["what is ot"]')  # same size, other bytes
    os.utime(source, ns=(5, 5))
    assert not is_prepared(folder, completion_record([str(source)], {"n": 1}), ["train.csv"])
    record = completion_record([str(source)], {"n": 1})
    legacy = {
        path: {"size": e["size"], "mtime_ns": e["mtime_ns"]}
        for path, e in record["sources"].items()
    }
    with open(os.path.join(folder, "preparation.json"), "w") as handle:
        json.dump({"sources": legacy, "options": {"n": 1}}, handle)
    assert is_prepared(folder, record, ["train.csv"])
    os.utime(source, ns=(6, 6))
    assert not is_prepared(folder, completion_record([str(source)], {"n": 1}), ["train.csv"])
