#!/usr/bin/env python3
"""Speed and memory of the importance stage against a bare forward + backward.

In ONE run, on the same device and the same batches, at each shape, measures:
  bare:        forward + backward of the summed LM loss (gradients accumulate, no optimizer);
  stage_fp32:  the same with speechbrain_sllm's ImportanceAccumulator and float32
               accumulators (the API's default: hooks fold each gradient and free it);
  stage_param: the same with accumulators in the parameter dtype;
  naive_fp32:  an fp32 accumulator per parameter, filled by a loop after each backward;
and prints tokens/s, peak memory and the ratios to bare. Each measurement runs in a
fresh process, so the CPU peak (resident set) belongs to that measurement alone.

Random weights, shapes of Llama-3.2-1B / Llama-3.1-8B (or small ones for CPU checks):
> python benchmarks/importance_speed.py --shapes 1b,8b --batches 8 --batch-size 2 --seq-len 1024
> python benchmarks/importance_speed.py --shapes tiny,small --device cpu --batches 4 --batch-size 2 --seq-len 128
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speechbrain_sllm.importance.estimators import ImportanceAccumulator
from speechbrain_sllm.memory_plan import BUILTIN_SHAPES

SHAPES = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
    "small": {**BUILTIN_SHAPES["smollm2-135m"], "tie_word_embeddings": False},
    "1b": BUILTIN_SHAPES["llama-3.2-1b"],
    "8b": BUILTIN_SHAPES["llama-3.1-8b"],
}


def build(shape, dtype, device):
    """A randomly initialised Llama of the given shape."""
    config = LlamaConfig(**{"tie_word_embeddings": False, **SHAPES[shape]})
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
    """Runs forward + backward over ``batches``; returns (tokens/s, peak GiB).

    Peak memory: CUDA's allocator peak on a GPU; on a CPU the process's peak
    resident set (``ru_maxrss``), meaningful because every measurement runs in
    a fresh process (``--variant``).
    """
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
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if isinstance(state, ImportanceAccumulator):
        state.detach()
    for param in model.parameters():
        param.grad = None
    tokens = sum(ids.numel() for ids in batches)
    return tokens / seconds, peak


VARIANTS = ("bare", "stage_fp32", "stage_param", "naive_fp32")


def run_variant(args, shape, variant):
    """One measurement (warm-up batch first) in this process; returns (tokens/s, peak GiB)."""
    dtype = getattr(torch, args.dtype)
    model = build(shape, dtype, args.device)
    params = dict(model.named_parameters())
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
        for _ in range(args.batches)
    ]
    measure("warmup", model, batches[:1], args.device)

    def naive_state():
        """fp32 accumulators, one per parameter."""
        return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def naive_fold(state):
        """Adds every gradient to its accumulator after the backward pass."""
        for name, param in params.items():
            state[name] += param.grad.float()
            param.grad = None

    if variant == "bare":
        return measure(variant, model, batches, args.device)
    if variant == "naive_fp32":
        return measure(variant, model, batches, args.device, naive_state, naive_fold)
    acc_dtype = torch.float32 if variant == "stage_fp32" else dtype  # API default: float32
    return measure(
        variant,
        model,
        batches,
        args.device,
        before=lambda: ImportanceAccumulator(params, "taylor", acc_dtype),
        after=lambda acc: acc.step(),
    )


def main():
    """Runs every variant at every shape, each in a fresh process, and prints ratios to bare."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1b,8b", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one measurement
    args, _ = parser.parse_known_args()
    if args.variant:
        shape, variant = args.variant.split(":")
        print(json.dumps(run_variant(args, shape, variant)))
        return
    print(
        f"{args.dtype}, device {args.device}, {args.batches} batches of "
        f"{args.batch_size}x{args.seq_len} tokens; each row a fresh process"
    )
    for shape in args.shapes.split(","):
        results = {}
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], f"--variant={shape}:{variant}"],
                capture_output=True,
                text=True,
                check=True,
            )
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        bare_speed, bare_peak = results["bare"]
        for variant, (speed, peak) in results.items():
            print(
                f"{shape:>5} {variant:>12}: {speed:10.1f} tok/s (x{speed / bare_speed:.3f}), "
                f"peak {peak:7.3f} GiB (x{peak / bare_peak:.3f})"
            )


if __name__ == "__main__":
    main()
