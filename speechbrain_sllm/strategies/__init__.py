"""Training strategies: frozen LLM, full fine-tuning, layer-wise LR, LoRA."""

from speechbrain_sllm.model.parameter_names import decoder_layer_index
from speechbrain_sllm.strategies.core import (
    STRATEGIES,
    Strategy,
    apply_strategy,
    build_strategy,
    num_llm_layers,
    param_groups,
)
from speechbrain_sllm.strategies.layerwise import (
    LayerwiseLR,
    importance_scales,
    load_layer_importance,
)
from speechbrain_sllm.strategies.lora import LoRASettings, apply_lora, merge_lora

__all__ = [
    "STRATEGIES",
    "LayerwiseLR",
    "LoRASettings",
    "Strategy",
    "apply_lora",
    "apply_strategy",
    "build_strategy",
    "decoder_layer_index",
    "importance_scales",
    "load_layer_importance",
    "merge_lora",
    "num_llm_layers",
    "param_groups",
]
