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


def folder_files(folder):
    """``{relative path: bytes}`` of every file under ``folder`` (the lock file aside)."""
    from test_run_lock import folder_snapshot

    return folder_snapshot(folder)


@pytest.fixture(scope="module")
def trained_lora_folder(recipe_fixtures, tmp_path_factory):
    """The spoken-QA LoRA row run once with its checkpoints kept (``--debug_persistently``)."""
    out = tmp_path_factory.mktemp("trained_lora") / "out"
    assert run_row(SPOKEN_QA_LORA, out, ["--debug_persistently"]).returncode == 0
    return out


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            "--strategy=full_ft",
            "strategy: 'lora' in the folder, 'full_ft' now (resume with --strategy=lora)",
        ),
        (
            "--lora={rank: 4, alpha: 16}",
            "lora: {'rank': 8, 'alpha': 16, 'dropout': 0.05} in the folder, "
            "{'rank': 4, 'alpha': 16, 'dropout': 0.05} now "
            '(resume with --lora="{rank: 8, alpha: 16, dropout: 0.05}")',
        ),
        (
            "--encoder_dim=32",
            "encoder_dim: 16 in the folder, 32 now (resume with --encoder_dim=16)",
        ),
    ],
)
def test_resuming_with_other_tensor_shaping_settings_stops_before_anything_runs(
    change, expected, trained_lora_folder
):
    out = trained_lora_folder  # one run for the three refusals: each leaves it untouched
    before = folder_files(out)
    result = run_row(SPOKEN_QA_LORA, out, ["--debug_persistently", change])
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Nothing in the folder was changed" in result.stderr
    assert "Loading weights" not in result.stderr  # refused before the LLM was loaded
    assert folder_files(out) == before  # hyperparams.yaml, importance/base, results, run.json
    record = json.loads((out / "run.json").read_text())
    assert record["strategy"] == "lora" and record["lora"]["rank"] == 8


def test_rerunning_a_folder_keeps_the_previous_hyperparams_yaml(recipe_fixtures, tmp_path):
    import time

    from speechbrain_sllm.config import keep_previous_hyperparams

    out = tmp_path / "out"
    assert run_row(SPOKEN_QA_LORA, out).returncode == 0
    first = (out / "hyperparams.yaml").read_text()
    assert run_row(SPOKEN_QA_LORA, out, ["--max_new_tokens=3"]).returncode == 0
    kept = [name for name in os.listdir(out) if name.startswith("hyperparams.2")]
    assert len(kept) == 1 and (out / kept[0]).read_text() == first
    current = out / "hyperparams.yaml"
    for later in (10, 20):  # reruns with one setting (rewritten: new times) keep one copy
        os.utime(current, (time.time() + later, time.time() + later))
        keep_previous_hyperparams(str(out))
    copies = sorted(name for name in os.listdir(out) if name.startswith("hyperparams.2"))
    assert len(copies) == 2 and first in [(out / name).read_text() for name in copies]
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
    assert f"{path}:3: skipped (missing audio): {tmp_path / 'missing.wav'}" in caplog.text
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


def write_lines(path, lines):
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def test_a_line_that_is_json_but_not_an_object_is_named_with_its_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl", [{"id": "a", "question": "q", "answer": "x"}, '"just text"']
    )
    with pytest.raises(ValueError, match=rf"{path}:2 is a JSON str, not an object"):
        read_items(path)


def test_a_duplicate_id_is_named_with_its_file_and_both_lines(tmp_path):
    import soundfile
    import torch

    soundfile.write(tmp_path / "a.wav", torch.randn(8000).numpy() * 0.1, 16000)
    item = {"id": "same", "audio": "a.wav", "question": "q", "answer": "x"}
    path = write_lines(tmp_path / "train.jsonl", [item, dict(item, id="other"), item])
    with pytest.raises(ValueError, match=rf"{path}:3: duplicate id 'same' \(first at line 1\)"):
        read_items(path)


