"""Every recipe yaml listed in tests/recipes/*.csv runs in --debug mode on tiny
self-made data in the real layout, with tiny models saved to local folders,
and passes SpeechBrain's yaml-vs-script rule (every top-level key is used)."""

import csv
import glob
import os
import re
import subprocess
import sys

import pytest
import soundfile
import torch
from conftest import llama_config, tiny_whisper_config
from transformers import WhisperFeatureExtractor, WhisperModel

from speechbrain_sllm.data.tts import EspeakTTS
from speechbrain_sllm.model.speech_llm import load_causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    row
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "recipes", "*.csv")))
    for row in csv.DictReader(open(path))
]
TINY_FLAGS = [
    "--encoder_dim=16",
    "--llm_dim=32",
    "--llm_dtype=float32",
    "--precision=fp32",
    "--batch_size=2",
    "--max_new_tokens=4",
    "--importance_fraction=1.0",
    "--device=cpu",
    "--debug",
    "--debug_batches=2",
    "--debug_epochs=1",
]
SENTENCES = ["the cat sat on the mat", "a dog ran home", "we like green tea", "birds sing at dawn"]


def run_recipe(row, models, out, *data_flags):
    """Runs a recipe row with tiny local models in --debug mode; returns the process."""
    command = [
        sys.executable,
        os.path.join(ROOT, row["Script_file"]),
        os.path.join(ROOT, row["Hparam_file"]),
        *data_flags,
        f"--llm_source={models['llm']}",
        f"--encoder_source={models['encoder']}",
        f"--output_folder={out}",
        *TINY_FLAGS,
        *row["test_debug_flags"].split(),
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(out))


def yaml_keys(path):
    with open(path) as handle:
        return [m.group(1) for m in re.finditer(r"^([A-Za-z_][\w]*):", handle.read(), re.M)]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['Dataset']}-{r['test_debug_flags']}")
