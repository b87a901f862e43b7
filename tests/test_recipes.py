"""Every row of tests/recipes/*.csv runs on its own flags, read the way upstream
SpeechBrain's ``run_recipe_tests`` reads them (with the session's fixtures under
tests/fixtures/), passes its ``test_debug_checks``, and its yaml loads and passes
the yaml-vs-script rule."""

import csv
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import speechbrain as sb
import torch
from conftest import ROOT
from helpers import accuracy_from_tsv, failure_report
from hyperpyyaml import load_hyperpyyaml

HEADER = (
    "Task,Dataset,Script_file,Hparam_file,Data_prep_file,Readme_file,Result_url,HF_repo,"
    "test_debug_flags,test_debug_checks,performance"
).split(",")
ROWS = [
    dict(row, recipe_id=f"{row['Dataset']}_{index}")
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "recipes", "*.csv")))
    for index, row in enumerate(csv.DictReader(open(path)))
]
RUN_OPTS = ["--device=cpu"]
# the train.py recipes' rows (the studies' rows run in tests/test_study.py and
# tests/test_webquestions_recipe.py)
TRAIN_ROWS = [r for r in ROWS if r["Script_file"].endswith("/train.py")]


def row_strategy(row):
    match = re.search(r"--strategy=(\w+)", row["test_debug_flags"])
    return match.group(1) if match else "study"


def row_id(row):
    return f"{row['Dataset']}-{row_strategy(row)}"


def flag_key(flag):
    return flag.split("=", 1)[0]


def row_command(row, output_folder, extra_flags=()):
    """The script and arguments of one CSV row, as upstream runs it: yaml, its flags, run
    options, output folder; ``extra_flags`` replace the row's flags of the same name."""
    script = os.path.join(ROOT, row["Script_file"])
    replaced = {flag_key(flag) for flag in extra_flags}
    row_flags = [f for f in shlex.split(row["test_debug_flags"]) if flag_key(f) not in replaced]
    arguments = [
        os.path.join(ROOT, row["Hparam_file"]),
        *row_flags,
        *RUN_OPTS,
        f"--output_folder={output_folder}",
        *extra_flags,
    ]
    return script, arguments


def row_env(script):
    return dict(os.environ, PYTHONPATH=os.path.dirname(script))


def run_row(row, output_folder, extra_flags=()):
    """Runs one CSV row in one process (see ``row_command``)."""
    script, arguments = row_command(row, output_folder, extra_flags)
    command = [sys.executable, script, *arguments]
    env = row_env(script)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)


def check_files(checks, output_folder):
    """Upstream's ``files_check=[a,b]``: every named file exists in the output folder."""
    match = re.search(r"files_check=\[(.*?)\]", checks)
    names = match.group(1).split(",") if match else []
    return [name for name in names if not os.path.exists(os.path.join(output_folder, name))]


def check_performance(checks, output_folder):
    """Upstream's ``performance_check=[file, variable, <=x, epoch: n]`` (None when it holds)."""
    match = re.search(r"performance_check=\[(.*?)\]", checks)
    if match is None:
        return None
    filename, variable, threshold, epoch = (part.strip() for part in match.group(1).split(","))
    with open(os.path.join(output_folder, filename)) as handle:
        lines = [line for line in handle if line.strip()]
    chosen = lines[-1:] if epoch.endswith("-1") else [line for line in lines if epoch in line]
    if not chosen:
        return f"no line with {epoch!r} in {filename}"
    found = re.search(re.escape(variable) + r"\s*:\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", chosen[0])
    if found is None:
        return f"{variable!r} not in {chosen[0]!r}"
    value, bound = float(found.group(1)), float(threshold.lstrip("<>="))
    op = threshold[: len(threshold) - len(threshold.lstrip("<>="))]
    holds = {"<=": value <= bound, ">=": value >= bound, "==": value == bound}.get(op)
    if holds is None:
        holds = value < bound if op == "<" else value > bound
    return None if holds else f"{variable} = {value} violates {threshold}"