def test_empty_answers_and_a_missing_audio_key_are_skipped_with_file_line_and_reason(
    tmp_path, caplog
):
    import soundfile
    import torch

    soundfile.write(tmp_path / "a.wav", torch.randn(8000).numpy() * 0.1, 16000)
    lines = [
        {"id": "good", "audio": "a.wav", "question": "q", "answers": ["x", "y"]},
        {"id": "blank", "audio": "a.wav", "question": "q", "answers": ["x", ""]},
        {"id": "noaudio", "question": "q", "answers": ["x"]},
    ]
    path = write_lines(tmp_path / "eval.jsonl", lines)
    with caplog.at_level("WARNING"):
        rows = read_items(path, answers_key="answers")
    assert [row["ID"] for row in rows] == ["good"]
    assert f"{path}:2: skipped (empty answer in `answers`): ['x', '']" in caplog.text
    assert f"{path}:3: skipped (no `audio` key): keys ['answers', 'id', 'question']" in caplog.text


def test_an_evaluation_set_with_no_usable_item_stops_preparation_naming_file_and_set(
    recipe_fixtures, tmp_path
):
    data = os.path.join(recipe_fixtures, "spokenqa")
    items = [json.loads(line) for line in open(os.path.join(data, "llama_questions.jsonl"))]
    evaluation = write_lines(tmp_path / "eval.jsonl", [dict(i, audio="gone.wav") for i in items])
    folder = tmp_path / "manifests"
    with pytest.raises(
        ValueError, match=rf"{evaluation}: the llama_questions set has no usable item"
    ):
        prepare(os.path.join(data, "train.jsonl"), evaluation, folder)
    assert not (folder / "preparation.json").exists()
    assert not [name for name in os.listdir(folder) if name.endswith(".csv")]


def test_an_empty_data_file_is_named_before_any_model_loads(recipe_fixtures, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        open(os.path.join(recipe_fixtures, "spokenqa", "train.jsonl")).read()
    )
    (data / "llama_questions.jsonl").write_text("\n")
    result = run_row(SPOKEN_QA_LORA, tmp_path / "out", [f"--data_folder={data}"])
    assert result.returncode != 0
    message = last_error(result)
    assert (
        f"`test_files.llama_questions`: data file '{data}/llama_questions.jsonl' holds no item"
        in message
    )
    assert not (tmp_path / "out").exists()  # nothing built, nothing written


def test_a_header_only_manifest_is_named_as_an_empty_set(prompt, tmp_path):
    from speechbrain_sllm.data.dataio import make_qa_dataset

    path = tmp_path / "test-clean.csv"
    path.write_text("ID,duration,wav,spk_id,wrd\n")
    with pytest.raises(
        ValueError, match=rf"Manifest '{path}' holds no item \(header only or empty\)"
    ):
        make_qa_dataset(str(path), prompt)


def copy_model(source, folder, drop=()):
    import shutil

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(*drop))
    return str(folder)


def test_a_model_folder_without_tokenizer_files_is_named_with_the_files_it_needs(
    recipe_fixtures, tmp_path
):
    from speechbrain_sllm.config import check_settings
    from speechbrain_sllm.model_sources import TOKENIZER_FILES

    source = os.path.join(recipe_fixtures, "tiny_llm")
    folder = copy_model(source, tmp_path / "llm", drop=TOKENIZER_FILES + ("tokenizer_config.json",))
    with pytest.raises(
        FileNotFoundError, match=rf"`llm_source`: '{folder}' has no tokenizer files"
    ):
        check_settings({"llm_source": folder})
    check_settings({"llm_source": source})  # the complete folder passes


def test_a_truncated_weight_file_is_named_before_loading(recipe_fixtures, tmp_path):
    from speechbrain_sllm.config import check_settings

    folder = copy_model(os.path.join(recipe_fixtures, "tiny_whisper"), tmp_path / "whisper")
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(
        ValueError, match=rf"`encoder_source`: weight file {weights} is unreadable \(truncated"
    ):
        check_settings({"encoder_source": folder})


