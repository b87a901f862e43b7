"""The real-model study recipe (recipes/WebQuestions/SpokenQA/speechllm), run with
``--debug`` on SmolLM2-135M-Instruct and Whisper tiny.en converted from PyPI packages.

LLaMA Questions and WebQuestions come from ../shared/data when it is there; elsewhere
the test writes small sets in the same formats (LLaMA Questions-style recordings
synthesised with eSpeak), so the same code path runs everywhere.
"""

import csv
import json
import os
import random
import subprocess
import sys

import pytest
import soundfile
from conftest import LLAMA_QUESTIONS, ROOT
from helpers import accuracy_from_tsv, failure_report, tsv_rows
from test_recipes import ROWS, check_files, row_command

from speechbrain_sllm.data.tts import EspeakTTS
from speechbrain_sllm.inference import SpeechLLMInference

RECIPE = os.path.join(ROOT, "recipes", "WebQuestions", "SpokenQA", "speechllm")
WEBQUESTIONS = os.path.join(os.path.dirname(LLAMA_QUESTIONS), "webquestions", "main")
FALLBACK_QA = [
    ("what is the capital of france?", ["Paris"]),
    ("who wrote romeo and juliet?", ["William Shakespeare"]),
    ("what language do they speak in brazil?", ["Portuguese"]),
    ("how many legs does a spider have?", ["8"]),
    ("what is the largest planet in the solar system?", ["Jupiter"]),
    ("who painted the mona lisa?", ["Leonardo da Vinci"]),
    ("what currency does japan use?", ["Japanese yen"]),
    ("which ocean is the largest?", ["Pacific Ocean"]),
    ("who was the first president of the united states?", ["George Washington"]),
    ("what is the chemical symbol for gold?", ["Au"]),
    ("where is the eiffel tower?", ["Paris"]),
    ("what is the tallest mountain in the world?", ["Mount Everest"]),
]


def write_webquestions(folder):
    """WebQuestions-format JSON files (train / val / test) from ``FALLBACK_QA``."""
    os.makedirs(folder, exist_ok=True)
    items = [{"qId": f"wq{i}", "qText": q, "answers": a} for i, (q, a) in enumerate(FALLBACK_QA)]
    for name in ("trainmodel.json", "val.json", "test.json"):
        with open(os.path.join(folder, name), "w") as handle:
            json.dump(items, handle)
    return folder


