"""Per-rank memory of a speech-LLM training run or of the importance comparison.

Builds the LLM on the meta device (no memory, no download beyond its config)
and counts, per rank: weights, gradients, AdamW state, importance
accumulators and an activation estimate (the assumptions: ``speechbrain_sllm.plan``,
the command line that prints them).

Authors
 * speechbrain-sllm developers 2026
"""

import dataclasses
import os

import torch

from speechbrain_sllm.fsdp import PARALLELISMS

BUILTIN_SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per rank of each part of a training run (see ``plan_memory``).

    Arguments
    ---------
    weights : int
        Model weights held by one rank.
    gradients : int
        Gradients of the trainable parameters held by one rank.
    optimizer : int
        AdamW state held by one rank.
    importance : int
        Importance accumulators held by one rank (0 when not scoring).
    activations : int
        Estimated activation memory of one micro-batch on one rank.
    mitigations : int
        What the strategy's mitigations keep (``MITIGATION_COSTS``).
    held_scores : int
        ``compare``: the first side's scores, kept while the second is scored
        (on this device only when it is the CPU; from a GPU they go to host memory).
    """

    weights: int
    gradients: int
    optimizer: int
    importance: int
    activations: int
    mitigations: int = 0
    held_scores: int = 0

    @property
    def total(self):
        """Sum of the parts."""
        parts = (self.weights, self.gradients, self.optimizer, self.importance)
        return sum(parts) + self.activations + self.mitigations + self.held_scores

    def largest(self):
        """``(name, bytes)`` of the largest part."""
        parts = dataclasses.asdict(self)
        name = max(parts, key=parts.get)
        return name, parts[name]


def llm_config(llm):
    """An HF config from a built-in shape name, a local folder or a hub id.

    Arguments
    ---------
    llm : str or transformers.PretrainedConfig
        ``llama-3.2-1b``, ``llama-3.1-8b``, ``llama-3.1-70b``, a folder or hub id, or a config.

    Returns
    -------
    transformers.PretrainedConfig
    """
    from transformers import AutoConfig, LlamaConfig

    if not isinstance(llm, str):
        return llm
    if llm in BUILTIN_SHAPES:
        return LlamaConfig(**BUILTIN_SHAPES[llm])
    known = ", ".join(BUILTIN_SHAPES)
    if not os.path.isdir(llm) and "/" not in llm:
        raise ValueError(
            f"--llm {llm!r} is not a known shape name ({known}), a local folder or an "
            "org/name hub id; pick one of those."
        )
    try:
        return AutoConfig.from_pretrained(llm)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--llm {llm!r}: no config could be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160]}). Give a local folder with config.json, a "
            f"reachable hub id, or a known shape name ({known})."
        ) from error


def count_parameters(config, strategy="full_ft", lora_rank=8):
    """Total, trainable and LLM-weight parameter counts (model built on the meta device).

    Arguments
    ---------
    config : transformers.PretrainedConfig
        The LLM's config.
    strategy : str
        ``frozen_llm``, ``full_ft``, ``layerwise_lr``, ``lora`` or ``lora_layerwise_lr``.
    lora_rank : int
        LoRA rank (LoRA strategies).

    Returns
    -------
    total, trainable, lora : int
        LLM parameters, trainable LLM parameters, LoRA parameters (included in both).

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> count_parameters(cfg, "lora", lora_rank=2)
    (6736, 1024, 1024)
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    base = sum(p.numel() for p in model.parameters())
    lora = 0
    if strategy.startswith("lora"):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
                lora += lora_rank * (module.in_features + module.out_features)
    trainable = {"frozen_llm": 0, "full_ft": base, "layerwise_lr": base}.get(strategy, lora)
    return base + lora, trainable, lora


def activation_bytes(config, batch_size, seq_len, dtype_bytes, checkpointing=True):
    """Estimated activation memory of one micro-batch.

    With gradient checkpointing each decoder layer keeps its input, and one
    layer's internals exist while it is recomputed; without it every layer
    keeps its internals. The float32 logits and their gradient come on top.

    Arguments
    ---------
    config : transformers.PretrainedConfig
        The LLM's config.
    batch_size : int
        Sequences per micro-batch.
    seq_len : int
        Tokens per sequence.
    dtype_bytes : int
        Bytes per activation value.
    checkpointing : bool
        Gradient checkpointing per decoder layer.

    Returns
    -------
    int
    """
    tokens = batch_size * seq_len
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    # inside one layer: 2 norms, q, k, v, attention out, o_proj, 3 MLP projections + product
    per_layer = tokens * (5 * hidden + 2 * kv + 4 * inner) * dtype_bytes
    layers = config.num_hidden_layers
    kept = (
        layers * tokens * hidden * dtype_bytes + per_layer if checkpointing else layers * per_layer
    )
    logits = 2 * tokens * config.vocab_size * 4  # float32 logits and their gradient
    return kept + logits


# What each mitigation keeps on a rank, from the run's sizes in bytes ("llm": the
# LLM's weights, "trainable": its trained weights, "activations": one micro-batch's)
MITIGATION_COSTS = {
    "replay": lambda sizes: sizes["activations"],  # a written batch's graph beside the speech one
    "text_kd": lambda sizes: sizes["activations"],  # the same (the cached bins are small)
    "anchor": lambda sizes: 2 * sizes["trainable"],  # base values + importance weights
    "interpolation": lambda sizes: 2 * sizes["llm"],  # base + fine-tuned while scoring
}