def test_max_duration_over_the_encoder_window_stops_at_start_up(recipe_fixtures, tmp_path):
    result = run_row(SPOKEN_QA_LORA, tmp_path / "out", ["--max_duration=30.0"])
    assert result.returncode != 0
    message = last_error(result)
    assert "`max_duration` 30.0 s is longer than the window of the encoder" in message, message
    assert "(4 s)" in message and "--max_duration=4" in message
    assert not (tmp_path / "out" / "manifests").exists()  # stopped before the preparation


def test_audio_over_the_encoder_window_names_its_item(
    recipe_fixtures, tokenizer, prompt, manifests, tmp_path
):
    from helpers import fixed_batch, make_brain
    from speechbrain.dataio.batch import PaddedData

    from speechbrain_sllm.model.encoders import AudioTooLongError, HFWhisperEncoder

    brain = make_brain("frozen_llm", tokenizer, prompt, tmp_path)
    encoder = HFWhisperEncoder(source=os.path.join(recipe_fixtures, "tiny_whisper"))
    brain.model.encoder = encoder
    batch = fixed_batch(manifests["speech"], prompt)
    longest = batch.id[int((batch.sig[1] == 1).nonzero()[0])]
    batch.sig = PaddedData(batch.sig.data.repeat(1, 40), batch.sig.lengths)  # past 4 s
    with pytest.raises(AudioTooLongError, match=rf"Item '{longest}': HFWhisperEncoder: audio of"):
        brain.compute_forward(batch, None)


def test_a_cuda_device_on_a_machine_without_it_names_the_device_option(recipe_fixtures, tmp_path):
    import torch

    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = run_row(SPOKEN_QA_LORA, tmp_path / "out", [f"--device=cuda:{missing}"])
    assert result.returncode != 0
    message = last_error(result)
    assert f"--device=cuda:{missing}: torch sees {missing} CUDA device(s)" in message, message
    assert "--device=cpu" in message
    assert not (tmp_path / "out").exists()


def test_an_item_with_non_finite_audio_is_dropped_and_the_rest_of_its_batch_trains(
    tokenizer, prompt, manifests, tmp_path, caplog
):
    from helpers import fixed_batch, llm_state, make_brain

    brain = make_brain("full_ft", tokenizer, prompt, tmp_path)
    brain.init_optimizers()
    batch = fixed_batch(manifests["speech"], prompt)
    batch.sig.data[1, 100] = float("nan")
    before = llm_state(brain.model)
    with caplog.at_level("WARNING"):
        loss = brain.fit_batch(batch)
    assert torch_isfinite(loss) and brain.skipped_steps == 0 and brain.dropped_items == 1
    assert f"dropped items with non-finite audio: ['{batch.id[1]}']" in caplog.text
    after = llm_state(brain.model)
    assert any(not before[name].equal(after[name]) for name in before)  # the step was taken


def torch_isfinite(value):
    import torch

    return bool(torch.isfinite(value))


def test_skipped_steps_reach_the_train_log_and_name_the_batchs_items(
    tokenizer, prompt, manifests, tmp_path, caplog
):
    import speechbrain as sb
    import torch
    from helpers import fixed_batch, make_brain

    brain = make_brain("full_ft", tokenizer, prompt, tmp_path, nonfinite_patience=5)
    brain.init_optimizers()
    batch = fixed_batch(manifests["speech"], prompt)
    brain.compute_objectives = lambda *args: torch.tensor(float("nan"), requires_grad=True)
    brain.nonfinite_count = 0
    with caplog.at_level("WARNING"):
        for _ in range(2):
            brain.on_fit_batch_start(batch, True)
            brain.fit_batch(batch)
    assert f"(items {list(batch.id)})" in caplog.text
    log = tmp_path / "train_log.txt"
    brain.train_logger = sb.utils.train_logger.FileTrainLogger(str(log))
    brain.checkpointer = None
    brain.on_stage_end(sb.Stage.TRAIN, 1.0, epoch=1)
    brain.on_stage_end(sb.Stage.VALID, 1.0, epoch=1)
    assert "skipped_steps: 2" in log.read_text() and "dropped_items: 0" in log.read_text()