def write_llama_questions(folder):
    """A LLaMA Questions-format folder: TSV + wav files spoken by eSpeak."""
    os.makedirs(folder, exist_ok=True)
    tts = EspeakTTS()
    with open(os.path.join(folder, "llama_questions_300.tsv"), "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["Questions", "Answer", "Wav Filename"])
        for index, (question, answers) in enumerate(FALLBACK_QA[:8], 1):
            wav = tts.synthesize(question, voice="en-us+f4", rate=160)  # not a training voice
            soundfile.write(os.path.join(folder, f"{index}.wav"), wav.numpy(), 16000)
            writer.writerow([question, answers[0], f"{index}.wav"])
    return folder


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("webq_data")
    webq = WEBQUESTIONS if os.path.isdir(WEBQUESTIONS) else write_webquestions(folder / "webq")
    llamaq = LLAMA_QUESTIONS
    if not os.path.isdir(llamaq):
        llamaq = write_llama_questions(folder / "llamaq")
    return str(webq), str(llamaq)


def debug_command(output, webq, llamaq, llm, whisper):
    """The recipe's CSV row (``--debug`` on 8 training questions and 8 per test set) with
    the fixtures' data and models.

    Stage 1a reads all 8 training questions, the rest of the run the first 6.
    """
    row = next(r for r in ROWS if r["Dataset"] == "WebQuestions")
    fixtures = [
        f"--data_folder={webq}",
        f"--llama_questions_folder={llamaq}",
        f"--llm_source={llm}",
        f"--encoder_source={whisper}",
    ]
    script, arguments = row_command(row, output, fixtures)
    return [sys.executable, script, *arguments]


def test_prepare_adds_varied_renderings_in_unseen_voices(tmp_path):
    sys.path.insert(0, RECIPE)
    from webquestions_prepare import prepare_webquestions, varied_voices

    webq = write_webquestions(tmp_path / "webq")
    llamaq = write_llama_questions(tmp_path / "llamaq")
    save = tmp_path / "prepared"
    options = {"num_train": 4, "num_valid": 2, "num_test": 2, "num_llamaq": 2}
    paths = prepare_webquestions(webq, save, llamaq, varied_renderings=2, **options)
    with open(paths["train"]) as handle:
        train = list(csv.DictReader(handle))
    with open(paths["align"]) as handle:
        align = list(csv.DictReader(handle))
    assert align[:4] == train and len(align) == 12
    for k in (1, 2):
        varied = align[4 * k : 4 * (k + 1)]
        assert [row["ID"] for row in varied] == [f"{row['ID']}_v{k}" for row in train]
        assert [row["question"] for row in varied] == [row["question"] for row in train]
        assert all(os.path.isfile(row["wav"]) for row in varied)
    # each rendering is a different recording of the same question
    durations = {row["question"]: set() for row in train}
    for row in align:
        durations[row["question"]].add(row["duration"])
    assert all(len(found) > 1 for found in durations.values())
    # the same options: nothing redone; varied_renderings is part of the record
    mtime = os.path.getmtime(paths["align"])
    prepare_webquestions(webq, save, llamaq, varied_renderings=2, **options)
    assert os.path.getmtime(paths["align"]) == mtime
    prepare_webquestions(webq, save, llamaq, varied_renderings=0, **options)
    with open(paths["train"]) as handle:
        train = list(csv.DictReader(handle))  # durations may differ by a sample: redone
    with open(paths["align"]) as handle:
        assert list(csv.DictReader(handle)) == train
    # a test voice's variant is never drawn for training
    voices = varied_voices(300, [("en-us+m1", 160)], random.Random(0))
    assert not any(voice.endswith("+m1") for voice, _, _ in voices)
    assert len({voice for voice, _, _ in voices}) > 100


def test_hardware_names_the_device_the_run_used(monkeypatch):
    import torch

    from speechbrain_sllm.study import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware("cpu").startswith("cpu; ")  # a GPU in the machine, the run on the CPU
    assert hardware("cuda:0").startswith("cuda:0 (NVIDIA H200); ")


def test_debug_run_of_every_strategy_on_real_models(real_models, study_data, tmp_path):
    webq, llamaq = study_data
    output = tmp_path / "study"
    command = debug_command(output, webq, llamaq, real_models["llm"], real_models["whisper"])
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, failure_report(done)
    row = next(r for r in ROWS if r["Dataset"] == "WebQuestions")
    assert not check_files(row["test_debug_checks"], output)
    with open(output / "results.json") as handle:
        results = json.load(handle)
    strategies = results["strategies"]
    assert list(strategies) == ["full_ft", "layerwise_lr", "lora", "frozen_llm"]
    for name, run in strategies.items():  # accuracy: the per-item answers that match
        for column in ("llamaq_t2t", "llamaq_s2t", "webq_t2t", "webq_s2t"):
            tsv = output / "finetune" / name / f"{column}.tsv"
            accuracy, items = accuracy_from_tsv(tsv)
            assert run[column] == pytest.approx(accuracy) and items == 8, (name, column)
    # the cascade reference: Whisper's decoder transcribed each spoken test set, the base
    # LLM answered the transcripts; its accuracy is the per-item file's; its WER is low on
    # real recordings (measured 0% on these 8) and below 60% on eSpeak's voices (27%)
    cascade = results["base"]["cascade"]
    real_recordings = llamaq == LLAMA_QUESTIONS
    for name, most in (("llamaq", 10.0 if real_recordings else 60.0), ("webq", 60.0)):
        accuracy, items = accuracy_from_tsv(output / "cascade" / f"{name}_cascade.tsv")
        assert cascade[f"{name}_s2t"] == pytest.approx(accuracy) and items == 8, name
        assert cascade[f"{name}_wer"] < most, name
    with open(output / "cascade" / "llamaq.csv") as handle:
        heard = [row["question"] for row in csv.DictReader(handle)]
    assert len(heard) == 8 and all(question.strip() for question in heard)
    assert "| cascade: Whisper's own decoder" in (output / "results.md").read_text()
    stage1_s2t, _ = accuracy_from_tsv(output / "align" / "llamaq_s2t.tsv")
    assert results["align"]["llamaq_s2t"] == pytest.approx(stage1_s2t)
    # a frozen LLM's text scores are the base LLM's; a fine-tuned one's perplexity moves
    assert strategies["frozen_llm"]["text_ppl"] == pytest.approx(results["base"]["text_ppl"])
    assert strategies["full_ft"]["text_ppl"] != pytest.approx(results["base"]["text_ppl"])
    # stage 1a (CTC onto the LLM's input embeddings) ran and logged its epochs
    ctc_keys = {"ctc_valid_loss", "ctc_valid_wer", "ctc_llamaq_wer", "ctc_webq_wer"}
    assert ctc_keys <= set(results["align"])  # best-path WER on each test set too
    assert "WER" in (output / "align" / "ctc" / "train_log.txt").read_text()
    # the LLM trains in every strategy but frozen_llm: its importance moves, or not at all
    for name in ("full_ft", "layerwise_lr", "lora"):
        assert strategies[name]["shift"]["js"] > 0, name
    assert strategies["frozen_llm"]["shift"]["js"] == 0
    assert strategies["frozen_llm"]["top3_iou"] == 1.0
    # the frozen LLM answers written questions exactly as the base LLM did
    for column in ("llamaq_t2t", "webq_t2t", "text_ppl"):
        assert strategies["frozen_llm"][column] == pytest.approx(results["base"][column])
    unchanged = {"lost": 0, "gained": 0, "p": 1.0}  # item by item, not just on average
    assert results["paired_t2t_vs_base"]["frozen_llm"]["llamaq_t2t"] == unchanged
    zeroing = results["base"]["zeroing"]
    assert zeroing["top"] > zeroing["bottom"]
    with open(output / "importance" / "base" / "profile.json") as handle:
        assert json.load(handle)["scope"] == "decoder_linear"
    # base_answers targets: the base LLM's own answers, one per training question
    with open(output / "targets" / "train.csv") as handle:
        targets = list(csv.DictReader(handle))
    assert 0 < len(targets) <= 6 and all(row["answer"].strip() for row in targets)
    # every trained stage is exported; stage 1's answers a recording as the study scored it
    for stage in ("align", "finetune/full_ft", "finetune/layerwise_lr", "finetune/lora"):
        assert (output / stage / "inference" / "model.ckpt").is_file(), stage
    assert (output / "finetune/lora/inference/lora_adapter/adapter_config.json").is_file()
    assistant = SpeechLLMInference.from_hparams(source=str(output / "align" / "inference"))
    item, _, scored, _ = tsv_rows(output / "align" / "llamaq_s2t.tsv")[0]
    with open(output / "data" / "llamaq_test.csv") as handle:
        wav = next(row["wav"] for row in csv.DictReader(handle) if row["ID"] == item)
    assert assistant.answer_file(wav).strip() == scored.strip()
    for name in ("results.md", "timings.json", "plots/layer_importance.png"):
        assert (output / name).is_file(), name
    assert "| full_ft |" in (output / "results.md").read_text()
    # the importance comparison of any two checkpoints, run as a user would on the
    # full-FT export (a composite checkpoint: the LLM under "llm."), gives the study's shift
    compare = [
        sys.executable, "-m", "speechbrain_sllm.importance", "compare",
        "--base", real_models["llm"], "--tuned", str(output / "finetune/full_ft/inference/model.ckpt"),
        "--tuned_prefix", "llm.", "--text", str(output / "targets" / "train.csv"),
        "--output_folder", str(tmp_path / "compare"), "--scope", "decoder_linear",
        "--fraction", "0.0333", "--seed", "1234", "--batch_size", "2", "--zeroing_fraction", "0",
    ]  # fmt: skip
    done = subprocess.run(compare, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, failure_report(done)
    with open(tmp_path / "compare" / "shift.json") as handle:
        compared = json.load(handle)
    study = strategies["full_ft"]
    for key in ("js", "kl", "spearman", "emd_layers", "peak_before"):
        assert compared[key] == pytest.approx(study["shift"][key], rel=1e-9, abs=1e-15), key
    assert compared["top3_iou"] == pytest.approx(study["top3_iou"], rel=1e-9)
