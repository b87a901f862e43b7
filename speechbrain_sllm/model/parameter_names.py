"""The vocabulary of parameter names: decoder-layer index, module type, canonical name.

One place for what a parameter's name says about it, read by the strategies
(which layer a rate goes to) and by the importance analysis (per layer, per
module type, across peft's wrapping), so that both parse names the same way.

Authors
 * speechbrain-sllm developers 2026
"""

import re

LAYER_PATTERNS = (
    re.compile(r"(?:^|\.)layers\.(\d+)\."),  # Llama, Qwen2, Mistral, Gemma, Phi-3
    re.compile(r"(?:^|\.)h\.(\d+)\."),  # GPT-2, GPT-J, Falcon
    re.compile(r"(?:^|\.)blocks\.(\d+)\."),
)


def decoder_layer_index(name):
    """Decoder-layer index of a parameter name, or None outside the layers.

    Arguments
    ---------
    name : str
        Parameter name, e.g. ``model.layers.3.mlp.up_proj.weight``.

    Returns
    -------
    int or None

    Example
    -------
    >>> decoder_layer_index("base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight")
    12
    >>> decoder_layer_index("model.embed_tokens.weight") is None
    True
    """
    for pattern in LAYER_PATTERNS:
        match = pattern.search(name)
        if match:
            return int(match.group(1))
    return None


def canonical_name(name):
    """Parameter name without peft wrapping (``base_model.model.``, ``.base_layer``).

    Example
    -------
    >>> canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    name = re.sub(r"^base_model\.model\.", "", name)
    return name.replace(".base_layer.", ".")


def module_type(name):
    """Module type of a parameter: q/k/v/o_proj, gate/up/down_proj, embeddings, norms or other.

    Arguments
    ---------
    name : str
        Parameter name.

    Returns
    -------
    str

    Example
    -------
    >>> module_type("llm.model.layers.3.mlp.gate_proj.weight")
    'gate_proj'
    >>> module_type("llm.model.layers.3.input_layernorm.weight")
    'norms'
    >>> module_type("adaptor.mlp.0.weight")
    'adaptor'
    """
    name = canonical_name(name)
    parts = name.split(".")
    if parts[0] in ("adaptor", "encoder"):
        return parts[0]
    if "embed" in name or parts[-2] in ("wte", "wpe"):
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in parts[-2] or parts[-2].startswith("ln"):
        return "norms"
    return parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]
