"""LoRA on the LLM through peft, with settings checked before any model is touched.

Authors
 * speechbrain-sllm developers 2026
"""

from dataclasses import dataclass, field

from speechbrain_sllm.fsdp import is_sharded

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    """LoRA hyper-parameters (the paper: r=8 for 1B, r=16 for 8B, alpha=2r, all projections).

    Arguments
    ---------
    rank : int
        LoRA rank ``r``.
    alpha : float
        Scaling numerator (``alpha / r`` multiplies the update).
    dropout : float
        Dropout on the LoRA input.
    target_modules : list of str
        Module name suffixes to adapt.
    layers_to_transform : list of int or None
        Restrict LoRA to these decoder layers (None: all).

    Example
    -------
    >>> LoRASettings(rank=8).alpha
    16.0
    >>> LoRASettings(rank=0)
    Traceback (most recent call last):
    ...
    ValueError: LoRASettings: rank must be a positive integer, got 0.
    """

    rank: int = 8
    alpha: float = None
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    layers_to_transform: list = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRASettings: rank must be a positive integer, got {self.rank}.")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRASettings: dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("LoRASettings: target_modules is empty; name at least one module.")
        self.target_modules = list(self.target_modules)


def apply_lora(llm, settings):
    """Wraps ``llm`` with peft LoRA adapters; base weights are frozen.

    Arguments
    ---------
    llm : transformers.PreTrainedModel
        The causal LM.
    settings : LoRASettings
        LoRA hyper-parameters.

    Returns
    -------
    peft.PeftModel

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> from speechbrain_sllm.model.speech_llm import load_causal_lm
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> model = apply_lora(load_causal_lm(config=cfg), LoRASettings(rank=2))
    >>> model.get_nb_trainable_parameters()[0]
    1024
    """
    from peft import LoraConfig, get_peft_model

    check_targets(llm, settings.target_modules)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        layers_to_transform=settings.layers_to_transform,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(llm, config)
    except ValueError as error:
        raise ValueError(
            f"LoRA could not be applied with target_modules={settings.target_modules} and "
            f"layers_to_transform={settings.layers_to_transform}: {error}"
        ) from error


def check_targets(llm, target_modules):
    """Raises a clear error when a LoRA target matches no linear module of ``llm``.

    Arguments
    ---------
    llm : torch.nn.Module
        The causal LM.
    target_modules : list of str
        Requested module name suffixes.
    """
    import torch

    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in llm.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    missing = [target for target in target_modules if target not in linear_names]
    if missing:
        raise ValueError(
            f"LoRA target_modules {missing} match no linear module of this LLM; "
            f"available: {sorted(linear_names)}. Fix `lora.target_modules` in the yaml."
        )


def merge_lora(model):
    """Merges LoRA adapters into the base weights of ``model.llm`` (no-op without LoRA).

    After merging, importance is measured on the weights the fine-tuned model
    actually uses, with the same parameter names as the base LLM. An
    FSDP-sharded LLM keeps its modules (replacing them would take them out of
    their FSDP units): each rank adds ``B @ A * scaling`` to its shard of the
    base weight in place and the adapters are switched off, so the forward is
    the merged model's; importance skips the adapter tensors and drops peft's
    name wrapping, so the names are the base LLM's in both cases.

    Arguments
    ---------
    model : SpeechLLM
        Model whose ``llm`` may be a peft model; modified in place.

    Returns
    -------
    SpeechLLM
    """
    if not hasattr(model.llm, "merge_and_unload"):
        return model
    if is_sharded(model.llm):
        model.llm.merge_adapter()  # DTensor arithmetic on the shards; every rank calls it
    else:
        model.llm = model.llm.merge_and_unload()
    return model
