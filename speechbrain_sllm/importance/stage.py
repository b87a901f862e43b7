"""The importance stage: score parameters on text (or speech) data, aggregate, save.

Runs on the LLM of a ``SpeechLLM`` held by a :class:`SpeechLLMBrain`; a plain HF
causal LM is scored by wrapping it in ``SpeechLLM(llm)`` (no encoder) and
using written questions. Under torchrun every rank scores its own share of
the items (``rank::world_size``) and the accumulators are summed, so the
result equals a single-process run up to float summation order. With an
FSDP-sharded model each rank keeps the accumulators of its parameter shards
only, and per-layer sums and top-k thresholds are reduced over ranks.

Authors
 * speechbrain-sllm developers 2026
"""

import logging
import math
import time

import torch
from speechbrain.utils.distributed import ddp_barrier, if_main_process
from tqdm import tqdm

from speechbrain_sllm.fsdp import local_tensor, shard_like
from speechbrain_sllm.importance.aggregate import ScoreSet, aggregate, topk_threshold
from speechbrain_sllm.importance.estimators import ImportanceAccumulator
from speechbrain_sllm.importance.report import save_profile, summarize_profile
from speechbrain_sllm.importance.structure import write_structure
from speechbrain_sllm.model.parameter_names import decoder_layer_index
from speechbrain_sllm.model.speech_llm import shifted_lm_loss

logger = logging.getLogger(__name__)
SCOPES = ("llm", "llm+adaptor", "decoder_linear")


def scored_parameters(model, scope="llm"):
    """The parameters to score, by name (LoRA adapter tensors excluded).

    ``llm`` is every LLM parameter; ``decoder_linear`` only the weight matrices
    of the decoder layers (attention and MLP projections). The latter suits LLMs
    with tied input/output embeddings: the tied matrix's many near-zero scores
    would otherwise fill the global "bottom k%", and zeroing them (every row of
    the output layer) is catastrophic, which defeats the zeroing check.

    Arguments
    ---------
    model : SpeechLLM
        The model.
    scope : str
        ``llm``, ``llm+adaptor`` or ``decoder_linear``.

    Returns
    -------
    dict
        ``{name: parameter}`` with names prefixed by ``llm.`` / ``adaptor.``.

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> model = SpeechLLM(load_causal_lm(config=cfg))
    >>> len(scored_parameters(model)), len(scored_parameters(model, "decoder_linear"))
    (21, 14)
    """
    if scope not in SCOPES:
        raise ValueError(f"importance scope {scope!r} unknown; use one of {SCOPES}.")
    params = {
        f"llm.{name}": param for name, param in model.llm.named_parameters() if "lora_" not in name
    }
    if scope == "decoder_linear":
        return {
            name: param
            for name, param in params.items()
            if param.dim() == 2 and decoder_layer_index(name) is not None
        }
    if scope == "llm+adaptor" and model.adaptor is not None:
        params.update({f"adaptor.{n}": p for n, p in model.adaptor.named_parameters()})
    return params


def scored_indices(num_items, fraction=1.0, seed=0):
    """The items scored (by all ranks together): a seeded subset of ``fraction``.

    Arguments
    ---------
    num_items : int
        Dataset size.
    fraction : float
        Fraction of the data used (the paper uses 1/30 of the training set).
    seed : int
        Seed of the subset draw.

    Returns
    -------
    list of int

    Example
    -------
    >>> len(scored_indices(90, fraction=1 / 30))
    3
    """
    count = max(1, math.ceil(fraction * num_items))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_items, generator=generator)[:count].tolist())


def accumulate_importance(
    evaluator,
    dataset,
    estimator="taylor",
    mode="text",
    scope="llm",
    fraction=1.0,
    batch_size=8,
    accumulate_dtype=None,
    seed=0,
    progress=False,
):
    """Runs forward + backward of the summed LM loss over (a shard of) ``dataset``.

    Arguments
    ---------
    evaluator : QAEvaluator
        The model (not DDP-wrapped: ranks reduce accumulators, not gradients),
        its device and precision context (``SpeechLLMBrain.evaluator(for_gradients=True)``).
    dataset : DynamicItemDataset
        QA dataset (``make_qa_dataset``).
    estimator : str
        ``taylor``, ``taylor_batch``, ``fisher`` or ``second_order``.
    mode : str
        ``text`` (textual importance) or ``speech``.
    scope : str
        ``llm``, ``llm+adaptor`` or ``decoder_linear`` (see ``scored_parameters``).
    fraction : float
        Fraction of the dataset scored.
    batch_size : int
        Batch size.
    accumulate_dtype : str or None
        ``float32`` (default), ``bfloat16``, ``float16`` or ``param`` (the parameter dtype).
    seed : int
        Seed of the subset draw.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ImportanceAccumulator
        Accumulators summed over ranks (hooks removed).
    """
    model = evaluator.model
    params = scored_parameters(model, scope)
    dtype = None
    if accumulate_dtype == "param":
        dtype = next(iter(params.values())).dtype
    elif accumulate_dtype:
        dtype = getattr(torch, accumulate_dtype)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    subset = torch.utils.data.Subset(dataset, scored_indices(len(dataset), fraction, seed))
    model.eval()
    accumulator = ImportanceAccumulator(params, estimator, dtype)
    try:
        # each rank scores items rank::world; under FSDP, filler batches keep ranks in step
        batches = evaluator.rank_batches(subset, batch_size)
        for batch, counted in tqdm(batches, disable=not progress, desc=f"importance ({mode})"):
            logits, labels = evaluator.forward(batch, mode)
            loss = shifted_lm_loss(logits, labels, "sum")
            (loss if counted else loss * 0.0).backward()
            if counted:
                accumulator.step()
    finally:
        accumulator.detach()
        for param, was_trainable in frozen.items():
            param.requires_grad_(was_trainable)
    accumulator.all_reduce()
    return accumulator


