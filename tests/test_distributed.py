"""Every collective the package issues, run in a 2-process gloo group.

A collective that only some ranks join makes gloo time out: the group is
created with a 60 s timeout, so a regression fails within a minute instead
of hanging the suite.
"""

import datetime
import json
import os

import pytest
import torch
from helpers import make_brain

from speechbrain_sllm.data.dataio import make_qa_dataset

TIMEOUT = datetime.timedelta(seconds=60)


def init_group(rank, world, init_file):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT
    )


def evaluate(brain, manifest, prompt):
    """Item-by-item S2T/T2T decoding and both perplexities on 5 items (uneven shards)."""
    dataset = make_qa_dataset(manifest, prompt).filtered_sorted(select_n=5)
    return {
        "speech": brain.evaluator().decode(dataset, mode="speech", batch_size=2),
        "text": brain.evaluator().decode(dataset, mode="text", batch_size=2),
        "ppl_text": brain.evaluator().perplexity(dataset, mode="text", batch_size=2),
        # batch size 1: the speech path's valid-frame count comes from relative
        # lengths, so it depends (slightly) on how much padding a batch holds
        "ppl_speech": brain.evaluator().perplexity(dataset, mode="speech", batch_size=1),
    }


def _worker(rank, world, init_file, manifest, spm_path, out, debug):
    import speechbrain  # noqa: F401

    from speechbrain_sllm.checkpointing import TrainableState
    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer
    from speechbrain_sllm.distributed import (
        all_reduce_sum,
        close_process_group,
        gather_in_order,
        is_distributed,
        rank_shard,
    )

    init_group(rank, world, init_file)
    gathered = gather_in_order([f"item{i}" for i in rank_shard(range(5))], rank_shard(range(5)))
    sums = all_reduce_sum([rank + 1.0, 2.0])
    tokenizer = SentencePieceTokenizer(spm_path)
    prompt = ChatPrompt(tokenizer)
    brain = make_brain("lora", tokenizer, prompt, out, debug=debug)
    brain.init_optimizers()
    brain.checkpointer.add_recoverable("model", TrainableState(brain.modules.model))
    # Two end-of-epoch saves, so keep-only deletion runs; then every rank restores the best.
    for loss in (2.0, 1.0, 3.0):
        brain.checkpointer.save_and_keep_only(meta={"loss": loss}, min_keys=["loss"])
    best = brain.checkpointer.recover_if_possible(min_key="loss")
    kept = sorted(p.name for p in brain.checkpointer.checkpoints_dir.iterdir())
    result = {
        "gathered": gathered,
        "sums": sums,
        "best_loss": best.meta["loss"],
        "ckpt_dir": str(brain.checkpointer.checkpoints_dir),
        "kept": kept,
        **evaluate(brain, manifest, prompt),
    }
    close_process_group()  # the end of a torchrun script: both ranks leave together
    result["group_closed"] = not is_distributed()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


