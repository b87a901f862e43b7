"""Memory planner's command line: per-rank bytes of a run, before renting machines.

The estimates are ``speechbrain_sllm.memory_plan``'s: it builds the LLM on the
meta device (no memory, no download beyond its config) and counts, per rank: weights, gradients, AdamW state, importance
accumulators and an activation estimate, for a strategy, a world size and
DDP (everything replicated) or FSDP (weights, gradients and optimizer state
sharded over the ranks).

> python -m speechbrain_sllm.plan --llm llama-3.1-8b --strategy full_ft --world-size 8 --parallelism fsdp
> python -m speechbrain_sllm.plan --llm /models/my-llm --strategy lora --lora-rank 16
> python -m speechbrain_sllm.plan --llm llama-3.1-8b --command compare --device-memory 80GB

What it assumes, as the package trains: parameters and gradients in the LLM's
dtype, AdamW state (two tensors per trainable parameter) in the parameter
dtype, float32 importance accumulators (the default) over the LLM's weights,
gradient checkpointing per decoder layer, and a float32 loss over the logits.

Authors
 * speechbrain-sllm developers 2026
"""

import argparse
import re

from speechbrain_sllm.fsdp import PARALLELISMS
from speechbrain_sllm.memory_plan import BUILTIN_SHAPES, format_plan, plan_compare, plan_memory


def parse_memory(text):
    """Bytes of a size such as ``80GB``, ``80GiB``, ``24G`` or ``512MB`` (GB read as GiB).

    Example
    -------
    >>> parse_memory("80GB") == 80 * 2**30, parse_memory("512 MiB") == 2**29
    (True, True)
    """
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size; write e.g. 80GB or 24GiB."
        )
    power = "KMGT".find(match[2].upper()) + 1 if match[2] else 0
    return int(float(match[1]) * 1024**power)


def verdict(plan, device_memory):
    """One line: whether ``plan`` fits ``device_memory`` bytes, and its largest part."""
    name, size = plan.largest()
    fits = "fits" if plan.total <= device_memory else "does NOT fit"
    return (
        f"{fits} in {device_memory / 2**30:.1f} GiB: {plan.total / 2**30:.2f} GiB per rank, "
        f"the largest part {name} ({size / 2**30:.2f} GiB)"
    )


def build_parser():
    """The planner's command line, each option explained."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_sllm.plan",
        description="Per-rank memory of a training run or of the compare command, before renting "
        "machines. The LLM is built on the meta device: nothing is downloaded but its config.",
    )
    add = parser.add_argument
    add("--llm", required=True, help=f"the LLM: a shape name ({', '.join(BUILTIN_SHAPES)}), "
        "a local folder with config.json, or an org/name hub id")  # fmt: skip
    add("--command", default="train", choices=("train", "compare"), help="train: a training run "
        "with --strategy; compare: python -m speechbrain_sllm.importance compare (two models "
        "scored one after the other)")  # fmt: skip
    add("--strategy", default="full_ft", help="train: frozen_llm, full_ft, layerwise_lr, lora or "
        "lora_layerwise_lr, with +replay / +text_kd / +anchor / +interpolation mitigations")  # fmt: skip
    add("--world-size", type=int, default=1, help="number of processes (GPUs) under torchrun")
    add("--parallelism", default="ddp", choices=PARALLELISMS, help="ddp: every rank holds the "
        "whole model; fsdp: weights, gradients, optimizer state (and accumulators) sharded")  # fmt: skip
    add("--dtype", default="bfloat16", help="parameter dtype: bfloat16, float16 or float32")
    add("--batch-size", type=int, default=None, help="micro-batch per rank (default 1 for train, "
        "8 for compare, the compare command's default)")  # fmt: skip
    add("--seq-len", type=int, default=None, help="tokens per sequence: prompt, speech embeddings "
        "and answer (default 1024 for train, 256 for compare)")  # fmt: skip
    add("--lora-rank", type=int, default=8, help="LoRA rank (LoRA strategies)")
    add("--importance", action="store_true", help="train: the importance stage runs too (float32 "
        "accumulators over the LLM's weights)")  # fmt: skip
    add("--device", default="cuda", help="compare: cuda (scores of the first side go to host "
        "memory) or cpu (they stay)")  # fmt: skip
    add("--device-memory", type=parse_memory, default=None, help="memory of one device, e.g. "
        "80GB: prints whether the plan fits and its largest part")  # fmt: skip
    return parser


def main(argv=None):
    """Command line: prints the per-rank plan (and a verdict against --device-memory).

    Arguments
    ---------
    argv : list of str or None
        Arguments (``sys.argv`` when None).
    """
    args = build_parser().parse_args(argv)
    train = args.command == "train"
    batch_size = args.batch_size or (1 if train else 8)
    seq_len = args.seq_len or (1024 if train else 256)
    try:
        if train:
            plan = plan_memory(
                args.llm, args.strategy, args.world_size, args.parallelism, args.dtype,
                batch_size, seq_len, args.lora_rank, args.importance,
            )  # fmt: skip
        else:
            plan = plan_compare(
                args.llm, args.world_size, args.parallelism, args.dtype, batch_size, seq_len,
                args.device,
            )  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"plan: {error}") from None
    print(format_plan(plan))
    if args.device_memory:
        print(verdict(plan, args.device_memory))


if __name__ == "__main__":
    main()
