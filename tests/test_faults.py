"""Bad input and faults: each error names the file, key or item and the fix, and
nothing already written is lost."""

import json
import os

import pytest
from test_recipes import ROOT, ROWS, row_strategy, run_row

SPOKEN_QA_LORA = next(
    r for r in ROWS if r["Dataset"] == "VoiceAssistant" and row_strategy(r) == "lora"
)


def last_error(result):
    return result.stderr.strip().splitlines()[-1]


def test_a_missing_llm_folder_is_named_before_anything_is_built(recipe_fixtures, tmp_path):
    result = run_row(SPOKEN_QA_LORA, tmp_path / "out", ["--llm_source=./no/such/model"])
    assert result.returncode != 0
    assert "`llm_source`: folder './no/such/model' not found" in last_error(result)
    assert not (tmp_path / "out" / "manifests").exists()  # no preparation ran


def test_a_flat_override_of_a_nested_setting_says_how_to_write_it(recipe_fixtures, tmp_path):
    result = run_row(SPOKEN_QA_LORA, tmp_path / "out", ["--lora_rank=4"])
    assert result.returncode != 0
    assert '--lora="{rank: ...}"' in last_error(result), last_error(result)


def test_a_yaml_key_that_argparse_reads_as_a_run_option_is_refused(tmp_path):
    """``--distributed=fsdp`` would silently set SpeechBrain's --distributed_backend."""
    from speechbrain_sllm.config import load_recipe_hparams

    hparams_file = tmp_path / "recipe.yaml"
    hparams_file.write_text("distributed: ddp\nlr: 0.1\n")
    with pytest.raises(ValueError, match="`distributed`.*--distributed_backend"):
        load_recipe_hparams(str(hparams_file), {})
    hparams_file.write_text("parallelism: ddp\nlr: 0.1\n")
    assert load_recipe_hparams(str(hparams_file), {"parallelism": "fsdp"})["parallelism"] == "fsdp"


def test_resuming_with_another_strategy_stops_before_loading_and_keeps_the_config(
    recipe_fixtures, tmp_path
):
    out = tmp_path / "out"
    assert run_row(SPOKEN_QA_LORA, out, ["--debug_persistently"]).returncode == 0
    config = (out / "hyperparams.yaml").read_text()
    results = (out / "results.json").read_text()
    result = run_row(SPOKEN_QA_LORA, out, ["--debug_persistently", "--strategy=full_ft"])
    assert result.returncode != 0
    message = last_error(result)
    assert "holds checkpoints of strategy 'lora'" in message and "--strategy=lora" in message
    assert "Loading weights" not in result.stderr  # refused before the LLM was loaded
    assert (out / "hyperparams.yaml").read_text() == config
    assert (out / "results.json").read_text() == results
    assert json.loads((out / "run.json").read_text()) == {"strategy": "lora"}


def test_rerunning_a_folder_keeps_the_previous_hyperparams_yaml(recipe_fixtures, tmp_path):
    out = tmp_path / "out"
    assert run_row(SPOKEN_QA_LORA, out).returncode == 0
    first = (out / "hyperparams.yaml").read_text()
    assert run_row(SPOKEN_QA_LORA, out, ["--max_new_tokens=3"]).returncode == 0
    kept = [name for name in os.listdir(out) if name.startswith("hyperparams.2")]
    assert len(kept) == 1 and (out / kept[0]).read_text() == first
    assert ROOT  # the rows run from the repository root


def read_items(path, answers_key="answer"):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "recipes", "VoiceAssistant"))
    from voiceassistant_prepare import read_items as prepare_read_items

    return prepare_read_items(str(path), answers_key=answers_key)


