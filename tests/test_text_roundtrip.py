"""Any text round-trips through preparation, manifests, batches and evaluation files."""

import json
import os
import sys

import pytest
from conftest import ROOT
from helpers import tsv_rows
from speechbrain.dataio.batch import PaddedBatch

from speechbrain_sllm.data.dataio import load_manifest, make_qa_dataset
from speechbrain_sllm.data.tts import EspeakTTS
from speechbrain_sllm.metrics import QAAccuracyStats

sys.path.insert(0, os.path.join(ROOT, "recipes", "VoiceAssistant"))
from voiceassistant_prepare import prepare_spoken_qa  # noqa: E402

HARD_TEXTS = [
    "Run cat log | wc -l",
    "AC|DC",
    "How far is $100 from $data_root?",
    "\"Quoted\", with commas, and a 'single' one",
    "two\nlines",
    "naïve café, 東京, ðæ",
    " a leading space and {braces} and a back\\slash\tand a tab",
]


def spoken_qa_files(folder):
    """A JSON-lines training and evaluation file whose texts are HARD_TEXTS (real speech)."""
    import soundfile

    tts = EspeakTTS()
    soundfile.write(folder / "q.wav", tts.synthesize("what is it", rate=220).numpy(), 16000)
    train = [
        {"id": f"t{i}", "audio": "q.wav", "question": text, "answer": text}
        for i, text in enumerate(HARD_TEXTS)
    ]
    train += [
        {"id": f"extra{i}", "audio": "q.wav", "question": "q", "answer": "a"} for i in range(3)
    ]
    evaluation = [
        {"id": f"e{i}", "audio": "q.wav", "question": text, "answers": [text, "AC|DC", "x, y"]}
        for i, text in enumerate(HARD_TEXTS)
    ]
    for name, items in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with open(folder / name, "w", encoding="utf-8") as handle:
            handle.write("\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n")
    return str(folder / "train.jsonl"), str(folder / "eval.jsonl")


def batch_of(dataset):
    return PaddedBatch([dataset[i] for i in range(len(dataset))])


def test_every_character_survives_preparation_manifest_batch_and_evaluation(tmp_path, prompt):
    train_file, eval_file = spoken_qa_files(tmp_path)
    save = tmp_path / "prepared"
    prepare_spoken_qa(train_file, {"qa": eval_file}, str(save), valid_fraction=0.1, seed=0)

    trained = {}
    for split in ("train.csv", "valid.csv"):
        batch = batch_of(make_qa_dataset(str(save / split), prompt))
        answer_ids = batch.answer_ids.data.tolist()
        trained.update(zip(batch.id, zip(batch.question, batch.answer, answer_ids)))
    for index, text in enumerate(HARD_TEXTS):
        question, answer, answer_ids = trained[f"t{index}"]
        assert question == text and answer == text  # "|" no longer cuts the training answer
        expected_ids = prompt.answer_ids(text)
        assert answer_ids[: len(expected_ids)] == expected_ids

    batch = batch_of(make_qa_dataset(str(save / "test_qa.csv"), prompt))
    expected = {f"e{i}": [text, "AC|DC", "x, y"] for i, text in enumerate(HARD_TEXTS)}
    assert dict(zip(batch.id, batch.references)) == expected
    assert dict(zip(batch.id, batch.question)) == {f"e{i}": t for i, t in enumerate(HARD_TEXTS)}

    stats = QAAccuracyStats()
    stats.append(batch.id, ["AC"] * len(batch.id), batch.references)
    assert stats.summarize("accuracy") == 0.0  # "AC|DC" is one answer, not "AC" or "DC"
    per_item = tmp_path / "per_item.tsv"
    with open(per_item, "w", encoding="utf-8") as handle:
        stats.write_stats(handle)
    read_back = {row[0]: json.loads(row[3]) for row in tsv_rows(per_item)}
    assert read_back == expected


def test_json_manifests_keep_dollars_and_braces_in_text_and_fill_paths(tmp_path, prompt):
    import soundfile

    soundfile.write(tmp_path / "q.wav", EspeakTTS().synthesize("hello", rate=220).numpy(), 16000)
    items = {
        "u1": {
            "wav": "{data_root}/q.wav",
            "duration": 1.0,
            "question": "Is {this} $5?",
            "answer": "$5 {yes}",
        }
    }
    path = tmp_path / "m.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    dataset = make_qa_dataset(str(path), prompt, replacements={"data_root": str(tmp_path)})
    item = dataset[0]
    assert (item["question"], item["answer"], item["references"]) == (
        "Is {this} $5?",
        "$5 {yes}",
        ["$5 {yes}"],
    )
    assert item["sig"].numel() > 0


def test_a_path_placeholder_without_replacement_names_the_field_and_the_fix(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("ID,wav,duration,question,answer\nu1,$audio_root/q.wav,1.0,q,a\n")
    with pytest.raises(KeyError, match=r"wav '\$audio_root/q.wav' uses \['audio_root'\]"):
        load_manifest(str(path), {"data_root": "/x"})