def plan_memory(
    llm,
    strategy="full_ft",
    world_size=1,
    parallelism="ddp",
    dtype="bfloat16",
    batch_size=1,
    seq_len=1024,
    lora_rank=8,
    importance=False,
    checkpointing=True,
):
    """Per-rank memory of a training run.

    Arguments
    ---------
    llm : str or transformers.PretrainedConfig
        See ``llm_config``.
    strategy : str
        The training strategy, optionally with ``+<mitigation>`` parts
        (``full_ft+anchor``; see ``MITIGATION_COSTS``).
    world_size : int
        Number of ranks.
    parallelism : str
        ``ddp`` (replicated) or ``fsdp`` (weights, gradients and optimizer state sharded).
    dtype : str
        Parameter dtype (``bfloat16``, ``float32``, ...).
    batch_size : int
        Micro-batch per rank.
    seq_len : int
        Tokens per sequence (prompt, speech embeddings and answer).
    lora_rank : int
        LoRA rank.
    importance : bool
        Whether the importance stage runs (float32 accumulators over the LLM's weights).
    checkpointing : bool
        Gradient checkpointing.

    Returns
    -------
    MemoryPlan

    Example
    -------
    >>> plan = plan_memory("llama-3.2-1b", "lora", world_size=1)
    >>> round(plan.weights / 2**30, 2)
    2.31
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism {parallelism!r} unknown; use one of {PARALLELISMS}.")
    strategy, *mitigations = strategy.split("+")
    unknown = [name for name in mitigations if name not in MITIGATION_COSTS]
    if unknown:
        raise ValueError(f"mitigations {unknown} unknown; use any of {sorted(MITIGATION_COSTS)}.")
    config = llm_config(llm)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    total, trainable, lora = count_parameters(config, strategy, lora_rank)
    shard = world_size if parallelism == "fsdp" else 1
    activations = activation_bytes(config, batch_size, seq_len, dtype_bytes, checkpointing)
    sizes = {"llm": (total - lora) * dtype_bytes, "trainable": trainable * dtype_bytes}
    sizes["activations"] = activations
    extra = sum(MITIGATION_COSTS[name](sizes) for name in mitigations)
    return MemoryPlan(
        weights=total * dtype_bytes // shard,
        gradients=trainable * dtype_bytes // shard,
        optimizer=2 * trainable * dtype_bytes // shard,
        importance=(total - lora) * 4 // shard if importance else 0,
        activations=activations,
        mitigations=extra,
    )


def decoder_layer_parameters(config):
    """Parameters of one decoder layer (attention, MLP, two norms)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner + 2 * hidden


def plan_compare(
    llm, world_size=1, parallelism="ddp", dtype="bfloat16", batch_size=8, seq_len=256, device="cuda"
):
    """Per-rank memory of ``python -m speechbrain_sllm.importance compare``.

    The two models are scored one after the other: one model's weights, its
    float32 importance accumulators, a transient gradient (each parameter's is
    folded into its accumulator and freed as the backward pass produces it; one
    decoder layer's at most), the activations of a batch without gradient
    checkpointing, and the first side's float32 scores while the second is
    scored (counted here when ``device`` is the CPU; from a GPU they are kept in
    host memory: ``held_scores`` of the CPU plan).

    Arguments
    ---------
    llm : str or transformers.PretrainedConfig
        See ``llm_config``.
    world_size : int
        Number of ranks.
    parallelism : str
        ``ddp`` (each rank a whole model) or ``fsdp`` (sharded).
    dtype : str
        The models' dtype.
    batch_size : int
        Items per forward / backward pass.
    seq_len : int
        Tokens per item.
    device : str
        ``cpu`` or ``cuda``.

    Returns
    -------
    MemoryPlan

    Example
    -------
    >>> plan = plan_compare("llama-3.2-1b", dtype="float32", device="cpu")
    >>> plan.weights == plan.importance == plan.held_scores
    True
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism {parallelism!r} unknown; use one of {PARALLELISMS}.")
    config = llm_config(llm)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    total, _, _ = count_parameters(config, "frozen_llm")
    shard = world_size if parallelism == "fsdp" else 1
    on_cpu = str(device).startswith("cpu")
    return MemoryPlan(
        weights=total * dtype_bytes // shard,
        gradients=decoder_layer_parameters(config) * dtype_bytes,
        optimizer=0,
        importance=total * 4 // shard,
        activations=activation_bytes(config, batch_size, seq_len, dtype_bytes, False),
        held_scores=total * 4 // shard if on_cpu else 0,
    )


def format_compare_plan(plan):
    """The compare plan as a line for the command's log."""
    return "memory plan (compare, per rank): " + format_plan(plan)


def format_plan(plan):
    """One line of GiB per part."""
    parts = dataclasses.asdict(plan)
    parts["total"] = plan.total
    return ", ".join(f"{name} {value / 2**30:.2f}" for name, value in parts.items()) + " (GiB/rank)"
