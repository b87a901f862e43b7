"""VoiceAssistant-400K as published (parquet shards with the audio inside) prepared by the recipe."""

import csv
import os
import sys

import pytest
from conftest import ROOT, build_voiceassistant_parquet

sys.path.insert(0, os.path.join(ROOT, "recipes", "VoiceAssistant"))
import voiceassistant_prepare  # noqa: E402


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def shards(tmp_path, kb_pairs):
    folder = tmp_path / "VoiceAssistant-400K" / "data"
    build_voiceassistant_parquet(str(folder), kb_pairs)
    evaluation = tmp_path / "eval.jsonl"
    wav = sorted(folder.parent.glob("**/*.parquet"))  # any readable audio will do for eval
    import pyarrow.parquet as pq

    audio = pq.read_table(wav[0]).to_pylist()[0]["question_audio"]["bytes"]
    (tmp_path / "e.wav").write_bytes(audio)
    evaluation.write_text('{"id": "e1", "audio": "e.wav", "question": "q?", "answers": ["a"]}\n')
    return str(folder), {"llama_questions": str(evaluation)}


def test_parquet_shards_are_prepared_with_their_audio_ids_and_a_counted_bad_row(
    shards, tmp_path, caplog
):
    source, evals = shards
    save = tmp_path / "prepared"
    voiceassistant_prepare.prepare_spoken_qa(source, evals, str(save), valid_fraction=0.2)
    train, valid = read_csv(save / "train.csv"), read_csv(save / "valid.csv")
    rows = {row["ID"]: row for row in train + valid}
    assert len(rows) == 11 and "identity_9_0" not in rows  # the bad row, skipped
    assert len(valid) == 2 and len(read_csv(save / "test_llama_questions.csv")) == 1
    assert "train-00001-of-00002.parquet:3: skipped (undecodable audio" in caplog.text
    row = rows["qa_2_0"]
    assert (row["split_name"], row["index_in_split"], row["round"]) == ("qa", "2", "0")
    import pyarrow.parquet as pq

    first = pq.read_table(os.path.join(source, "train-00000-of-00002.parquet")).to_pylist()
    with open(row["wav"], "rb") as handle:  # the question's audio, byte for byte
        assert handle.read() == first[2]["question_audio"]["bytes"]
    assert float(row["duration"]) > 0.5 and row["question"] == first[2]["question"]


def test_a_killed_preparation_resumes_at_the_first_unfinished_shard(shards, tmp_path, monkeypatch):
    source, evals = shards
    save = tmp_path / "prepared"
    real = voiceassistant_prepare.manifest_row

    def dies_in_the_second_shard(row, shard, number, audio_folder):
        if "00001-of" in shard and number == 2:
            raise KeyboardInterrupt  # killed half-way through the second shard
        return real(row, shard, number, audio_folder)

    monkeypatch.setattr(voiceassistant_prepare, "manifest_row", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        voiceassistant_prepare.prepare_spoken_qa(source, evals, str(save), valid_fraction=0.2)
    assert not (save / "train.csv").exists() and not (save / "preparation.json").exists()
    finished = sorted((save / "shards").glob("*.csv"))
    assert len(finished) == 1 and "00000-of" in finished[0].name
    before = finished[0].stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(
        voiceassistant_prepare, "manifest_row", lambda *a: calls.append(a[1]) or real(*a)
    )
    voiceassistant_prepare.prepare_spoken_qa(source, evals, str(save), valid_fraction=0.2)
    assert finished[0].stat().st_mtime_ns == before  # the finished shard was not redone
    assert calls and all("00001-of" in shard for shard in calls)
    assert len(read_csv(save / "train.csv")) + len(read_csv(save / "valid.csv")) == 11


def test_a_shard_without_the_published_columns_is_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), folder / "train-0.parquet")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(
        ValueError, match=r"missing columns \['question', 'question_audio', 'answer'\]"
    ):
        voiceassistant_prepare.prepare_parquet_training(
            str(folder), str(tmp_path / "p"), str(tmp_path), 0.1, 0
        )