def test_an_export_killed_while_writing_leaves_the_previous_export_whole(
    tokenizer, tmp_path, monkeypatch
):
    import torch
    from conftest import llama_config, tiny_speech_llm
    from helpers import strategy_for
    from test_run_lock import folder_snapshot

    from speechbrain_sllm import model_export
    from speechbrain_sllm.strategies import apply_strategy

    template = model_export.INFERENCE_TEMPLATE
    model = tiny_speech_llm(llama_config(vocab_size=len(tokenizer)))
    strategy = strategy_for("lora", str(tmp_path))
    apply_strategy(model, strategy)
    folder = str(tmp_path / "inference")
    model_export.export_trained_model(model, strategy, template, folder, {})
    before = folder_snapshot(folder)
    real_save = torch.save

    def killed_while_saving(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 3)  # half-written, then the kill
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(model_export.torch, "save", killed_while_saving)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model_export.export_trained_model(model, strategy, template, folder, {})
    assert folder_snapshot(folder) == before
    monkeypatch.setattr(model_export.torch, "save", real_save)
    model_export.export_trained_model(model, strategy, template, folder, {})  # the rerun
    assert folder_snapshot(folder) != before
    assert sorted(os.listdir(tmp_path)) == ["inference", "profile.json"]  # no staging left
    torch.load(os.path.join(folder, "model.ckpt"), weights_only=True)


def test_a_librispeech_split_left_empty_is_named_with_its_csv(recipe_fixtures, tmp_path):
    row = next(r for r in ROWS if r["Dataset"] == "LibriSpeech")
    result = run_row(row, tmp_path / "out", ["--max_duration=0.05"])  # every clip is longer
    assert result.returncode != 0
    train_csv = tmp_path / "out" / "manifests" / "train.csv"
    message = f"LibriSpeech train ({train_csv}): no usable item left"
    output = result.stdout + result.stderr  # SpeechBrain logs the traceback to stdout
    assert message in output and "raise max_duration" in output, output[-2000:]


def test_an_override_with_a_renamed_key_names_the_new_key(tmp_path):
    from speechbrain_sllm.overrides import plain_settings

    hparams_file = tmp_path / "study.yaml"
    hparams_file.write_text("seed: 1\nmanifest_folder: data\n")
    with pytest.raises(KeyError, match="`save_folder` is now `manifest_folder`"):
        plain_settings(str(hparams_file), "save_folder: other")
    hparams_file.write_text("seed: 1\nsave_folder: data\n")  # a yaml that keeps the key
    assert plain_settings(str(hparams_file), "save_folder: other")["save_folder"] == "other"


@pytest.mark.parametrize(
    "flag, message",
    [
        ("ft_epochs: 2", r'`ft_epochs` is now `finetune`.*use --finetune="\{epochs: ...\}"'),
        ("align_epochs: 2", r'`align_epochs` is now `align`.*use --align="\{epochs: ...\}"'),
        ("strategies: [lora]", r"`strategies` is now `stages`.*use --stages=..."),
        ("eval_batch_size: 2", r'use --evaluation="\{batch_size: ...\}"'),
    ],
)
def test_a_retired_flat_study_key_names_its_nested_replacement(flag, message):
    from speechbrain_sllm.overrides import plain_settings

    study = os.path.join(ROOT, "recipes", "WebQuestions", "SpokenQA", "speechllm", "hparams")
    with pytest.raises(KeyError, match=message):
        plain_settings(os.path.join(study, "study.yaml"), flag)


