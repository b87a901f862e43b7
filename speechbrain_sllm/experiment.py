"""Builders shared by the recipes: a strategy-aware SpeechLLMBrain and its fit loop.

Recipes stay checklists (parse, prepare, datasets, brain, fit, evaluate); the
wiring of optimizer rule, per-step schedule and compact checkpoints lives here.

Authors
 * speechbrain-sllm developers 2026
"""

import os

import speechbrain as sb
import torch

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.checkpointing import AtomicCheckpointer, RNGState, WarmupDecaySchedule
from speechbrain_sllm.importance.stage import run_importance
from speechbrain_sllm.strategies import build_strategy


def steps_per_run(num_items, batch_size, epochs, grad_accumulation=1):
    """Optimizer steps of a run (for the LR schedule).

    Example
    -------
    >>> steps_per_run(100, 16, 3)
    21
    """
    return epochs * -(-num_items // batch_size) // grad_accumulation


def make_speech_llm_brain(
    model,
    strategy,
    prompt,
    tokenizer,
    folder,
    lr,
    epochs,
    total_steps,
    run_opts=None,
    input_mode="speech",
    warmup_fraction=0.1,
    weight_decay=0.0,
    max_new_tokens=32,
    num_beams=1,
    text_valid_set=None,
    ckpt_recoverables=None,
):
    """A ``SpeechLLMBrain`` with AdamW over the strategy's groups, a warmup-cosine
    schedule, a file logger and an atomic checkpointer in ``folder/save`` that also
    keeps the random generators (exact resume from intra-epoch checkpoints).

    Arguments
    ---------
    model : SpeechLLM
        The model, after ``apply_strategy``.
    strategy : Strategy
        The resolved strategy.
    prompt : ChatPrompt
        Prompt builder.
    tokenizer : HFTokenizer or SentencePieceTokenizer
        Tokenizer adapter.
    folder : str
        Output folder of the run.
    lr : float
        Base learning rate.
    epochs : int
        Epoch limit.
    total_steps : int
        Optimizer steps of the run (schedule length).
    run_opts : dict or None
        SpeechBrain run options (device, precision, debug, ...).
    input_mode : str
        ``speech`` or ``text``.
    warmup_fraction : float
        Fraction of the steps spent warming up.
    weight_decay : float
        AdamW weight decay.
    max_new_tokens : int
        Decoding budget for evaluation.
    num_beams : int
        Beam size for evaluation.
    text_valid_set : DynamicItemDataset or None
        Written QA whose perplexity is logged at every validation.
    ckpt_recoverables : dict or None
        Extra checkpoint recoverables.

    Returns
    -------
    SpeechLLMBrain
    """
    counter = sb.utils.epoch_loop.EpochCounter(limit=epochs)
    recoverables = {"counter": counter, "rng": RNGState()}
    recoverables.update(ckpt_recoverables or {})
    checkpointer = AtomicCheckpointer(os.path.join(folder, "save"), recoverables=recoverables)
    hparams = {
        "prompt": prompt,
        "tokenizer": tokenizer,
        "strategy": strategy,
        "lr": lr,
        "lr_schedule": WarmupDecaySchedule(
            lr, warmup_steps=int(warmup_fraction * total_steps), total_steps=total_steps
        ),
        "input_mode": input_mode,
        "epoch_counter": counter,
        "train_logger": sb.utils.train_logger.FileTrainLogger(
            os.path.join(folder, "train_log.txt")
        ),
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "text_valid_set": text_valid_set,
    }
    return SpeechLLMBrain(
        modules={"model": model},
        opt_class=lambda groups: torch.optim.AdamW(groups, weight_decay=weight_decay),
        hparams=hparams,
        run_opts=dict(run_opts or {}),
        checkpointer=checkpointer,
    )


def fit_and_restore_best(brain, train_set, valid_set, batch_size, loader_kwargs=None):
    """Trains for the epochs of the brain's counter, then reloads the lowest-loss checkpoint.

    Arguments
    ---------
    brain : SpeechLLMBrain
        Built by ``make_speech_llm_brain``.
    train_set : DynamicItemDataset
        Training data.
    valid_set : DynamicItemDataset
        Validation data.
    batch_size : int
        Batch size.
    loader_kwargs : dict or None
        Extra train loader options.
    """
    train_loader = {"batch_size": batch_size, "shuffle": True}
    train_loader.update(loader_kwargs or {})
    brain.fit(
        brain.hparams.epoch_counter,
        train_set,
        valid_set,
        train_loader_kwargs=train_loader,
        valid_loader_kwargs={"batch_size": batch_size},
    )
    brain.checkpointer.recover_if_possible(min_key="loss")


def ensure_base_profile(model, strategy, prompt, tokenizer, text_set, folder, run_opts, **kwargs):
    """Runs the importance stage on the still-unmodified LLM when the importance LR
    rule needs a profile that does not exist yet; returns the profile path or None.

    Arguments
    ---------
    model : SpeechLLM
        The model BEFORE ``apply_strategy``.
    strategy : Strategy
        The resolved strategy.
    prompt : ChatPrompt
        Prompt builder of ``text_set``.
    tokenizer : HFTokenizer or SentencePieceTokenizer
        Tokenizer adapter.
    text_set : DynamicItemDataset
        Written data scored for textual importance.
    folder : str
        Output folder of the profile when it is computed.
    run_opts : dict
        SpeechBrain run options.
    **kwargs : dict
        Passed to ``run_importance`` (estimator, fraction, batch_size, ...).

    Returns
    -------
    str or None
    """
    rule = strategy.layerwise
    if rule is None or rule.rule != "importance" or os.path.isfile(rule.profile):
        return None
    brain = make_speech_llm_brain(
        model,
        build_strategy("frozen_llm"),
        prompt,
        tokenizer,
        folder,
        0.0,
        0,
        1,
        run_opts=run_opts,
        input_mode="text",
    )
    run_importance(brain, text_set, os.path.dirname(rule.profile), mode="text", **kwargs)
    return rule.profile