def test_csv_files_have_upstreams_header_and_existing_files():
    for path in glob.glob(os.path.join(ROOT, "tests", "recipes", "*.csv")):
        with open(path) as handle:
            assert next(csv.reader(handle)) == HEADER, path
    for row in ROWS:
        for field in ("Script_file", "Hparam_file", "Data_prep_file", "Readme_file"):
            if field == "Data_prep_file" and not row[field]:
                continue  # a recipe without data preparation (the importance comparison)
            assert os.path.isfile(os.path.join(ROOT, row[field])), (row["recipe_id"], field)
    assert {row["Dataset"] for row in ROWS} == {
        "LLaMAQuestions",
        "LibriSpeech",
        "VoiceAssistant",
        "MiniSpokenQA",
        "WebQuestions",
    }


@pytest.mark.parametrize("hparam_file", sorted({row["Hparam_file"] for row in ROWS}))
def test_yaml_booleans_are_python_spelled(hparam_file):
    """``True``/``False``, as SpeechBrain's yamls write them (``true`` loads too, but reads
    as a different convention in a recipe a maintainer reviews)."""
    with open(os.path.join(ROOT, hparam_file)) as handle:
        text = handle.read()
    assert not re.search(r":\s*(true|false)\s*(#.*)?$", text, re.M), hparam_file


@pytest.mark.parametrize("hparam_file", sorted({row["Hparam_file"] for row in ROWS}))
def test_every_included_fragment_takes_command_line_overrides(hparam_file):
    """``key: !include:fragment`` with no arguments is a scalar in the resolved yaml, so
    ``--key="{field: value}"`` fails ("structure of the overrides doesn't match")."""
    with open(os.path.join(ROOT, hparam_file)) as handle:
        text = handle.read()
    bare = re.findall(r"^(\w+): !include:\S+\n(?!    )", text, re.M)
    assert not bare, f"{hparam_file}: give these includes an argument line: {bare}"


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=row_id)
def test_every_yaml_loads_with_its_rows_flags(row, recipe_fixtures):
    nested = ["--lora={rank: 4}", "--fsdp={param_dtype: bfloat16}"]  # reach the objects
    flags = shlex.split(row["test_debug_flags"]) + ["--output_folder=unused", *nested]
    _, _, overrides = sb.parse_arguments([os.path.join(ROOT, row["Hparam_file"]), *flags])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with open(os.path.join(ROOT, row["Hparam_file"])) as handle:
            hparams = load_hyperpyyaml(handle, overrides)
    finally:
        os.chdir(cwd)
    assert {"modules", "opt_class", "checkpointer", "epoch_counter", "train_logger"} <= set(hparams)
    assert hparams["training_strategy"].name == row_strategy(row)
    assert hparams["lora"].rank == 4 and hparams["lora"].alpha == 16
    assert hparams["fsdp"].param_dtype == "bfloat16" and hparams["parallelism"] == "ddp"


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=row_id)
def test_recipe_row_runs_and_passes_its_checks(row, recipe_fixtures, tmp_path):
    out = tmp_path / row["recipe_id"]
    result = run_row(row, out)
    assert result.returncode == 0, failure_report(result)
    assert not check_files(row["test_debug_checks"], out)
    assert check_performance(row["test_debug_checks"], out) is None
    log = (out / "log.txt").read_text()
    strategy = row_strategy(row)
    if row["Dataset"] == "LibriSpeech":
        train_log = (out / "train_log.txt").read_text()
        assert "valid WER" in train_log and "text_ppl" in train_log
        with open(out / "manifests" / "train.csv") as handle:
            assert len(list(csv.DictReader(handle))) == 8  # both training splits merged
    if row["Dataset"] == "VoiceAssistant":
        results = json.loads((out / "results.json").read_text())
        accuracy = results["accuracy"]["llama_questions"]
        for metric in ("T2T", "S2T"):  # the per-item report's matches, recomputed
            expected, items = accuracy_from_tsv(out / f"llama_questions_{metric.lower()}.tsv")
            assert accuracy[metric] == pytest.approx(expected) and items == 4, metric
        assert results["training"] == {"skipped_steps": 0, "dropped_items": 0}
        if "voiceassistant/data" in row["test_debug_flags"]:  # VoiceAssistant-400K's parquet
            assert "skipped 1 rows: {'undecodable audio" in result.stderr + log
            with open(out / "manifests" / "train.csv") as handle:
                assert {r["split_name"] for r in csv.DictReader(handle)} == {"qa", "identity"}
        else:
            assert "skipped 1 items" in result.stderr + log
        # at least one optimizer step: a trained LLM's importance moves, a frozen one's does not
        if strategy == "frozen_llm":
            assert results["shift"]["js"] == 0.0
        else:
            assert results["shift"]["js"] > 0.0, results["shift"]