def test_a_nested_override_changes_only_its_field_and_the_stages_that_share_it(tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    study = os.path.join(ROOT, "recipes", "MiniSpokenQA", "SpokenQA", "hparams", "study.yaml")
    overrides = {
        "output_folder": str(tmp_path),
        "finetune": {"epochs": 2},
        "stages": ["base", "lora"],
    }
    with open(study) as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    shared = hparams["finetune"]
    assert (shared.epochs, shared.batch_size, shared.warmup_fraction) == (2, 16, 0.1)
    lora = hparams["stage_choices"]["lora"]
    assert lora.settings is shared and lora.training().epochs == 2
    assert hparams["stages"] == ["base", "lora"]


def test_resuming_with_another_adaptor_type_or_its_arguments_is_refused(tmp_path):
    from speechbrain_sllm.config import RUN_RECORD, check_existing_run, shaping_settings

    choices = {
        "FrameStackAdaptor": {"input_size": 16, "output_size": 32, "stack": 5},
        "WhisperTranscriptAdaptor": {"output_size": 32, "upsample": 2},
    }
    trained = {"output_folder": str(tmp_path), "adaptor_type": "FrameStackAdaptor"}
    trained["adaptor_choices"] = choices
    (tmp_path / "save" / "CKPT+1").mkdir(parents=True)
    (tmp_path / RUN_RECORD).write_text(json.dumps(shaping_settings(trained)))
    check_existing_run(trained)  # the same settings resume
    other_choice = {**choices, "WhisperTranscriptAdaptor": {"output_size": 32, "upsample": 3}}
    check_existing_run({**trained, "adaptor_choices": other_choice})  # not the chosen one
    with pytest.raises(ValueError, match="resume with --adaptor_type=FrameStackAdaptor"):
        check_existing_run({**trained, "adaptor_type": "WhisperTranscriptAdaptor"})
    other_stack = {**choices, "FrameStackAdaptor": {**choices["FrameStackAdaptor"], "stack": 4}}
    with pytest.raises(ValueError, match="adaptor_choices: .*'stack': 5.* in the folder"):
        check_existing_run({**trained, "adaptor_choices": other_stack})


def test_an_export_whose_yaml_runs_other_code_is_refused_before_it_runs(tmp_path):
    from speechbrain_sllm.export_checks import UntrustedYamlError, untrusted_yaml_targets
    from speechbrain_sllm.inference import SpeechLLMInference
    from speechbrain_sllm.model_export import INFERENCE_TEMPLATE

    assert untrusted_yaml_targets(INFERENCE_TEMPLATE) == []  # what the package exports loads
    marker = tmp_path / "marker"
    folder = tmp_path / "downloaded_export"
    folder.mkdir()
    planted = f'__run: !apply:os.system ["touch {marker}"]\n'
    runner = 'more: !apply:speechbrain.utils.superpowers.run_shell ["ls"]\n'
    (folder / "hyperparams.yaml").write_text(planted + runner + open(INFERENCE_TEMPLATE).read())
    import torch

    torch.save({}, folder / "model.ckpt")
    (folder / "strategy.json").write_text("{}")
    with pytest.raises(UntrustedYamlError) as refused:
        SpeechLLMInference.from_hparams(source=str(folder))
    assert "!apply:os.system" in str(refused.value) and "run_shell" in str(refused.value)
    assert "trust_yaml=True" in str(refused.value)
    assert not marker.exists()
    with pytest.raises(Exception) as opted_in:  # no refusal (the folder then lacks its files)
        SpeechLLMInference.from_hparams(source=str(folder), trust_yaml=True)
    assert not isinstance(opted_in.value, UntrustedYamlError)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--lr=abc", r"`lr` = 'abc': must be a number >= 0"),
        ("--number_of_epochs=0", r"`number_of_epochs` = 0: must be an integer >= 1"),
        ("--batch_size=2.5", r"`batch_size` = 2.5: must be an integer >= 1"),
        ("--valid_fraction=1.5", r"`valid_fraction` = 1.5: must be a number in \(0, 1\)"),
        ("--max_new_tokens=-3", r"`max_new_tokens` = -3: must be an integer >= 1"),
        ("--importance_fraction=0", r"`importance_fraction` = 0: must be a number in \(0, 1\]"),
        ("--lora={rank: 0, alpha: 16, dropout: 0.05}", r"`lora.rank` = 0: must be an integer >= 1"),
        ("--device=gpu", r"--device='gpu' is not a device; use cpu, cuda, cuda:N"),
    ],
)
def test_an_override_out_of_range_is_refused_at_start_up_naming_the_key(
    recipe_fixtures, tmp_path, flag, message
):
    import shlex

    import speechbrain as sb

    from speechbrain_sllm.config import load_recipe_hparams

    out = tmp_path / "out"
    key = flag.split("=", 1)[0]
    row_flags = [
        f for f in shlex.split(SPOKEN_QA_LORA["test_debug_flags"]) if f.split("=")[0] != key
    ]
    arguments = [os.path.join(ROOT, SPOKEN_QA_LORA["Hparam_file"]), *row_flags]
    arguments += [f"--output_folder={out}", flag]
    hparams_file, run_opts, overrides = sb.parse_arguments(arguments)
    with pytest.raises(ValueError, match=message):
        load_recipe_hparams(hparams_file, overrides, run_opts)
    assert not out.exists()  # nothing written before the check