def run_importance(evaluator, dataset, output_folder, topk_percents=(1.0, 3.0, 5.0), **kwargs):
    """The importance stage: accumulate, aggregate per layer / module, save, log.

    Arguments
    ---------
    evaluator : QAEvaluator
        The model (see ``accumulate_importance``).
    dataset : DynamicItemDataset
        QA dataset.
    output_folder : str
        Where ``profile.json``, ``layers.csv`` and ``modules.csv`` go (rank 0 only).
    topk_percents : tuple of float
        Percentages for the global top-k shares.
    **kwargs : dict
        Passed to ``accumulate_importance`` (estimator, mode, scope, fraction, ...).

    Returns
    -------
    profile : dict
        The aggregated profile with metadata.
    accumulator : ImportanceAccumulator
        Per-parameter accumulators (for top-k overlap and the zeroing check).
    """
    start = time.time()
    accumulator = accumulate_importance(evaluator, dataset, **kwargs)
    profile = aggregate(ScoreSet.from_accumulator(accumulator), topk_percents)
    profile.update(
        {
            "estimator": accumulator.estimator,
            "mode": kwargs.get("mode", "text"),
            "scope": kwargs.get("scope", "llm"),
            "num_batches": accumulator.num_backward,
            "seconds": round(time.time() - start, 2),
        }
    )
    if if_main_process():
        save_profile(profile, output_folder)
    ddp_barrier()  # other ranks may read the profile next (the layer-wise LR rule)
    logger.info(summarize_profile(profile))
    return profile, accumulator


def scored_importance(evaluator, dataset, folder, settings, mode, seed):
    """``run_importance`` with a study's settings; also the top 3%'s rows / columns.

    Arguments
    ---------
    evaluator : QAEvaluator
        With gradients (``brain.evaluator(for_gradients=True)``).
    dataset : DynamicItemDataset
        The QA items scored.
    folder : str
        Where the profile and ``structure.json`` go.
    settings : ImportanceSettings
        ``topk``, ``estimator``, ``scope``, ``fraction``, ``batch_size``.
    mode : str
        ``text`` or ``speech``.
    seed : int
        Picks the ``fraction`` of items.

    Returns
    -------
    profile : dict
    scores : dict
        ``{parameter name: score tensor}``.
    accumulator : ImportanceAccumulator
        For the zeroing check.
    """
    profile, accumulator = run_importance(
        evaluator,
        dataset,
        folder,
        topk_percents=settings.topk,
        estimator=settings.estimator,
        mode=mode,
        scope=settings.scope,
        fraction=settings.fraction,
        batch_size=settings.batch_size,
        seed=seed,
        progress=True,
    )
    scores = accumulator.scores()
    if if_main_process():  # rows / columns of the top 3%
        write_structure(scores, folder)
    return profile, scores, accumulator


@torch.no_grad()
def zeroing_check(
    evaluator, dataset, accumulator, fraction=0.03, mode="text", seed=0, batch_size=8
):
    """The paper's sanity check: perplexity after zeroing top / random / bottom ``fraction``.

    Weights are restored after each condition (only the zeroed entries are
    kept aside, so the extra memory is ``fraction`` of the model). On an
    FSDP-sharded model every rank zeroes its own shards: thresholds are global
    and the random draw is one process's, so the result is the same.

    Arguments
    ---------
    evaluator : QAEvaluator
        The model.
    dataset : DynamicItemDataset
        Held-out QA data for perplexity.
    accumulator : ImportanceAccumulator
        Scores of the parameters considered.
    fraction : float
        Fraction zeroed, e.g. 0.03.
    mode : str
        ``text`` or ``speech``.
    seed : int
        Seed of the random selection.
    batch_size : int
        Batch size of the perplexity passes.

    Returns
    -------
    dict
        Perplexity for ``none``, ``top``, ``random`` and ``bottom``.
    """
    scores = ScoreSet.from_accumulator(accumulator)
    top, _ = topk_threshold(scores, fraction, largest=True)  # global, also under FSDP
    bottom, _ = topk_threshold(scores, fraction, largest=False)
    generator = torch.Generator().manual_seed(seed)

    def random_mask(name, param):
        """The same draw as one process, then this rank's shard of it."""
        drawn = torch.rand(param.shape, generator=generator) < fraction
        return shard_like(drawn.to(param.device), param)

    selectors = {
        "top": lambda name, param: accumulator.score(name) >= top,
        "random": random_mask,
        "bottom": lambda name, param: accumulator.score(name) <= bottom,
    }
    results = {"none": evaluator.perplexity(dataset, mode, batch_size)}
    for condition, select in selectors.items():
        saved = {}
        for name, param in accumulator.params.items():
            mask = select(name, param)
            weights = local_tensor(param)  # in place: FSDP gathers from these shards
            saved[name] = (mask, weights[mask].clone())
            weights[mask] = 0
        results[condition] = evaluator.perplexity(dataset, mode, batch_size)
        for name, (mask, values) in saved.items():
            local_tensor(accumulator.params[name])[mask] = values
    return results