def test_corrupt_and_missing_audio_are_skipped_and_counted_at_preparation(tmp_path, caplog):
    import soundfile
    import torch

    soundfile.write(tmp_path / "good.wav", torch.randn(8000).numpy() * 0.1, 16000)
    (tmp_path / "corrupt.wav").write_bytes(os.urandom(4000))
    lines = [
        {"id": "a", "audio": "good.wav", "question": "q", "answer": "x"},
        {"id": "b", "audio": "corrupt.wav", "question": "q", "answer": "x"},
        {"id": "c", "audio": "missing.wav", "question": "q", "answer": "x"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with caplog.at_level("WARNING"):
        rows = read_items(path)
    assert [row["ID"] for row in rows] == ["a"]
    assert f"{path}:2: skipped (unreadable audio" in caplog.text
    assert f"{path}:3: skipped (missing audio)" in caplog.text
    assert "skipped 2 items" in caplog.text


def test_a_non_utf8_line_is_named_with_its_file_and_line(tmp_path):
    import pytest

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"id": "a", "question": "q", "answer": "x"}\n{"id": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2 is not valid UTF-8.*re-encode"):
        read_items(path)


KILLED_PREPARATION = """
import os, sys
sys.path.insert(0, sys.argv[1])
import voiceassistant_prepare as prep
kill_after, calls = int(sys.argv[2]), []
original = prep.write_csv_manifest
def write_then_maybe_die(*args, **kwargs):
    original(*args, **kwargs)
    calls.append(1)
    if len(calls) == kill_after:
        os._exit(9)  # SIGKILL-like: no cleanup, no exception handlers
prep.write_csv_manifest = write_then_maybe_die
prep.prepare_spoken_qa(sys.argv[3], {"llama_questions": sys.argv[4]}, sys.argv[5], 0.2)
"""


def prepare(train, evaluation, folder, **kwargs):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "recipes", "VoiceAssistant"))
    from voiceassistant_prepare import prepare_spoken_qa

    prepare_spoken_qa(str(train), {"llama_questions": str(evaluation)}, str(folder), 0.2, **kwargs)
    return {name: (folder / name).read_text() for name in sorted(os.listdir(folder))}


def test_preparation_killed_at_each_file_boundary_is_completed_by_the_rerun(
    recipe_fixtures, tmp_path
):
    import subprocess
    import sys

    data = os.path.join(recipe_fixtures, "spokenqa")
    train, evaluation = (
        os.path.join(data, "train.jsonl"),
        os.path.join(data, "llama_questions.jsonl"),
    )
    clean = prepare(train, evaluation, tmp_path / "clean")
    for kill_after in (1, 2, 3):  # after train.csv, after valid.csv, after the eval manifest
        folder = tmp_path / f"killed{kill_after}"
        args = [os.path.join(ROOT, "recipes", "VoiceAssistant"), str(kill_after), train]
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_PREPARATION, *args, evaluation, str(folder)]
        )
        assert killed.returncode == 9
        assert not (folder / "preparation.json").exists()  # never looks complete
        assert not [name for name in os.listdir(folder) if name.endswith(".csv")]
        assert prepare(train, evaluation, folder) == clean


def test_a_changed_training_file_is_prepared_again_or_stops_when_asked(recipe_fixtures, tmp_path):
    import pytest

    data = os.path.join(recipe_fixtures, "spokenqa")
    evaluation = os.path.join(data, "llama_questions.jsonl")
    lines = open(os.path.join(data, "train.jsonl")).read().splitlines()
    for name, count in (("a.jsonl", 12), ("b.jsonl", 6)):
        with open(os.path.join(data, name), "w") as handle:
            handle.write("\n".join(lines[:count]) + "\n")
    folder = tmp_path / "manifests"
    first = prepare(os.path.join(data, "a.jsonl"), evaluation, folder)
    second = prepare(os.path.join(data, "b.jsonl"), evaluation, folder)
    assert first["train.csv"] != second["train.csv"]
    assert second["train.csv"].count("\n") + second["valid.csv"].count("\n") == 6 + 2  # headers
    with pytest.raises(ValueError, match="changed sources.*a.jsonl.*prepare_on_change: redo"):
        prepare(os.path.join(data, "a.jsonl"), evaluation, folder, on_change="stop")
    assert prepare(os.path.join(data, "b.jsonl"), evaluation, folder) == second  # kept


def test_a_written_question_over_the_context_names_its_item_and_a_text_fix(
    tokenizer, prompt, manifests, tmp_path
):
    import pytest
    from helpers import fixed_batch, make_brain

    brain = make_brain("full_ft", tokenizer, prompt, tmp_path, mode="text")
    brain.model.llm.config.max_position_embeddings = 12
    batch = fixed_batch(manifests["text"], prompt, with_audio=False)
    with pytest.raises(ValueError, match=r"Item 'txt_\w+': the written question \+ answer"):
        brain.compute_forward(batch, None)
    with pytest.raises(ValueError, match="shorten the question or answer, or remove the item"):
        brain.compute_forward(batch, None)


def test_text_only_datasets_never_read_audio(prompt, manifests, tmp_path):
    """Text-only stages (importance, T2T, perplexity) survive unreadable audio."""
    import csv

    rows = list(csv.DictReader(open(manifests["speech"])))
    for row in rows:
        row["wav"] = str(tmp_path / "unreadable.flac")
    (tmp_path / "unreadable.flac").write_bytes(os.urandom(1000))
    path = tmp_path / "speech.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from speechbrain_sllm.data.dataio import make_qa_dataset

    text_set = make_qa_dataset(str(path), prompt, with_audio=False)
    assert len(text_set) == len(rows) and "sig" not in text_set[0]
