"""A small training job for the resume tests: run, optionally SIGKILL itself, resume.

Usage: python resume_job.py STRATEGY FOLDER SPM_MODEL MANIFEST [KILL_AT_STEP]
Writes FOLDER/final.pt (trainable tensors + optimizer state) when it completes.
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
    WarmupDecaySchedule,
)
from speechbrain_sllm.data.dataio import make_qa_dataset  # noqa: E402
from speechbrain_sllm.data.prompts import ChatPrompt  # noqa: E402
from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer  # noqa: E402
from speechbrain_sllm.strategies import apply_strategy  # noqa: E402


def main(strategy_name, folder, spm_model, manifest, kill_at=None):
    sb.utils.seed_everything(0)
    tokenizer = SentencePieceTokenizer(spm_model)
    prompt = ChatPrompt(tokenizer)
    dataset = make_qa_dataset(manifest, prompt)
    model = tiny_speech_llm(llama_config(vocab_size=len(tokenizer)), seed=0)
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
            "lr_schedule": WarmupDecaySchedule(3e-3, warmup_fraction=0.1),
            "epoch_counter": counter,
            "train_logger": sb.utils.train_logger.FileTrainLogger(
                os.path.join(folder, "train_log.txt")
            ),
        },
        run_opts={"device": "cpu", "ckpt_interval_steps": 2, "max_grad_norm": 5.0},
        checkpointer=AtomicCheckpointer(
            os.path.join(folder, "save"), recoverables={"counter": counter, "rng": RNGState()}
        ),
    )
    original = brain.on_fit_batch_end

    def maybe_die(*args):
        original(*args)
        if kill_at is not None and brain.optimizer_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    brain.on_fit_batch_end = maybe_die
    brain.fit(
        brain.hparams.epoch_counter,
        dataset,
        train_loader_kwargs={"batch_size": batch, "shuffle": True},
    )
    torch.save(
        {"model": TrainableState(model).state_dict(), "optimizer": brain.optimizer.state_dict()},
        os.path.join(folder, "final.pt"),
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*args[:4], int(args[4]) if len(args) > 4 else None)
