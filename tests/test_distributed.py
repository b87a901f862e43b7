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
        "speech": brain.decode(dataset, mode="speech", batch_size=2),
        "text": brain.decode(dataset, mode="text", batch_size=2),
        "ppl_text": brain.perplexity(dataset, mode="text", batch_size=2),
        # batch size 1: the speech path's valid-frame count comes from relative
        # lengths, so it depends (slightly) on how much padding a batch holds
        "ppl_speech": brain.perplexity(dataset, mode="speech", batch_size=1),
    }


def _worker(rank, world, init_file, manifest, spm_path, out, debug):
    import speechbrain  # noqa: F401

    from speechbrain_sllm.checkpointing import TrainableState
    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer
    from speechbrain_sllm.distributed import all_reduce_sum, gather_in_order, rank_shard

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
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    torch.distributed.destroy_process_group()


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