def run_torchrun(command, cwd, env, timeout=600):
    """Runs ``torchrun`` and stops it cleanly on timeout.

    torch elastic starts each worker in its own session, so killing the
    process group would miss them: terminate torchrun itself, which forwards
    SIGTERM to its workers.
    """
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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


def run_row_under_torchrun(row, output_folder, extra_flags=()):
    """Runs one CSV row with ``torchrun``, 2 gloo processes (see ``row_command``)."""
    script, arguments = row_command(
        row, output_folder, ["--distributed_backend=gloo", *extra_flags]
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        script,
        *arguments,
    ]
    # a rank that aborts prints every thread's Python stack (faulthandler)
    env = dict(row_env(script), PYTHONFAULTHANDLER="1")
    returncode, _, stderr = run_torchrun(command, ROOT, env)
    assert returncode == 0, stderr[-4000:]
    log = (output_folder / "log.txt").read_text()
    assert "Closed the process group of 2 ranks." in log  # every rank left together


@pytest.mark.parametrize("persistent", [False, True], ids=["debug", "debug_persistently"])
def test_spoken_qa_recipe_trains_and_scores_under_torchrun_with_two_processes(
    persistent, recipe_fixtures, tmp_path
):
    """DDP on CPU (gloo), 2 epochs so keep-only deletion runs; ranks share checkpoints."""
    row = next(r for r in ROWS if r["Dataset"] == "VoiceAssistant" and row_strategy(r) == "lora")
    out = tmp_path / "out"
    flags = ["--number_of_epochs=2", "--debug_epochs=2"]
    run_row_under_torchrun(row, out, flags + (["--debug_persistently"] if persistent else []))
    results = json.loads((out / "results.json").read_text())
    assert {"T2T", "S2T"} <= set(results["accuracy"]["llama_questions"])
    assert "epoch: 2" in (out / "train_log.txt").read_text()
    if persistent:
        saved = os.listdir(out / "save")
        assert 1 <= len([d for d in saved if d.startswith("CKPT")]) <= 2  # best + most recent
        assert not [d for d in saved if d.startswith(".staging")]


