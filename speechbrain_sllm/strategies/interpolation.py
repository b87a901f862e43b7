"""Weight-space interpolation after fine-tuning: theta_base + alpha (theta_ft - theta_base).

A mitigation that needs no retraining (WiSE-FT style): the fine-tuned LLM is
pulled back towards the base LLM by a factor ``alpha`` (0: the base LLM, 1:
the fine-tuned one) and scored on both sides for several ``alpha``. For LoRA,
the merged weights give exactly the adapter scaled by ``alpha``. Only the LLM
moves; the adaptor and encoder stay as trained.

Memory: one extra copy of the LLM's weights (the base) on the LLM's device,
plus one of the fine-tuned weights while an interpolation is in effect.

Authors
 * speechbrain-sllm developers 2026
"""

import contextlib

import torch


def llm_weights(model):
    """A copy of the LLM's weights by name (call before LoRA wraps the LLM).

    Arguments
    ---------
    model : SpeechLLM
        The model (``model.llm``).

    Returns
    -------
    dict
        ``{name: tensor}``, detached clones.

    Example
    -------
    >>> model = torch.nn.Module()
    >>> model.llm = torch.nn.Linear(2, 1)
    >>> sorted(llm_weights(model))
    ['bias', 'weight']
    """
    return {name: p.detach().clone() for name, p in model.llm.named_parameters()}


@contextlib.contextmanager
def interpolated(model, base_weights, alpha):
    """Sets each LLM weight to ``base + alpha * (finetuned - base)`` for the ``with`` block.

    Weights are matched by name (a LoRA LLM must be merged first, so that its
    names are the base LLM's); the fine-tuned weights are restored on exit.

    Arguments
    ---------
    model : SpeechLLM
        The fine-tuned model.
    base_weights : dict
        From ``llm_weights`` before fine-tuning.
    alpha : float
        0: the base LLM, 1: the fine-tuned one.

    Yields
    ------
    SpeechLLM
        ``model``, interpolated.

    Example
    -------
    >>> model = torch.nn.Module()
    >>> model.llm = torch.nn.Linear(1, 1, bias=False)
    >>> base = llm_weights(model)
    >>> with torch.no_grad():
    ...     _ = model.llm.weight.add_(2.0)
    >>> with interpolated(model, base, 0.5):
    ...     moved = round((model.llm.weight - base["weight"]).item(), 4)
    >>> moved, (model.llm.weight - base["weight"]).item()
    (1.0, 2.0)
    """
    params = dict(model.llm.named_parameters())
    missing = sorted(set(base_weights) - set(params))
    if missing:
        raise KeyError(
            f"interpolated: base weights {missing[:3]} have no parameter of that name in the "
            "LLM; merge LoRA first (speechbrain_sllm.strategies.merge_lora)."
        )
    finetuned = {name: params[name].detach().clone() for name in base_weights}
    with torch.no_grad():
        for name, base in base_weights.items():
            base = base.to(params[name].device, params[name].dtype)
            # lerp is exact at both ends: alpha 0 gives base, alpha 1 the fine-tuned weight
            params[name].copy_(torch.lerp(base, finetuned[name], alpha))
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, tensor in finetuned.items():
                params[name].copy_(tensor)
