"""A small training job for the resume tests: run, optionally SIGKILL itself, resume.

Usage: python resume_job.py STRATEGY FOLDER SPM_MODEL MANIFEST [KILL_AT_STEP [DISTRIBUTED]]
(or under ``torchrun``: then DISTRIBUTED is ``ddp`` or ``fsdp``, gloo backend, and only
rank 0 kills itself, as when one machine dies). STRATEGY may add mitigations as a study
names them (``full_ft+replay``, ``+text_kd``, ``+anchor``). Writes FOLDER/final.pt (whole
trainable tensors + optimizer state, and whether every rank holds the same weights) when
it completes.
"""

import os
import signal
import sys

import speechbrain as sb
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import llama_config, tiny_speech_llm  # noqa: E402
from helpers import strategy_for  # noqa: E402

from speechbrain_sllm.brains import SpeechLLMBrain  # noqa: E402
from speechbrain_sllm.checkpointing import (  # noqa: E402
    AtomicCheckpointer,
    RNGState,
    TrainableState,
)
from speechbrain_sllm.data.dataio import make_qa_dataset  # noqa: E402
from speechbrain_sllm.data.prompts import ChatPrompt  # noqa: E402
from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer  # noqa: E402
from speechbrain_sllm.distributed import close_process_group  # noqa: E402
from speechbrain_sllm.fsdp import full_tensor  # noqa: E402
from speechbrain_sllm.mitigations import (  # noqa: E402
    ImportanceAnchor,
    TextDistillation,
    TextReplay,
)
from speechbrain_sllm.schedules import WarmupDecaySchedule  # noqa: E402
from speechbrain_sllm.strategies import apply_strategy  # noqa: E402


def mitigations_named(parts, model, written):
    """The mitigations a strategy name adds, on the written questions ``written``."""
    generator = torch.Generator().manual_seed(1)
    scores = {  # made-up base importance of every LLM weight matrix
        name: torch.rand(param.shape, generator=generator)
        for name, param in model.named_parameters()
        if name.startswith("llm.") and param.dim() == 2
    }
    choices = {
        "replay": lambda: TextReplay(dataset=written, batch_size=2, weight=1.0),
        "text_kd": lambda: TextDistillation(dataset=written, batch_size=2, topk=8),
        "anchor": lambda: ImportanceAnchor(strength=1.0, scores=scores),
    }
    return [choices[part]() for part in parts]


def ranks_agree(model):
    """Whether every rank holds the same trainable weights (True without torchrun)."""
    if not torch.distributed.is_initialized():
        return True
    total = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(total) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main(strategy_name, folder, spm_model, manifest, kill_at=None, distributed="ddp"):
    run_opts = {"device": "cpu", "ckpt_interval_steps": 2, "max_grad_norm": 5.0}
    if os.environ.get("RANK") is not None:
        run_opts["distributed_backend"] = "gloo"
        sb.utils.distributed.ddp_init_group(run_opts)
    sb.utils.seed_everything(0)
    tokenizer = SentencePieceTokenizer(spm_model)
    prompt = ChatPrompt(tokenizer)
    dataset = make_qa_dataset(manifest, prompt)
    model = tiny_speech_llm(llama_config(vocab_size=len(tokenizer)), seed=0)
    strategy_name, *mitigation_names = strategy_name.split("+")
    strategy = strategy_for(strategy_name, folder)
    if strategy.lora is not None:
        strategy.lora.dropout = 0.1  # randomness that an exact resume must replay
    apply_strategy(model, strategy)
    epochs, batch = 2, 2
    counter = sb.utils.epoch_loop.EpochCounter(limit=epochs)
    brain = SpeechLLMBrain(
        modules={"model": model},
        opt_class=torch.optim.AdamW,
        hparams={
            "prompt": prompt,
            "tokenizer": tokenizer,
            "training_strategy": strategy,
            "lr": 3e-3,
            "epoch_counter": counter,
            "mitigations": mitigations_named(
                mitigation_names, model, make_qa_dataset(manifest, prompt, with_audio=False)
            ),
        },
        run_opts=run_opts,
        checkpointer=AtomicCheckpointer(
            os.path.join(folder, "save"), recoverables={"counter": counter, "rng": RNGState()}
        ),
        lr_schedule=WarmupDecaySchedule(3e-3, warmup_fraction=0.1),
        train_logger=sb.utils.train_logger.FileTrainLogger(os.path.join(folder, "train_log.txt")),
        parallelism=distributed,
    )
    original = brain.on_fit_batch_end

    def maybe_die(*args):
        original(*args)
        if kill_at is not None and brain.optimizer_step == kill_at:
            if sb.utils.distributed.if_main_process():
                os.kill(os.getpid(), signal.SIGKILL)

    brain.on_fit_batch_end = maybe_die
    start = brain.on_fit_start

    def report_start():
        start()  # recovers the latest checkpoint, if any
        print(f"starting after optimizer step {brain.optimizer_step}", file=sys.stderr)

    brain.on_fit_start = report_start
    brain.fit(
        brain.hparams.epoch_counter,
        dataset,
        train_loader_kwargs={"batch_size": batch, "shuffle": True},
    )
    agree = ranks_agree(model) if distributed == "ddp" else True  # FSDP: one sharded copy
    names = {param: name for name, param in model.named_parameters()}
    final = {
        "model": {k: full_tensor(v) for k, v in TrainableState(model).state_dict().items()},
        "optimizer": {  # whole tensors, by parameter name (gathered from FSDP shards)
            names[param]: {field: full_tensor(value) for field, value in state.items()}
            for param, state in brain.optimizer.state.items()
        },
        "ranks_agree": agree,
    }
    if sb.utils.distributed.if_main_process():
        torch.save(final, os.path.join(folder, "final.pt"))
    close_process_group()
    # A rank sometimes aborts in C++ static destruction at interpreter exit, after all
    # the work above is done and written ("terminate called without an active
    # exception"; 2 of about 20 runs on a loaded 2-core machine, with or without the
    # process group destroyed first). The job's result is final.pt, already saved:
    # leave without running those destructors so the exit code reports the job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    args = sys.argv[1:]
    kill_at = int(args[4]) if len(args) > 4 and args[4] != "none" else None
    main(*args[:4], kill_at, *args[5:6])
