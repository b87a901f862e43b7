#!/usr/bin/env python3
"""Speed and memory of the importance stage against a bare forward + backward.

In ONE run on the same device and the same batches, times:
  (a) bare: forward + backward of the summed LM loss (gradients accumulate, no optimizer);
  (b) stage: the same with speechbrain_sllm's ImportanceAccumulator (hooks fold each
      gradient into the accumulator and free it);
  (c) naive: an fp32 accumulator per parameter, filled by a Python loop after each backward;
and prints tokens/s, peak memory and the ratios (b)/(a), (c)/(a).

Random weights, shapes of Llama-3.2-1B / Llama-3.1-8B (or a tiny one for CPU checks):
> python benchmarks/importance_speed.py --shape 8b --batches 8 --batch-size 4 --seq-len 1024
> python benchmarks/importance_speed.py --shape tiny --device cpu
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speechbrain_sllm.importance.estimators import ImportanceAccumulator

SHAPES = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def build(shape, dtype, device):
    """A randomly initialised Llama of the given shape."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


def summed_loss(model, ids):
    """Summed next-token cross-entropy (the importance stage's loss)."""
    logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")


def sync(device):
    """Waits for the device's queued work (timing boundary)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name, model, batches, device, before=None, after=None):
    """Runs forward + backward over ``batches``; returns (tokens/s, peak GiB)."""
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    state = before() if before else None
    start = time.perf_counter()
    for ids in batches:
        summed_loss(model, ids).backward()
        if after:
            after(state)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    if isinstance(state, ImportanceAccumulator):
        state.detach()
    for param in model.parameters():
        param.grad = None
    tokens = sum(ids.numel() for ids in batches)
    print(f"{name:>6}: {tokens / seconds:10.1f} tok/s, peak {peak:6.2f} GiB, {seconds:.2f} s")
    return tokens / seconds, peak


def main():
    """Parses the options, runs the three measurements in one process, prints ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--accumulate-dtype", default="param", help="param, float32 or bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.shape, dtype, args.device)
    params = dict(model.named_parameters())
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
        for _ in range(args.batches)
    ]
    acc_dtype = dtype if args.accumulate_dtype == "param" else getattr(torch, args.accumulate_dtype)
    print(
        f"shape {args.shape}, {sum(p.numel() for p in params.values()) / 1e9:.2f}B params, "
        f"{args.dtype}, device {args.device}, accumulators {acc_dtype}"
    )
    measure("warmup", model, batches[:1], args.device)

    def naive_state():
        """fp32 accumulators, one per parameter."""
        return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def naive_fold(state):
        """Adds every gradient to its accumulator after the backward pass."""
        for name, param in params.items():
            state[name] += param.grad.float()
            param.grad = None

    bare = measure("bare", model, batches, args.device)
    stage = measure(
        "stage",
        model,
        batches,
        args.device,
        before=lambda: ImportanceAccumulator(params, "taylor", acc_dtype),
        after=lambda acc: acc.step(),
    )
    naive = measure("naive", model, batches, args.device, before=naive_state, after=naive_fold)
    print(
        f"stage / bare: throughput x{stage[0] / bare[0]:.3f}, peak memory x{stage[1] / bare[1]:.3f}"
    )
    print(
        f"naive / bare: throughput x{naive[0] / bare[0]:.3f}, peak memory x{naive[1] / bare[1]:.3f}"
    )


if __name__ == "__main__":
    main()
