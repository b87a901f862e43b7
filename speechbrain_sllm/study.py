"""Building blocks of the multi-stage studies (MiniSpokenQA, WebQuestions).

A study runs several stages (base LLM scoring, adaptor alignment, speech
fine-tuning with each strategy), each with its own Brain, rate, schedule,
epoch counter, log and checkpoint folder; everything else comes from the
study's yaml.

Authors
 * speechbrain-sllm developers 2026
"""

import contextlib
import functools
import os
import time

import speechbrain as sb
import torch

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.checkpointing import AtomicCheckpointer, RNGState, WarmupDecaySchedule
from speechbrain_sllm.importance.aggregate import ScoreSet
from speechbrain_sllm.importance.report import plot_layer_distributions, plot_module_heatmap
from speechbrain_sllm.importance.shift import layer_shift, topk_overlap


def make_stage_brain(model, hparams, run_opts, strategy, lr, input_mode, folder, epochs):
    """A SpeechLLMBrain for one stage of a study (scoring only when ``epochs == 0``).

    Arguments
    ---------
    model : SpeechLLM
        The model, with the strategy already applied.
    hparams : dict
        The study's hyperparameters (prompt, tokenizer, run options, ...);
        needs ``warmup_fraction``.
    run_opts : dict
        SpeechBrain run options.
    strategy : TrainingStrategy
        The stage's strategy.
    lr : float
        Base learning rate.
    input_mode : str
        ``speech`` or ``text``.
    folder : str
        The stage's output folder (``train_log.txt``, ``save/``).
    epochs : int
        Training epochs; 0 builds a scoring-only Brain (no optimizer, no checkpointer).

    Returns
    -------
    SpeechLLMBrain
    """
    counter = sb.utils.epoch_loop.EpochCounter(limit=epochs)
    stage_hparams = dict(
        hparams,
        training_strategy=strategy,
        lr=lr,
        input_mode=input_mode,
        lr_schedule=WarmupDecaySchedule(lr, warmup_fraction=hparams["warmup_fraction"]),
        epoch_counter=counter,
        train_logger=sb.utils.train_logger.FileTrainLogger(os.path.join(folder, "train_log.txt")),
        output_folder=folder,
    )
    checkpointer = AtomicCheckpointer(
        os.path.join(folder, "save"), recoverables={"counter": counter, "rng": RNGState()}
    )
    return SpeechLLMBrain(
        modules={"model": model},
        opt_class=functools.partial(torch.optim.AdamW, weight_decay=0.0) if epochs else None,
        hparams=stage_hparams,
        run_opts=run_opts,
        checkpointer=checkpointer if epochs else None,
    )


def fit_and_restore_best(brain, train_set, valid_set, batch_size):
    """Trains for the brain's epochs, then reloads the lowest-validation-loss checkpoint.

    Arguments
    ---------
    brain : SpeechLLMBrain
        From ``make_stage_brain`` with ``epochs > 0``.
    train_set : DynamicItemDataset
        Training data.
    valid_set : DynamicItemDataset
        Validation data (its loss picks the checkpoint).
    batch_size : int
        Batch size of both loaders.
    """
    brain.fit(
        brain.hparams.epoch_counter,
        train_set,
        valid_set,
        train_loader_kwargs={"batch_size": batch_size, "shuffle": True},
        valid_loader_kwargs={"batch_size": batch_size},
    )
    brain.checkpointer.recover_if_possible(min_key="loss")


def layer_sums(profile):
    """Per-layer summed importance of a profile.

    Example
    -------
    >>> layer_sums({"layers": [{"sum": 1.0}, {"sum": 2.0}]})
    [1.0, 2.0]
    """
    return [layer["sum"] for layer in profile["layers"]]


def peak_layer(profile):
    """Index of the layer with the largest summed importance.

    Example
    -------
    >>> peak_layer({"layers": [{"sum": 1.0}, {"sum": 2.0}, {"sum": 0.5}]})
    1
    """
    sums = layer_sums(profile)
    return max(range(len(sums)), key=sums.__getitem__)


def importance_shift(base_profile, base_scores, profile, scores, fraction=0.03):
    """Layer-wise shift metrics and the top-``fraction`` overlap against the base LLM.

    Arguments
    ---------
    base_profile : dict
        Importance profile (``aggregate``) of the base LLM.
    base_scores : dict
        ``{name: scores}`` of the base LLM.
    profile : dict
        Profile after fine-tuning.
    scores : dict
        Scores after fine-tuning.
    fraction : float
        Top fraction for the intersection over union.

    Returns
    -------
    shift : dict
        From ``layer_shift``.
    iou : float
        Intersection over union of the two global top-``fraction`` sets.
    """
    shift = layer_shift(layer_sums(base_profile), layer_sums(profile))
    iou = topk_overlap(ScoreSet.from_dict(base_scores), ScoreSet.from_dict(scores), fraction)
    return shift, iou


def write_importance_plots(profiles, base_profile, folder):
    """A study's plots: layer-wise importance and top-3% shares per run, base module heatmap.

    Arguments
    ---------
    profiles : dict
        ``{run name: importance profile}``, the base LLM first.
    base_profile : dict
        The base LLM's profile.
    folder : str
        Where the PNG files go.
    """
    plot_layer_distributions(profiles, os.path.join(folder, "layer_importance.png"))
    plot_layer_distributions(
        profiles,
        os.path.join(folder, "layer_top3_share.png"),
        key="top3",
        title="Share of the global top-3% text-important parameters",
    )
    plot_module_heatmap(base_profile, os.path.join(folder, "base_module_heatmap.png"))


class StageClock:
    """Wall-clock seconds per stage of a study (written to ``timings.json``).

    Example
    -------
    >>> clock = StageClock()
    >>> with clock.stage("data"):
    ...     pass
    >>> list(clock.seconds)
    ['data']
    """

    def __init__(self):
        self.seconds = {}
        self.start = time.time()

    @contextlib.contextmanager
    def stage(self, name):
        """Times the ``with`` block as stage ``name``."""
        begin = time.time()
        yield
        self.seconds[name] = round(time.time() - begin, 1)

    def total(self):
        """Seconds since the clock started."""
        return round(time.time() - self.start, 1)
