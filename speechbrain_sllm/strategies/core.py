"""Training strategies: which parameters train, and at which learning rate.

Strategies, selected by name (``--strategy=lora`` on a recipe's command line):

* ``frozen_llm``: adaptor (and optionally the encoder) only.
* ``full_ft``: adaptor + every LLM parameter, one learning rate.
* ``layerwise_lr``: full fine-tuning with per-decoder-layer learning rates.
* ``lora``: adaptor + LoRA adapters on the frozen LLM.
* ``lora_layerwise_lr``: LoRA with the layer-wise rates applied to the adapters.

Authors
 * speechbrain-sllm developers 2026
"""

import logging
from dataclasses import dataclass

from speechbrain_sllm.fsdp import is_sharded
from speechbrain_sllm.model.parameter_names import decoder_layer_index, module_type
from speechbrain_sllm.strategies.layerwise import LayerwiseLR
from speechbrain_sllm.strategies.lora import LoRASettings, apply_lora

logger = logging.getLogger(__name__)

STRATEGIES = ("frozen_llm", "full_ft", "layerwise_lr", "lora", "lora_layerwise_lr")


@dataclass
class Strategy:
    """A resolved training strategy.

    Arguments
    ---------
    name : str
        One of ``STRATEGIES``.
    train_llm : str
        ``none``, ``full`` or ``lora``.
    layerwise_lr : LayerwiseLR or None
        Layer-wise LR rule (None: one rate for the LLM).
    lora : LoRASettings or None
        LoRA settings when ``train_llm == "lora"``.
    train_encoder : bool
        Whether the speech encoder trains too.
    adaptor_lr_scale : float
        LR multiplier of the adaptor (and encoder) relative to the base rate.
    train_adaptor : bool
        Whether the adaptor trains (False: kept as it was, e.g. after stage 1, so
        that a change of S2T is the LLM's).
    """

    name: str
    train_llm: str
    layerwise_lr: LayerwiseLR = None
    lora: LoRASettings = None
    train_encoder: bool = False
    adaptor_lr_scale: float = 1.0
    train_adaptor: bool = True


