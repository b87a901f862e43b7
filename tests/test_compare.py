"""`python -m speechbrain_sllm.importance compare`: any two causal LMs, as a user runs it."""

import json
import os

import pytest
import torch
from conftest import llama_config

from speechbrain_sllm.data.dataio import make_qa_dataset, write_csv_manifest
from speechbrain_sllm.data.prompts import ChatPrompt
from speechbrain_sllm.data.tokenizers import HFTokenizer
from speechbrain_sllm.evaluation import QAEvaluator
from speechbrain_sllm.importance.__main__ import main as compare_main
from speechbrain_sllm.importance.checkpoints import ComparisonError
from speechbrain_sllm.importance.compare import CompareSettings, compare_checkpoints
from speechbrain_sllm.importance.stage import run_importance
from speechbrain_sllm.importance.text_sets import TextSetError
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.study.report import importance_shift

SHIFT_KEYS = ("js", "kl", "spearman", "emd_layers", "peak_before", "peak_after")


def tuned_copy(llm, seed=1, scale=0.05):
    """A "fine-tuned" model: every weight moved by seeded noise, more in the last layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            boost = 4.0 if ".layers.2." in name else 1.0
            param.add_(torch.randn(param.shape, generator=generator) * scale * boost)
    return llm


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer, kb_pairs):
    """A base LLM and a tuned copy saved as HF folders, and a QA manifest of written questions."""
    folder = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    base = load_causal_lm(config=llama_config(vocab_size=len(tokenizer)))
    paths = {"base": str(folder / "base"), "tuned": str(folder / "tuned")}
    base.save_pretrained(paths["base"])
    tokenizer.to_hf(paths["base"])
    tuned_copy(base).save_pretrained(paths["tuned"])
    rows = [
        {"ID": f"q{i}", "question": p["question"], "answer": p["answer"]}
        for i, p in enumerate(kb_pairs[:12])
    ]
    paths["text"] = str(folder / "qa.csv")
    write_csv_manifest(rows, ["ID", "question", "answer"], paths["text"])
    return paths


def run_cli(pair, output, tuned=None, text=None, *extra):
    compare_main(
        ["compare", "--base", pair["base"], "--tuned", tuned or pair["tuned"], "--text",
         text or pair["text"], "--output_folder", str(output), "--batch_size", "4",
         "--no_plan", *extra]
    )  # fmt: skip
    with open(output / "shift.json") as handle:
        return json.load(handle)


def study_side(source, base, text, batch_size=4):
    """Profile and scores of one model as the study computes them (run_importance)."""
    tokenizer = HFTokenizer(base)
    prompt = ChatPrompt(tokenizer)
    evaluator = QAEvaluator(SpeechLLM(load_causal_lm(source)), prompt, tokenizer)
    dataset = make_qa_dataset(text, prompt, with_audio=False)
    profile, accumulator = run_importance(
        evaluator, dataset, os.devnull + "_unused", batch_size=batch_size, mode="text"
    )
    return profile, accumulator.scores()


def test_compare_writes_the_study_shift_between_two_saved_models(pair, tmp_path, monkeypatch):
    monkeypatch.setattr("speechbrain_sllm.importance.stage.save_profile", lambda *a: None)
    shift = run_cli(pair, tmp_path)
    base_profile, base_scores = study_side(pair["base"], pair["base"], pair["text"])
    tuned_profile, tuned_scores = study_side(pair["tuned"], pair["base"], pair["text"])
    expected, iou = importance_shift(base_profile, base_scores, tuned_profile, tuned_scores)
    for key in SHIFT_KEYS:
        assert shift[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), key
    assert shift["top3_iou"] == pytest.approx(iou)
    assert 0 < shift["js"] and shift["top3_iou"] < 1  # the tuned copy did move
    for side, profile in (("base", base_profile), ("tuned", tuned_profile)):
        with open(tmp_path / side / "profile.json") as handle:
            written = json.load(handle)
        assert [x["sum"] for x in written["layers"]] == pytest.approx(
            [x["sum"] for x in profile["layers"]], rel=1e-6
        )
        zeroing = shift["sides"][side]["zeroing"]
        assert set(zeroing) == {"none", "top", "random", "bottom"}
        assert (tmp_path / side / "structure.json").is_file()
    report = (tmp_path / "report.md").read_text()
    assert f"{shift['js']:.3g}" in report and pair["tuned"] in report
    plots = sorted(os.listdir(tmp_path / "plots"))
    assert "layer_importance.png" in plots and "row_column_concentration.png" in plots
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".staging")]


def test_a_peft_adapter_and_a_prefixed_composite_checkpoint_compare_as_the_merged_model(
    pair, tmp_path
):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(3)
    lora = get_peft_model(
        load_causal_lm(pair["base"]), LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    # a speech LLM's checkpoint: the LLM under "llm.", an encoder beside it, in two shards
    state = {f"llm.{k}": v.contiguous() for k, v in merged.state_dict().items()}
    state["encoder.conv.weight"] = torch.ones(4, 4)
    names = sorted(state)
    composite = tmp_path / "speech_llm"
    composite.mkdir()
    shards = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, composite / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (composite / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    reference = run_cli(pair, tmp_path / "out_merged", str(tmp_path / "merged"))
    adapter = run_cli(pair, tmp_path / "out_adapter", str(tmp_path / "adapter"))
    prefixed = run_cli(
        pair, tmp_path / "out_prefixed", str(composite), None, "--tuned_prefix", "llm."
    )
    for shift in (adapter, prefixed):
        for key in (*SHIFT_KEYS, "top3_iou"):
            assert shift[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-9), key
    assert reference["js"] > 0


def test_plain_text_is_scored_on_every_next_token(pair, tmp_path):
    from speechbrain_sllm.importance.text_sets import text_set

    passages = ["the cat sat on the mat", "", "a dog ran home and we like green tea"]
    (tmp_path / "text.txt").write_text("\n".join(passages) + "\n")
    tokenizer = HFTokenizer(pair["base"])
    dataset, description = text_set(
        str(tmp_path / "text.txt"), ChatPrompt(tokenizer), tokenizer.tokenizer
    )
    assert description == {
        "file": str(tmp_path / "text.txt"),
        "format": "text",
        "items": 2,
        "skipped": 0,
    }
    llm = load_causal_lm(pair["base"])
    evaluator = QAEvaluator(SpeechLLM(llm), ChatPrompt(tokenizer), tokenizer)
    from speechbrain_sllm.model.speech_llm import shifted_lm_loss

    for index, passage in zip(range(len(dataset)), [passages[0], passages[2]]):
        from speechbrain.dataio.batch import PaddedBatch

        batch = PaddedBatch([dataset[index]])
        ours = shifted_lm_loss(*evaluator.forward(batch, "text"), "sum")
        ids = torch.tensor([tokenizer.tokenizer(passage).input_ids])
        hf_mean = llm(input_ids=ids, labels=ids).loss  # HF: mean over every next token
        assert ours.item() == pytest.approx(hf_mean.item() * (ids.shape[1] - 1), rel=1e-5)


def test_models_of_another_depth_are_refused(pair, tmp_path, tokenizer):
    shallow = load_causal_lm(config=llama_config(vocab_size=len(tokenizer), layers=2))
    shallow.save_pretrained(tmp_path / "shallow")
    with pytest.raises(ComparisonError, match=r"num_hidden_layers: base 3, tuned 2"):
        compare_checkpoints(
            pair["base"], str(tmp_path / "shallow"), pair["text"], str(tmp_path / "o")
        )
    state = {f"llm.{k}": v for k, v in shallow.state_dict().items()}
    torch.save(state, tmp_path / "shallow.ckpt")
    with pytest.raises(ComparisonError, match="has 2 decoder layers, the base model 3"):
        compare_checkpoints(
            pair["base"], str(tmp_path / "shallow.ckpt"), pair["text"], str(tmp_path / "o"), "llm."
        )
    assert not (tmp_path / "o").exists()


def test_tensors_on_one_side_only_are_named_and_compared_only_when_asked(pair, tmp_path):
    tuned = load_causal_lm(pair["tuned"])
    vocab = tuned.config.vocab_size
    tuned.resize_token_embeddings(vocab + 4)  # an extended vocabulary (speech tokens)
    state = {f"llm.{k}": v for k, v in tuned.state_dict().items()}
    state["llm.speech_head.weight"] = torch.zeros(4, 8)
    torch.save(state, tmp_path / "extended.ckpt")
    source = str(tmp_path / "extended.ckpt")
    with pytest.raises(ComparisonError) as refused:
        compare_checkpoints(pair["base"], source, pair["text"], str(tmp_path / "o"), "llm.")
    message = str(refused.value)
    assert (
        "speech_head.weight" in message
        and f"model.embed_tokens.weight: tuned ({vocab + 4}," in message
    )
    assert "--shared_only=True" in message and not (tmp_path / "o").exists()
    shared = compare_checkpoints(
        pair["base"], source, pair["text"], str(tmp_path / "o"), "llm.",
        CompareSettings(shared_only=True, batch_size=4),
    )  # fmt: skip
    reference = run_cli(pair, tmp_path / "ref")
    for key in SHIFT_KEYS:  # the shared rows are the tuned model's own
        assert shared[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-9), key


def test_a_prefix_that_matches_nothing_lists_the_prefixes_found(pair, tmp_path):
    state = {f"model.llm.{k}": v for k, v in load_causal_lm(pair["tuned"]).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "speech_llm.pt")
    source = str(tmp_path / "speech_llm.pt")
    with pytest.raises(
        ComparisonError, match=r"'llm\.' matches no tensor .*\['model\.', 'model\.llm\.'\]"
    ):
        compare_checkpoints(pair["base"], source, pair["text"], str(tmp_path / "o"), "llm.")
    with pytest.raises(ComparisonError, match=r"pass the LLM's prefix \(--tuned_prefix=llm\.\)"):
        compare_checkpoints(pair["base"], source, pair["text"], str(tmp_path / "o"))


def test_a_text_file_without_usable_items_is_refused_with_its_format(pair, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"question": "no answer here"}) + "\n")
    with pytest.raises(TextSetError, match=r"empty\.jsonl' has no usable item \(1 skipped\)"):
        compare_checkpoints(
            pair["base"], pair["tuned"], str(tmp_path / "empty.jsonl"), str(tmp_path / "o")
        )
    with pytest.raises(SystemExit, match="compare: Text file .* has no usable item"):
        run_cli(pair, tmp_path / "o", None, str(tmp_path / "empty.jsonl"))
    assert not (tmp_path / "o").exists()


def test_the_planner_names_the_known_shapes_and_judges_a_device(capsys):
    from speechbrain_sllm.plan import main as plan_main

    with pytest.raises(
        SystemExit, match=r"'8b' is not a known shape name \(llama-3.2-1b, llama-3.1-8b"
    ):
        plan_main(["--llm", "8b"])
    plan_main(["--llm", "llama-3.1-8b", "--command", "compare", "--device-memory", "24GB"])
    out = capsys.readouterr().out
    assert "does NOT fit in 24.0 GiB" in out and "the largest part importance" in out


def test_torchrun_with_fsdp_gives_the_single_process_comparison(pair, tmp_path):
    import subprocess
    import sys

    from helpers import failure_report

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        "-m", "speechbrain_sllm.importance", "compare", "--base", pair["base"], "--tuned",
        pair["tuned"], "--text", pair["text"], "--output_folder", str(tmp_path / "fsdp"),
        "--batch_size", "4", "--fsdp", "True",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, failure_report(result)
    assert "memory plan (compare, per rank)" in result.stdout
    with open(tmp_path / "fsdp" / "shift.json") as handle:
        sharded = json.load(handle)
    single = run_cli(pair, tmp_path / "single")
    for key in (*SHIFT_KEYS, "top3_iou"):
        assert sharded[key] == pytest.approx(single[key], rel=1e-4, abs=1e-9), key
    for side in ("base", "tuned"):
        ours, reference = sharded["sides"][side], single["sides"][side]
        assert ours["numel"] == reference["numel"]
        assert ours["zeroing"]["top"] == pytest.approx(reference["zeroing"]["top"], rel=1e-4)


def test_the_recipe_row_runs_as_upstream_runs_it(recipe_fixtures, tmp_path):
    from helpers import failure_report
    from test_recipes import ROWS, check_files, run_row

    (row,) = [r for r in ROWS if r["Dataset"] == "LLaMAQuestions"]
    result = run_row(row, tmp_path)
    assert result.returncode == 0, failure_report(result)
    assert check_files(row["test_debug_checks"], tmp_path) == []
    with open(tmp_path / "shift.json") as handle:
        shift = json.load(handle)
    assert shift["text"]["format"] == "qa" and shift["text"]["items"] == 12
    assert shift["js"] > 0 and "top3_iou" in shift