EXPORT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import llama_config, tiny_speech_llm
from helpers import strategy_for
from speechbrain_sllm import model_export
from speechbrain_sllm.strategies import apply_strategy
model = tiny_speech_llm(llama_config(vocab_size=64))
strategy = strategy_for("lora", {folder!r})
apply_strategy(model, strategy)
model_export.export_trained_model(model, strategy, model_export.INFERENCE_TEMPLATE, {folder!r} + "/inference", {{}})
"""


def test_two_exports_of_one_lora_run_write_the_same_adapter_config(tmp_path):
    import subprocess
    import sys

    configs = []
    for hash_seed in ("1", "2"):  # set order in peft's config follows the string hashes
        folder = str(tmp_path / hash_seed)
        os.makedirs(folder)
        script = EXPORT_SCRIPT.format(tests=os.path.join(ROOT, "tests"), folder=folder)
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        with open(
            os.path.join(folder, "inference", "lora_adapter", "adapter_config.json")
        ) as handle:
            configs.append(handle.read())
    assert configs[0] == configs[1]


def test_an_export_missing_a_file_or_with_a_truncated_checkpoint_is_named(tokenizer, tmp_path):
    import shutil

    from conftest import llama_config, tiny_speech_llm
    from helpers import strategy_for

    from speechbrain_sllm import inference, model_export
    from speechbrain_sllm.strategies import apply_strategy

    model = tiny_speech_llm(llama_config(vocab_size=len(tokenizer)))
    strategy = strategy_for("lora", str(tmp_path))
    apply_strategy(model, strategy)
    folder = tmp_path / "inference"
    template = model_export.INFERENCE_TEMPLATE
    model_export.export_trained_model(model, strategy, template, str(folder), {})
    for name in ("model.ckpt", "strategy.json", "hyperparams.yaml"):
        moved = tmp_path / name
        shutil.move(folder / name, moved)
        with pytest.raises(FileNotFoundError, match=f"has no {name}: it is incomplete"):
            inference.SpeechLLMInference.from_hparams(source=str(folder))
        shutil.move(moved, folder / name)
    checkpoint = folder / "model.ckpt"
    with open(checkpoint, "r+b") as handle:
        handle.truncate(checkpoint.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"model\.ckpt is truncated or not a torch checkpoint"):
        inference.SpeechLLMInference.from_hparams(source=str(folder))


def test_an_export_refuses_another_base_model_and_names_a_moved_base_folder(
    recipe_fixtures, tmp_path
):
    import shutil

    import torch
    from helpers import tiny_export

    from speechbrain_sllm.data.dataio import AudioError
    from speechbrain_sllm.inference import SpeechLLMInference
    from speechbrain_sllm.model.fingerprint import BaseModelMismatchError

    models = tmp_path / "models"
    for name in ("tiny_llm", "tiny_whisper"):
        shutil.copytree(os.path.join(recipe_fixtures, name), models / name)
    folder = tmp_path / "inference"
    tiny_export(folder, str(models))
    other = os.path.join(recipe_fixtures, "tiny_llm_tuned")  # same config, other weights
    with pytest.raises(BaseModelMismatchError, match="other weights .same config.json"):
        SpeechLLMInference.from_hparams(source=str(folder), overrides={"llm_source": other})
    models.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="`llm_source` is the folder .* no longer exists"):
        SpeechLLMInference.from_hparams(source=str(folder))
    moved = {
        "llm_source": str(tmp_path / "moved" / "tiny_llm"),
        "encoder_source": str(tmp_path / "moved" / "tiny_whisper"),
    }
    assistant = SpeechLLMInference.from_hparams(source=str(folder), overrides=moved)
    wavs = torch.randn(2, 8000)
    assert len(assistant.answer_batch(wavs, torch.ones(2))) == 2
    wavs[1, 10] = float("nan")  # once answered with '' and no word
    with pytest.raises(AudioError, match=r"batch positions \[1\] holds NaN"):
        assistant.answer_batch(wavs, torch.ones(2))


def nan_audio_manifest(manifest, folder, how_many):
    """A copy of ``manifest`` whose first ``how_many`` items' audio holds a NaN sample."""
    import csv

    import numpy
    import soundfile

    with open(manifest) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[:how_many]:
        audio, rate = soundfile.read(row["wav"], dtype="float32")
        audio[len(audio) // 2] = numpy.nan
        row["wav"] = os.path.join(folder, f"{row['ID']}.wav")
        soundfile.write(row["wav"], audio, rate, subtype="FLOAT")
    path = os.path.join(folder, "with_nan.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, [row["ID"] for row in rows[:how_many]]


def test_non_finite_audio_in_test_and_validation_sets_is_named_never_a_zero_loss(
    tokenizer, prompt, manifests, tmp_path, caplog
):
    import speechbrain as sb
    from helpers import make_brain

    from speechbrain_sllm.data.dataio import make_qa_dataset
    from speechbrain_sllm.evaluation import EvaluationSettings

    brain = make_brain("frozen_llm", tokenizer, prompt, tmp_path)
    brain.evaluation = EvaluationSettings(test_metrics=["S2T"], max_new_tokens=2)
    one_at_a_time = {"batch_size": 1}
    clean = make_qa_dataset(manifests["speech"], prompt)
    expected = brain.evaluate(clean, test_loader_kwargs=one_at_a_time)
    path, bad = nan_audio_manifest(manifests["speech"], str(tmp_path), 2)
    with_nan = make_qa_dataset(path, prompt)
    with caplog.at_level("WARNING"):
        stats = brain.evaluate(with_nan, test_loader_kwargs=one_at_a_time)
    assert stats["nonfinite_items"] == 2 and bad[0] in caplog.text and bad[1] in caplog.text
    good = clean.filtered_sorted(key_test={"id": lambda item: item not in bad})
    expected = brain.evaluate(good, test_loader_kwargs=one_at_a_time)
    assert stats["loss"] == pytest.approx(expected["loss"])  # the mean of the finite items
    assert stats["S2T"] == expected["S2T"]
    everything_bad, _ = nan_audio_manifest(manifests["speech"], str(tmp_path), len(clean))
    stats = brain.evaluate(make_qa_dataset(everything_bad, prompt))
    assert stats["loss"] is None and stats["nonfinite_items"] == len(clean)  # was 0.0
    with pytest.raises(FloatingPointError, match="No validation batch had a finite loss"):
        brain.on_stage_start(sb.Stage.VALID)
        brain.on_stage_end(sb.Stage.VALID, 0.0, epoch=1)


def test_the_evaluator_leaves_non_finite_audio_out_of_spoken_scores_and_names_it(
    tokenizer, prompt, manifests, tmp_path
):
    from helpers import make_brain

    from speechbrain_sllm.data.dataio import make_qa_dataset

    brain = make_brain("frozen_llm", tokenizer, prompt, tmp_path)
    path, bad = nan_audio_manifest(manifests["speech"], str(tmp_path), 1)
    evaluator = brain.evaluator()
    ids, predictions, _ = evaluator.decode(make_qa_dataset(path, prompt), "speech")
    assert bad[0] not in ids and evaluator.nonfinite_ids == bad
    clean = make_qa_dataset(manifests["speech"], prompt)
    assert len(ids) == len(clean) - 1
    text_ids, _, _ = brain.evaluator().decode(make_qa_dataset(path, prompt), "text")
    assert len(text_ids) == len(clean)  # written questions need no audio


@pytest.mark.parametrize(
    "mode, adaptor", [("text", None), ("speech", None), ("speech", "transcript")]
)
def test_every_item_longer_than_the_context_is_named_before_the_first_step(
    mode, adaptor, tokenizer, prompt, manifests, tmp_path
):
    """Once the first such item stopped the run mid-epoch, one item per run. A transcript
    adaptor's length follows what its decoder hears, not the clip's duration."""
    import torch
    from conftest import HIDDEN, tiny_whisper_decoder_config
    from helpers import make_brain
    from speechbrain.dataio.batch import PaddedBatch

    from speechbrain_sllm.data.context_lengths import ItemsTooLongError, items_over_context
    from speechbrain_sllm.data.dataio import make_qa_dataset
    from speechbrain_sllm.model.whisper_adaptors import WhisperTranscriptAdaptor

    brain = make_brain("full_ft", tokenizer, prompt, tmp_path, mode=mode)
    if adaptor == "transcript":
        config = tiny_whisper_decoder_config(max_target_positions=40)
        torch.manual_seed(3)
        brain.model.adaptor = WhisperTranscriptAdaptor(HIDDEN, config=config, max_tokens=12)
    dataset = make_qa_dataset(manifests[mode], prompt, with_audio=mode == "speech")
    lengths = {}
    for item in dataset:  # the exact length of each item, from the model
        logits, _ = brain.compute_forward(PaddedBatch([item]), None)
        lengths[item["id"]] = logits.shape[1]
    limit = sorted(lengths.values())[len(lengths) // 2]  # about half the items are longer
    brain.model.llm.config.max_position_embeddings = limit
    expected = {item: length for item, length in lengths.items() if length > limit}
    assert 1 < len(expected) < len(lengths)
    assert items_over_context(brain.model, dataset, prompt, mode) == expected
    with pytest.raises(ItemsTooLongError, match=f"training set: {len(expected)} item") as error:
        brain.fit(brain.hparams.epoch_counter, dataset, train_loader_kwargs={"batch_size": 2})
    assert all(item in str(error.value) for item in expected)
    assert brain.step == 0 and not os.listdir(tmp_path / "save")  # nothing ran, nothing saved


def test_a_study_stage_rerun_with_other_training_settings_is_refused_naming_them(tmp_path):
    from test_run_lock import folder_snapshot

    from speechbrain_sllm.config import load_recipe_hparams
    from speechbrain_sllm.study.stage_record import STAGE_RECORD

    study = os.path.join(ROOT, "recipes", "MiniSpokenQA", "SpokenQA", "hparams", "study.yaml")
    run = {"output_folder": str(tmp_path), "stages": ["base", "full_ft+replay", "lora"]}

    def load(**changes):  # one run after another: this process's lock is let go each time
        try:
            load_recipe_hparams(study, {**run, **changes})
        finally:
            (tmp_path / ".run.lock").unlink()

    load()  # records each trained stage's settings
    replay = tmp_path / "finetune" / "full_ft+replay"
    assert sorted(os.listdir(tmp_path / "finetune")) == ["full_ft+replay", "lora"]
    (replay / "save" / "CKPT+2026-12-07+00-00-00+00").mkdir(parents=True)
    (tmp_path / "finetune" / "lora" / STAGE_RECORD).unlink()  # no checkpoint: rewritten
    load()  # the same settings resume
    load(evaluation={"batch_size": 3}, anchor={"strength": 9})  # scoring; another stage's
    load(lora={"rank": 4})  # full_ft+replay trains no LoRA
    assert (tmp_path / "finetune" / "lora" / STAGE_RECORD).is_file()
    before = folder_snapshot(tmp_path)
    message = (
        r"stage 'full_ft\+replay' \(.*finetune/full_ft\+replay\):\n"
        r"    replay.weight: 1.0 in the folder, 4.0 now\n"
        r"    stage_choices.full_ft\+replay.mitigations.0.weight: 1.0 in the folder, 4.0 now"
    )
    with pytest.raises(ValueError, match=message):
        load(replay={"weight": 4.0})
    with pytest.raises(ValueError, match=r"seed: 1234 in the folder, 7 now"):
        load(seed=7)
    assert folder_snapshot(tmp_path) == before  # refused before anything was written