def test_recipe_yaml_keys_are_all_used(row):
    yaml_path = os.path.join(ROOT, row["Hparam_file"])
    with open(os.path.join(ROOT, row["Script_file"])) as handle:
        script = handle.read()
    with open(yaml_path) as handle:
        yaml_text = handle.read()
    unused = [
        key
        for key in yaml_keys(yaml_path)
        if not key.startswith("__") and f'"{key}"' not in script and f"<{key}>" not in yaml_text
    ]
    assert not unused, f"{row['Hparam_file']}: keys not used by {row['Script_file']}: {unused}"
    assert not re.search(r":\s*(true|false)\s*$", yaml_text, re.M), "booleans must be True/False"
    for field in ("Script_file", "Hparam_file", "Data_prep_file", "Readme_file"):
        assert os.path.isfile(os.path.join(ROOT, row[field])), row[field]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    llm = load_causal_lm(config=llama_config(vocab_size=len(tokenizer)))
    llm.save_pretrained(folder / "llm")
    tokenizer.to_hf(str(folder / "llm"))
    config = tiny_whisper_config(max_source_positions=200)
    WhisperModel(config).save_pretrained(folder / "whisper")
    WhisperFeatureExtractor(feature_size=20).save_pretrained(folder / "whisper")
    return {"llm": str(folder / "llm"), "encoder": str(folder / "whisper")}


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    """A tiny LibriSpeech tree: flac files of real (synthetic) speech + .trans.txt."""
    root = tmp_path_factory.mktemp("LibriSpeech")
    tts = EspeakTTS()
    for split in ("train-clean-100", "dev-clean", "test-clean"):
        chapter = root / split / "19" / "198"
        chapter.mkdir(parents=True)
        lines = []
        for index, text in enumerate(SENTENCES):
            utt = f"19-198-{index:04d}"
            soundfile.write(chapter / f"{utt}.flac", tts.synthesize(text, rate=220).numpy(), 16000)
            lines.append(f"{utt} {text.upper()}")
        (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.mark.parametrize(
    "row", [r for r in ROWS if r["Dataset"] == "LibriSpeech"], ids=lambda r: r["test_debug_flags"]
)
def test_librispeech_recipe_runs_in_debug_mode(row, tiny_models, librispeech, tmp_path):
    out = tmp_path / "out"
    result = run_recipe(row, tiny_models, out, f"--data_folder={librispeech}")
    assert result.returncode == 0, result.stderr[-4000:]
    log = (out / "train_log.txt").read_text()
    assert "text_ppl" in log and "WER" in log
    assert (out / "wer_test-clean.txt").is_file()
    if "layerwise" in row["test_debug_flags"]:
        assert (out / "importance" / "base" / "profile.json").is_file()


@pytest.fixture(scope="module")
def spoken_qa_files(tmp_path_factory, kb_pairs):
    """JSON-lines spoken QA files (train + one evaluation set) with real speech."""
    import json

    root = tmp_path_factory.mktemp("spokenqa")
    (root / "wav").mkdir()
    tts = EspeakTTS()
    train, evaluation = [], []
    for index, pair in enumerate(kb_pairs[:12]):
        name = f"wav/{index:03d}.wav"
        soundfile.write(root / name, tts.synthesize(pair["question"], rate=220).numpy(), 16000)
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
    for name, items in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        (root / name).write_text("\n".join(json.dumps(item) for item in items) + "\n")
    return {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")}


@pytest.mark.parametrize(
    "row",
    [r for r in ROWS if r["Dataset"] == "VoiceAssistant"],
    ids=lambda r: r["test_debug_flags"],
)
def test_spoken_qa_recipe_runs_in_debug_mode(row, tiny_models, spoken_qa_files, tmp_path):
    import json

    out = tmp_path / "out"
    result = run_recipe(
        row,
        tiny_models,
        out,
        f"--train_file={spoken_qa_files['train']}",
        f"--eval_files={{llama_questions: {spoken_qa_files['eval']}}}",
        "--valid_fraction=0.2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    accuracy = results["accuracy"]["llama_questions"]
    assert 0.0 <= accuracy["T2T"] <= 100.0 and 0.0 <= accuracy["S2T"] <= 100.0
    assert set(results["shift"]) >= {"js", "kl", "spearman", "emd_layers", "peak_shift"}
    for name in (
        "base/profile.json",
        "finetuned/profile.json",
        "shift.json",
        "layer_importance.png",
    ):
        assert (out / "importance" / name).is_file(), name
    assert "skipped 1 items" in result.stderr + (out / "log.txt").read_text()


def run_torchrun(command, cwd, timeout=600):
    """Runs ``torchrun`` and stops it cleanly on timeout.

    torch elastic starts each worker in its own session, so killing the
    process group would miss them: terminate torchrun itself, which forwards
    SIGTERM to its workers.
    """
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stderr[-4000:]}")
    return process.returncode, stdout, stderr


@pytest.mark.parametrize("persistent", [False, True], ids=["debug", "debug_persistently"])
def test_spoken_qa_recipe_trains_and_scores_under_torchrun_with_two_processes(
    persistent, tiny_models, spoken_qa_files, tmp_path
):
    """DDP on CPU (gloo), 2 epochs so keep-only deletion runs; ranks share checkpoints."""
    import json

    row = next(
        r for r in ROWS if r["Dataset"] == "VoiceAssistant" and "lora" in r["test_debug_flags"]
    )
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, row["Script_file"]),
        os.path.join(ROOT, row["Hparam_file"]),
        f"--train_file={spoken_qa_files['train']}",
        f"--eval_files={{llama_questions: {spoken_qa_files['eval']}}}",
        "--valid_fraction=0.2",
        f"--llm_source={tiny_models['llm']}",
        f"--encoder_source={tiny_models['encoder']}",
        f"--output_folder={out}",
        "--distributed_backend=gloo",
        *TINY_FLAGS,
        "--number_of_epochs=2",
        "--debug_epochs=2",
        "--strategy=lora",
        *(["--debug_persistently"] if persistent else []),
    ]
    returncode, _, stderr = run_torchrun(command, tmp_path)
    assert returncode == 0, stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]["llama_questions"]) == {"T2T", "S2T"}
    assert "epoch: 2" in (out / "train_log.txt").read_text()
    if persistent:
        saved = os.listdir(out / "save")
        assert len([d for d in saved if d.startswith("CKPT")]) in (1, 2)  # best + most recent
        assert not [d for d in saved if d.startswith(".staging")]