@pytest.mark.parametrize("debug", [False, True], ids=["output-folder", "debug-tempdir"])
def test_two_ranks_checkpoint_evaluate_and_reduce_like_one_process(
    debug, tokenizer, prompt, manifests, tmp_path
):
    torch.multiprocessing.spawn(
        _worker,
        args=(
            2,
            str(tmp_path / "init"),
            manifests["speech"],
            tokenizer.model_path,
            str(tmp_path),
            debug,
        ),
        nprocs=2,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["gathered"] == [f"item{i}" for i in range(5)]
        assert result["sums"] == [3.0, 4.0]
        assert result["best_loss"] == 1.0
        # three saved; keep-only deleted one (kept: the best and the most recent)
        assert len([name for name in result["kept"] if name.startswith("CKPT")]) == 2
        assert not [name for name in result["kept"] if name.startswith(".staging")]
        assert result["group_closed"]
    assert ranks[0]["ckpt_dir"] == ranks[1]["ckpt_dir"]
    assert ranks[0]["speech"] == ranks[1]["speech"]

    (tmp_path / "single").mkdir()
    single = make_brain("lora", tokenizer, prompt, tmp_path / "single")
    expected = evaluate(single, manifests["speech"], prompt)
    assert [len(column) for column in ranks[0]["speech"]] == [5, 5, 5]
    for key in ("speech", "text"):
        assert [list(column) for column in expected[key]] == ranks[0][key], key
    for key in ("ppl_text", "ppl_speech"):
        assert ranks[0][key] == pytest.approx(expected[key], rel=1e-6), key


def text_brain_for_training(name, tokenizer, prompt, folder, run_opts):
    """A text-only SpeechLLM (no encoder, no adaptor) trained with strategy ``name``."""
    import speechbrain as sb
    from conftest import llama_config
    from helpers import strategy_for

    from speechbrain_sllm.brains import SpeechLLMBrain
    from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
    from speechbrain_sllm.strategies import apply_strategy

    torch.manual_seed(0)
    model = SpeechLLM(load_causal_lm(config=llama_config(vocab_size=len(tokenizer))))
    strategy = strategy_for(name, str(folder))
    apply_strategy(model, strategy)
    return SpeechLLMBrain(
        modules={"model": model},
        opt_class=torch.optim.AdamW,
        hparams={
            "prompt": prompt,
            "tokenizer": tokenizer,
            "training_strategy": strategy,
            "lr": 3e-3,
            "input_mode": "text",
            "epoch_counter": sb.utils.epoch_loop.EpochCounter(limit=1),
            "sorting": "ascending",  # SpeechBrain's DistributedSampler then keeps the order
        },
        run_opts={"device": "cpu", "max_grad_norm": 5.0, **run_opts},
    )


def trained_tensors(brain):
    from speechbrain_sllm.checkpointing import TrainableState

    return {k: v.clone() for k, v in TrainableState(brain.modules.model).state_dict().items()}


def _ddp_training_worker(rank, world, init_file, manifest, spm_path, out, name):
    import speechbrain  # noqa: F401

    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer

    init_group(rank, world, init_file)
    tokenizer = SentencePieceTokenizer(spm_path)
    prompt = ChatPrompt(tokenizer)
    folder = os.path.join(out, f"rank{rank}")
    os.makedirs(folder, exist_ok=True)
    brain = text_brain_for_training(
        name, tokenizer, prompt, folder, {"distributed_backend": "gloo"}
    )
    dataset = make_qa_dataset(manifest, prompt, with_audio=False)
    # DistributedSampler without shuffling: rank r trains on items r, r+2, r+4, ...
    brain.fit(brain.hparams.epoch_counter, dataset, train_loader_kwargs={"batch_size": 2})
    if rank == 0:
        torch.save(trained_tensors(brain), os.path.join(out, "ddp.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", ["full_ft", "layerwise_lr", "lora"])
def test_two_rank_ddp_training_ends_with_the_weights_of_one_process(
    name, tokenizer, prompt, manifests, tmp_path
):
    torch.multiprocessing.spawn(
        _ddp_training_worker,
        args=(
            2,
            str(tmp_path / "init"),
            manifests["text"],
            tokenizer.model_path,
            str(tmp_path),
            name,
        ),
        nprocs=2,
    )
    # One process, same global batches: (items 0, 2) + (items 1, 3) per optimizer step,
    # gradients averaged by accumulating 2 micro-batches, as DDP averages 2 ranks.
    (tmp_path / "single").mkdir()
    brain = text_brain_for_training(
        name, tokenizer, prompt, tmp_path / "single", {"grad_accumulation_factor": 2}
    )
    dataset = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    order = [i for step in range(0, 12, 4) for i in (step, step + 2, step + 1, step + 3)]
    ids = [dataset.data_ids[i] for i in order]
    dataset.data_ids = ids  # this order, batches of 2
    brain.fit(brain.hparams.epoch_counter, dataset, train_loader_kwargs={"batch_size": 2})
    single = trained_tensors(brain)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert single.keys() == ddp.keys() and single
    start = trained_tensors(text_brain_for_training(name, tokenizer, prompt, tmp_path, {}))
    assert any(not torch.equal(value, start[key]) for key, value in single.items())  # it trained
    for key, value in single.items():
        assert torch.allclose(ddp[key], value, rtol=1e-4, atol=1e-6), key


# every step clips: the global norm over all DTensor shards and groups must be the whole one
CLIPPED = {"max_grad_norm": 0.05}


def layer_importance(brain, dataset):
    from speechbrain_sllm.importance.aggregate import ScoreSet, aggregate
    from speechbrain_sllm.importance.stage import accumulate_importance

    evaluator = brain.evaluator(for_gradients=True)
    accumulator = accumulate_importance(evaluator, dataset, mode="text", batch_size=2)
    return [layer["sum"] for layer in aggregate(ScoreSet.from_accumulator(accumulator))["layers"]]


def _fsdp_training_worker(rank, world, init_file, manifest, spm_path, out, name):
    import speechbrain  # noqa: F401

    from speechbrain_sllm.checkpointing import TrainableState
    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer
    from speechbrain_sllm.fsdp import full_tensor, is_sharded

    init_group(rank, world, init_file)
    tokenizer = SentencePieceTokenizer(spm_path)
    prompt = ChatPrompt(tokenizer)
    folder = os.path.join(out, f"rank{rank}")
    os.makedirs(folder, exist_ok=True)
    brain = text_brain_for_training(
        name, tokenizer, prompt, folder, {"distributed_backend": "gloo", **CLIPPED}
    )
    brain.parallelism = "fsdp"
    dataset = make_qa_dataset(manifest, prompt, with_audio=False)
    brain.fit(brain.hparams.epoch_counter, dataset, train_loader_kwargs={"batch_size": 2})
    assert is_sharded(brain.modules.model)
    state = TrainableState(brain.modules.model).state_dict()
    tensors = {key: full_tensor(value).clone() for key, value in state.items()}  # collective
    five = dataset.filtered_sorted(select_n=5)  # 3 items on rank 0, 2 on rank 1
    results = {
        "ppl": brain.evaluator().perplexity(five, mode="text", batch_size=2),
        "decoded": brain.evaluator().decode(five, mode="text", batch_size=2),
        # importance of the trained, sharded model (LoRA: the frozen base weights too)
        "importance": layer_importance(brain, five),
    }
    if rank == 0:
        torch.save(tensors, os.path.join(out, "fsdp.pt"))
        with open(os.path.join(out, "fsdp.json"), "w") as handle:
            json.dump(results, handle)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", ["full_ft", "layerwise_lr", "lora"])
def test_two_rank_fsdp_training_ends_with_the_weights_of_one_process(
    name, tokenizer, prompt, manifests, tmp_path
):
    torch.multiprocessing.spawn(
        _fsdp_training_worker,
        args=(
            2,
            str(tmp_path / "init"),
            manifests["text"],
            tokenizer.model_path,
            str(tmp_path),
            name,
        ),
        nprocs=2,
    )
    (tmp_path / "single").mkdir()
    brain = text_brain_for_training(
        name, tokenizer, prompt, tmp_path / "single", {"grad_accumulation_factor": 2, **CLIPPED}
    )
    dataset = make_qa_dataset(manifests["text"], prompt, with_audio=False)
    order = [i for step in range(0, 12, 4) for i in (step, step + 2, step + 1, step + 3)]
    dataset.data_ids = [dataset.data_ids[i] for i in order]
    brain.fit(brain.hparams.epoch_counter, dataset, train_loader_kwargs={"batch_size": 2})
    single = trained_tensors(brain)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert single.keys() == sharded.keys() and single
    for key, value in single.items():
        assert torch.allclose(sharded[key], value, rtol=1e-4, atol=1e-6), key
    # evaluation of the sharded model: ranks in lockstep over uneven shards, each item once
    with open(tmp_path / "fsdp.json") as handle:
        results = json.load(handle)
    five = make_qa_dataset(manifests["text"], prompt, with_audio=False).filtered_sorted(select_n=5)
    assert results["ppl"] == pytest.approx(brain.evaluator().perplexity(five, "text", 2), rel=1e-4)
    ids, predictions, references = brain.evaluator().decode(five, mode="text", batch_size=2)
    assert results["decoded"] == [ids, predictions, references]
    # weights agree to ~1e-6 after training, so importance agrees to about that
    assert results["importance"] == pytest.approx(layer_importance(brain, five), rel=1e-3)


def _fsdp_importance_worker(rank, world, init_file, manifest, spm_path, out):
    import speechbrain  # noqa: F401

    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer
    from speechbrain_sllm.fsdp import shard_speech_llm
    from speechbrain_sllm.importance.aggregate import ScoreSet
    from speechbrain_sllm.importance.shift import topk_overlap
    from speechbrain_sllm.importance.stage import run_importance, zeroing_check

    init_group(rank, world, init_file)
    tokenizer = SentencePieceTokenizer(spm_path)
    prompt = ChatPrompt(tokenizer)
    brain = text_brain_for_training("full_ft", tokenizer, prompt, out, {})
    shard_speech_llm(brain.modules.model)
    dataset = make_qa_dataset(manifest, prompt, with_audio=False).filtered_sorted(select_n=5)
    profile, accumulator = run_importance(
        brain.evaluator(for_gradients=True),
        dataset,
        os.path.join(out, "fsdp_importance"),
        mode="text",
        batch_size=2,
    )
    scores = ScoreSet.from_accumulator(accumulator)
    profile["self_iou"] = topk_overlap(scores, scores, 0.03)  # a collective on each rank
    profile["zeroing"] = zeroing_check(brain.evaluator(), dataset, accumulator, 0.1, "text", seed=3)
    profile["local_numel"] = sum(score.numel() for _, score in scores.items())
    with open(os.path.join(out, f"profile{rank}.json"), "w") as handle:
        json.dump(profile, handle)
    torch.distributed.destroy_process_group()


def test_fsdp_importance_equals_single_process(tokenizer, prompt, manifests, tmp_path):
    from speechbrain_sllm.importance.stage import run_importance, zeroing_check

    torch.multiprocessing.spawn(
        _fsdp_importance_worker,
        args=(2, str(tmp_path / "init"), manifests["text"], tokenizer.model_path, str(tmp_path)),
        nprocs=2,
    )
    brain = text_brain_for_training("full_ft", tokenizer, prompt, tmp_path, {})
    dataset = make_qa_dataset(manifests["text"], prompt, with_audio=False).filtered_sorted(
        select_n=5
    )
    expected, accumulator = run_importance(
        brain.evaluator(for_gradients=True),
        dataset,
        str(tmp_path / "single"),
        mode="text",
        batch_size=2,
    )
    zeroing = zeroing_check(brain.evaluator(), dataset, accumulator, 0.1, "text", seed=3)
    # every condition moved the perplexity (an untrained model: no order expected)
    assert len({round(value, 6) for value in zeroing.values()}) == 4, zeroing
    for rank in range(2):
        with open(tmp_path / f"profile{rank}.json") as handle:
            profile = json.load(handle)
        # each rank held about half of the scores, and reports those of the whole model
        assert profile["local_numel"] < 0.6 * expected["numel"]
        assert profile["numel"] == expected["numel"] and profile["self_iou"] == 1.0
        assert profile["num_batches"] == expected["num_batches"] == 3  # fillers not counted
        for ours, reference in zip(profile["layers"], expected["layers"]):
            assert ours["sum"] == pytest.approx(reference["sum"], rel=1e-5)
            for key in ("top1", "top3", "top5"):
                assert ours[key] == reference[key], key
        for key, value in expected["thresholds"].items():  # float summation order differs
            assert profile["thresholds"][key] == pytest.approx(value, rel=1e-5)
        assert profile["non_layer"]["sum"] == pytest.approx(expected["non_layer"]["sum"], rel=1e-5)
        # each rank zeroed its own shards: the same weights as one process zeroed
        assert profile["zeroing"] == pytest.approx(zeroing, rel=1e-5)


def _fsdp_merge_worker(rank, world, init_file, folder, out):
    from conftest import llama_config
    from helpers import strategy_for

    from speechbrain_sllm.fsdp import full_tensor, root_gathered, shard_speech_llm
    from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
    from speechbrain_sllm.strategies import apply_strategy, merge_lora

    init_group(rank, world, init_file)
    torch.manual_seed(0)
    model = SpeechLLM(load_causal_lm(config=llama_config(vocab_size=40)))
    apply_strategy(model, strategy_for("lora", folder))
    with torch.no_grad():  # a trained adapter: B != 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    shard_speech_llm(model)
    merge_lora(model)
    weights = {name: full_tensor(p.detach()) for name, p in model.named_parameters()}
    with torch.no_grad(), root_gathered(model):
        logits = model.llm(input_ids=torch.tensor([[2, 5, 7, 9, 11]])).logits
    if rank == 0:
        torch.save({"weights": weights, "logits": logits}, os.path.join(out, "merged.pt"))
    torch.distributed.destroy_process_group()


def test_lora_merged_into_fsdp_shards_equals_merge_and_unload(tmp_path):
    """Under FSDP, merge_lora adds B @ A * scaling to each rank's shard in place."""
    from conftest import llama_config
    from helpers import strategy_for

    from speechbrain_sllm.model.parameter_names import canonical_name
    from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
    from speechbrain_sllm.strategies import apply_strategy, merge_lora

    torch.multiprocessing.spawn(
        _fsdp_merge_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path)),
        nprocs=2,
    )
    torch.manual_seed(0)
    model = SpeechLLM(load_causal_lm(config=llama_config(vocab_size=40)))
    apply_strategy(model, strategy_for("lora", str(tmp_path)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    merge_lora(model)
    expected = dict(model.named_parameters())
    sharded = torch.load(tmp_path / "merged.pt", weights_only=True)
    merged = {n: w for n, w in sharded["weights"].items() if "lora_" not in n}
    assert {canonical_name(n.replace("llm.", "", 1)) for n in merged} == {
        n.replace("llm.", "", 1) for n in expected
    }
    changed = 0
    for name, weight in merged.items():
        reference = expected["llm." + canonical_name(name.replace("llm.", "", 1))]
        assert torch.allclose(weight, reference, atol=1e-6), name
        changed += not torch.equal(weight, base[name])
    layers = model.llm.config.num_hidden_layers
    assert changed == 7 * layers  # every adapted projection (q, k, v, o, gate, up, down) moved
    with torch.no_grad():
        logits = model.llm(input_ids=torch.tensor([[2, 5, 7, 9, 11]])).logits
    assert torch.allclose(sharded["logits"], logits, atol=1e-5)