def build_strategy(
    name,
    lora=None,
    layerwise_lr=None,
    train_encoder=False,
    adaptor_lr_scale=1.0,
    train_adaptor=True,
):
    """Resolves a strategy name and its settings into a ``Strategy``.

    Arguments
    ---------
    name : str
        One of ``frozen_llm``, ``full_ft``, ``layerwise_lr``, ``lora``, ``lora_layerwise_lr``.
    lora : LoRASettings or None
        Needed by the LoRA strategies.
    layerwise_lr : LayerwiseLR or None
        Needed by the layer-wise strategies.
    train_encoder : bool
        Whether the speech encoder trains.
    adaptor_lr_scale : float
        LR multiplier of the adaptor and encoder.
    train_adaptor : bool
        Whether the adaptor trains.

    Returns
    -------
    Strategy

    Example
    -------
    >>> build_strategy("lora", lora=LoRASettings(rank=4)).train_llm
    'lora'
    >>> build_strategy("full")
    Traceback (most recent call last):
    ...
    ValueError: Unknown strategy 'full'; set `strategy` to one of ('frozen_llm', 'full_ft', 'layerwise_lr', 'lora', 'lora_layerwise_lr').
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; set `strategy` to one of {STRATEGIES}.")
    uses_lora = name.startswith("lora")
    uses_layerwise = name.endswith("layerwise_lr")
    if uses_lora and lora is None:
        raise ValueError(f"Strategy {name!r} needs LoRA settings (the yaml key `lora`).")
    if uses_layerwise and layerwise_lr is None:
        raise ValueError(f"Strategy {name!r} needs layer-wise LR settings (`layerwise_lr`).")
    train_llm = {"frozen_llm": "none", "full_ft": "full", "layerwise_lr": "full"}.get(name, "lora")
    if train_llm == "none" and not train_adaptor and not train_encoder:
        raise ValueError(
            "frozen_llm with the adaptor and the encoder frozen trains nothing; train the "
            "adaptor (train_adaptor: True) or choose a strategy that trains the LLM."
        )
    return Strategy(
        name=name,
        train_llm=train_llm,
        layerwise_lr=layerwise_lr if uses_layerwise else None,
        lora=lora if uses_lora else None,
        train_encoder=train_encoder,
        adaptor_lr_scale=adaptor_lr_scale,
        train_adaptor=train_adaptor,
    )


def apply_strategy(model, strategy):
    """Sets ``requires_grad`` (and wraps the LLM with LoRA) according to ``strategy``.

    Arguments
    ---------
    model : SpeechLLM
        The model; ``model.llm`` is replaced by a peft model for LoRA.
    strategy : Strategy
        The resolved strategy.

    Returns
    -------
    SpeechLLM
        The same model, modified in place.
    """
    if strategy.train_llm == "lora" and is_sharded(model.llm):
        raise ValueError(
            "apply_strategy: the LLM is already FSDP-sharded and LoRA cannot be added to "
            "sharded modules; apply the strategy first, then shard (SpeechLLMBrain.shard_model)."
        )
    if model.encoder is not None:
        model.encoder.freeze = not strategy.train_encoder
        model.encoder.freeze_parameters()
    if model.adaptor is not None:
        model.adaptor.requires_grad_(strategy.train_adaptor)
    model.llm.requires_grad_(strategy.train_llm == "full")
    if strategy.train_llm == "lora":
        model.llm = apply_lora(model.llm, strategy.lora)
    return model


def num_llm_layers(llm):
    """Number of decoder layers of an HF (or peft-wrapped) causal LM.

    Arguments
    ---------
    llm : torch.nn.Module
        The causal LM.

    Returns
    -------
    int
    """
    indices = {decoder_layer_index(name) for name, _ in llm.named_parameters()}
    indices.discard(None)
    if not indices:
        raise ValueError(
            "No decoder layers found in the LLM's parameter names (expected "
            "'layers.<i>.', 'h.<i>.' or 'blocks.<i>.'); layer-wise LR cannot be applied."
        )
    return max(indices) + 1


def param_groups(model, strategy, base_lr):
    """Optimizer parameter groups with their learning rates, trainable parameters only.

    Each group carries ``name``, ``lr`` and ``lr_scale`` (its rate relative to
    ``base_lr``, used by the scheduler). Sizes are logged.

    Arguments
    ---------
    model : SpeechLLM
        Model after ``apply_strategy``.
    strategy : Strategy
        The resolved strategy.
    base_lr : float
        Base learning rate.

    Returns
    -------
    list of dict
    """
    groups = {}

    def add(group_name, scale, param):
        """Adds ``param`` to the group of its name and LR scale."""
        group = groups.setdefault(group_name, {"name": group_name, "lr_scale": scale, "params": []})
        group["params"].append(param)

    for part in ("encoder", "adaptor"):
        module = getattr(model, part)
        if module is not None:
            for param in module.parameters():
                if param.requires_grad:
                    add(part, strategy.adaptor_lr_scale, param)
    llm_named = [(n, p) for n, p in model.llm.named_parameters() if p.requires_grad]
    if strategy.layerwise_lr is None:
        for _, param in llm_named:
            add("llm", 1.0, param)
    else:
        num_layers = num_llm_layers(model.llm)
        scales = strategy.layerwise_lr.scales(num_layers)
        per_module = strategy.layerwise_lr.module_scales(num_layers)
        for name, param in llm_named:
            index = decoder_layer_index(name)
            module = module_type(name)
            if index is None:
                add("llm.other", strategy.layerwise_lr.non_layer(num_layers), param)
            elif module in per_module:
                add(f"llm.layer.{index:03d}.{module}", per_module[module][index], param)
            else:
                add(f"llm.layer.{index:03d}", scales[index], param)
    result = sorted(groups.values(), key=lambda group: group["name"])
    for group in result:
        group["lr"] = base_lr * group["lr_scale"]
        count = sum(p.numel() for p in group["params"])
        logger.info(f"param group {group['name']}: {count} params, lr {group['lr']:.3g}")
    return result