def best_checkpoint_tensors(save_folder, key):
    """The model tensors of the best FSDP checkpoint (a DCP folder), whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from speechbrain_sllm.brains import MAX_METRICS
    from speechbrain_sllm.checkpointing import AtomicCheckpointer

    best_key = {"max_key": key} if key in MAX_METRICS else {"min_key": key}
    best = AtomicCheckpointer(str(save_folder)).find_checkpoint(**best_key)
    sharded = [path for path in best.paramfiles.values() if os.path.isdir(path)]
    assert len(sharded) == 1, best.paramfiles  # the DCP folder of the trainable shards
    whole = os.path.join(str(save_folder), "whole.pt")
    dcp_to_torch_save(sharded[0], whole)
    return torch.load(whole, weights_only=True)["model"]


# peft keeps adapters in float32: with LoRA, float32 weights and bfloat16 compute
FLOAT32_WEIGHTS = ["--llm={dtype: float32}", "--fsdp={param_dtype: bfloat16}"]
FSDP_RUNS = {  # id: (dataset, strategy, extra flags, checkpoint key)
    "VoiceAssistant-lora": ("VoiceAssistant", "lora", FLOAT32_WEIGHTS, "S2T"),
    # the yaml's bfloat16 LLM; encoder and adaptor (float32) are units of their own
    "VoiceAssistant-full_ft": ("VoiceAssistant", "full_ft", [], "S2T"),
    # base importance on shards feeds the layer-wise rates
    "LibriSpeech-lora_layerwise_lr": ("LibriSpeech", "lora_layerwise_lr", FLOAT32_WEIGHTS, "WER"),
}


@pytest.mark.parametrize("run", sorted(FSDP_RUNS))
def test_recipe_trains_sharded_with_fsdp_under_torchrun_and_exports_whole_tensors(
    run, recipe_fixtures, tmp_path
):
    """``--parallelism=fsdp``: importance on shards, DCP checkpoints, the exported model
    equal to the best checkpoint, LoRA merged into the shards (spoken QA)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from speechbrain_sllm.inference import SpeechLLMInference

    dataset, strategy, extra_flags, key = FSDP_RUNS[run]
    out = tmp_path / "out"
    row = next(r for r in ROWS if r["Dataset"] == dataset)
    flags = ["--parallelism=fsdp", f"--strategy={strategy}", "--debug_persistently"]
    run_row_under_torchrun(row, out, flags + extra_flags)
    if dataset == "VoiceAssistant":
        results = json.loads((out / "results.json").read_text())
        assert {"T2T", "S2T"} <= set(results["accuracy"]["llama_questions"])
        assert results["shift"]["js"] > 0.0  # importance moved: the merged / trained weights
    else:
        assert (out / "test-clean_wer.txt").is_file()
        assert (out / "importance" / "base" / "profile.json").is_file()
    exported = torch.load(out / "inference" / "model.ckpt", weights_only=True)
    best = best_checkpoint_tensors(out / "save", key)
    assert exported.keys() == best.keys() and exported
    for name, tensor in exported.items():
        assert torch.equal(tensor, best[name]), name
    model = SpeechLLMInference.from_hparams(source=str(out / "inference"))
    wav = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "spokenqa", "wav", "*.wav")))[0]
    assert isinstance(model.answer_file(wav), str)
    if "lora" in strategy:
        base = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "tests/fixtures/tiny_llm"))
        adapter = PeftModel.from_pretrained(base, str(out / "inference" / "lora_adapter"))
        loaded = {n: p for n, p in adapter.named_parameters() if "lora_" in n}
        assert len(loaded) == len([n for n in exported if "lora_" in n])
        for name, tensor in loaded.items():
            ours = exported[f"llm.{name}"]
            assert torch.equal(tensor.to(ours.dtype), ours), name


def test_a_trained_spoken_qa_run_loads_for_inference_and_as_a_peft_adapter(
    recipe_fixtures, tmp_path
):
    """The recipe's exported folder answers like the recipe's own S2T decoding, and its
    LoRA adapter loads in plain transformers + peft with the same text outputs."""
    from peft import PeftModel
    from speechbrain.dataio.batch import PaddedBatch
    from transformers import AutoModelForCausalLM

    from speechbrain_sllm.data.dataio import load_audio
    from speechbrain_sllm.inference import SpeechLLMInference
    from speechbrain_sllm.metrics import tsv_field

    row = next(r for r in ROWS if r["Dataset"] == "VoiceAssistant" and row_strategy(r) == "lora")
    out = tmp_path / "out"
    result = run_row(row, out, ["--llm={dtype: float32}", "--precision=fp32"])
    assert result.returncode == 0, failure_report(result)
    model = SpeechLLMInference.from_hparams(source=str(out / "inference"))
    with open(out / "llama_questions_s2t.tsv") as handle:
        recipe = {line.split("\t")[0]: line.split("\t")[2] for line in handle}
    # the recipe decoded batches of 2 in manifest order: decode the first batch the same way
    with open(out / "manifests" / "test_llama_questions.csv") as handle:
        first_two = list(csv.DictReader(handle))[:2]
    wavs = [load_audio(item["wav"]) for item in first_two]
    batch = PaddedBatch([{"sig": wav} for wav in wavs])
    answers = model.answer_batch(*batch.sig)
    assert [tsv_field(a) for a in answers] == [recipe[item["ID"]] for item in first_two]
    single = model.answer_file(first_two[0]["wav"])
    assert single == model.answer_batch(wavs[0][None], torch.ones(1))[0]

    base = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "tests/fixtures/tiny_llm"))
    plain = PeftModel.from_pretrained(base, str(out / "inference" / "lora_adapter")).eval()
    ids = torch.tensor([[2, 5, 7, 9, 11]])
    with torch.no_grad():
        ours = model.mods.model.llm(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
