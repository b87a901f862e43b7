"""The stages a study's yaml declares, each run by ``StudyRunner.run`` in the yaml's order.

A study yaml declares its stages under ``stage_choices`` and lists the ones
to run in ``stages`` (``--stages=[base,full_ft]`` from the command line)::

    stage_choices:
        base: !new:speechbrain_sllm.study.BaseStage
        full_ft: !new:speechbrain_sllm.study.FinetuneStage
            strategy: full_ft
            lr: 0.001
            settings: !ref <finetune>
        full_ft+replay: !new:speechbrain_sllm.study.FinetuneStage
            strategy: full_ft
            lr: 0.001
            settings: !ref <finetune>
            mitigations: [!ref <replay>]
    stages: [base, full_ft, full_ft+replay]

A stage's name (its key) names its folders (``finetune/<name>/``,
``importance/<name>/``) and its results. Each stage has ``run(runner, name)``,
which reads what the runner shares and writes into ``runner.results``.

Authors
 * speechbrain-sllm developers 2026
"""

import logging
import os

import speechbrain as sb

from speechbrain_sllm.cascade import cascade_reference, transcribe_test_sets
from speechbrain_sllm.evaluation import INPUT_MODES
from speechbrain_sllm.importance.aggregate import ScoreSet
from speechbrain_sllm.importance.report import summarize_shift
from speechbrain_sllm.importance.shift import spearman, topk_overlap
from speechbrain_sllm.importance.stage import zeroing_check
from speechbrain_sllm.outputs import write_json
from speechbrain_sllm.strategies import apply_strategy, build_strategy
from speechbrain_sllm.strategies.interpolation import interpolated, llm_weights
from speechbrain_sllm.strategies.lora import merge_lora
from speechbrain_sllm.study.alignment import align_stage
from speechbrain_sllm.study.base_cache import base_inputs, load_base_cache, save_base_cache
from speechbrain_sllm.study.protocol import fit_and_restore_best
from speechbrain_sllm.study.report import importance_shift, layer_sums, peak_layer
from speechbrain_sllm.study.settings import StageTraining

logger = logging.getLogger(__name__)
BASE = "base"
STAGE_RESULTS = "results.json"  # each fine-tuning stage's scores, in its folder


class BaseStage:
    """The base LLM: T2T accuracy, text perplexity, importance, zeroing check and peak layer.

    Its profile is ``importance/base/`` (the layer-wise LR rule reads it) and its
    scores are what the fine-tuning stages' shifts are measured against.

    Arguments
    ---------
    modes : list of str
        Input modes scored (``speech`` needs an encoder in the base model).

    Example
    -------
    >>> BaseStage().modes
    ('text',)
    """

    uses_base_model = True
    scores_base = True

    def __init__(self, modes=("text",)):
        self.modes = tuple(modes)

    def run(self, runner, name):
        """Scores the base LLM into ``runner.results["base"]`` (``<output>/<name>/``).

        A rerun with the same base LLM, text sets and settings reuses the scores
        (``study.base_cache``).
        """
        folder = os.path.join(runner.folder, name)
        importance_folder = os.path.join(runner.folder, "importance", BASE)
        model = runner.base_model()
        inputs = base_inputs(runner, model, self.modes)
        cached = load_base_cache(folder, importance_folder, inputs)
        if cached is None:
            results, profile, scores = self.score(runner, model, folder)
            save_base_cache(folder, importance_folder, inputs, results, scores)
        else:
            results, profile, scores = cached
        logger.info(f"base LLM: {results}")
        runner.results["base"].update(results)
        runner.base_profile, runner.base_scores = profile, scores
        runner.profiles["base LLM"] = profile

    def score(self, runner, model, folder):
        """Accuracy, perplexity, importance, zeroing check and peak layer of ``model``."""
        brain = runner.stage_brain(model, build_strategy("frozen_llm"), "text", folder)
        results = runner.evaluate(brain, folder, self.modes)
        profile, scores, accumulator = runner.importance(brain, BASE)
        results["zeroing"] = zeroing_check(
            brain.evaluator(),
            runner.data.perplexity_set,
            accumulator,
            runner.importance_settings.zeroing_fraction,
            "text",
            runner.hparams["seed"],
        )
        results["peak"] = peak_layer(profile)
        return results, profile, scores


class CascadeStage:
    """The cascade reference: a recogniser hears each spoken test set, the base LLM answers.

    Writes ``<output>/<name>/`` (transcripts, per-item answers) and
    ``runner.results["base"]["cascade"]``: ``<set>_s2t`` (accuracy %) and
    ``<set>_wer`` (transcripts against the written questions, %) per set.

    Arguments
    ---------
    transcriber : callable
        Builds the recogniser (``WhisperTranscriber`` partial) with the run's ``device``.

    Example
    -------
    >>> CascadeStage(transcriber=dict).uses_base_model
    True
    """

    uses_base_model = True

    def __init__(self, transcriber):
        self.transcriber = transcriber

    def run(self, runner, name):
        """Transcribes the spoken test sets, then the base LLM answers the transcripts."""
        transcriber = self.transcriber(device=runner.run_opts.get("device", "cpu"))
        folder = os.path.join(runner.folder, name)
        manifests = runner.data.test_manifests
        sb.utils.distributed.run_on_main(
            transcribe_test_sets,
            args=[transcriber, manifests, runner.qa_dataset, folder, runner.evaluation.batch_size],
        )
        transcribed = {key: os.path.join(folder, f"{key}.csv") for key in manifests}
        brain = runner.stage_brain(
            runner.base_model(), build_strategy("frozen_llm"), "text", folder
        )
        runner.results["base"]["cascade"] = cascade_reference(
            transcribed, manifests, brain.evaluator(), runner.qa_dataset, folder
        )


class AlignStage:
    """Stage 1: the adaptor aligned with the LLM frozen (``study.alignment``).

    Trains ``adaptor`` in place: the fine-tuning stages that follow start from
    it when the study's ``speech_model`` uses the same adaptor object. Scores
    (S2T of each test set) go to ``runner.results["align"]``, the export to
    ``<output>/align/inference``.

    Arguments
    ---------
    settings : AlignmentSettings
        The objectives and their settings (the yaml's ``align``).
    encoder : SpeechEncoder
        The frozen encoder.
    adaptor : torch.nn.Module
        The adaptor to align.
    """

    training_folder = "align"  # its checkpoints' settings: study.stage_record

    def __init__(self, settings, encoder, adaptor):
        self.settings = settings
        self.encoder = encoder
        self.adaptor = adaptor

    def run(self, runner, name):
        """Aligns the adaptor from the run's seed; its scores into ``runner.results["align"]``."""
        sb.utils.seed_everything(runner.hparams["seed"])
        runner.results["align"] = align_stage(
            runner, self.settings, runner.models.llm(), self.encoder, self.adaptor
        )


class FinetuneStage:
    """Fine-tuning with one strategy and its mitigations, both sides scored, importance.

    The speech arm (``input_mode: speech``, the paper's) trains on the spoken
    questions; the text arm (``input_mode: text``) on the written questions of
    the same items, with the same targets, steps, rates and trainable
    parameters: the control that tells the text loss of the modality from the
    text loss of the task.

    Each run starts from the run's seed and a fresh model (``runner.models.speech_model``),
    keeps its best checkpoint by validation loss, exports it (LoRA as an
    adapter), is scored on both sides (and at each interpolation alpha), has its
    importance measured (LoRA merged) and its shift from the base LLM's.

    Arguments
    ---------
    strategy : str
        ``frozen_llm``, ``full_ft``, ``layerwise_lr``, ``lora`` or ``lora_layerwise_lr``.
    lr : float
        The stage's base learning rate.
    settings : FinetuneSettings
        What the fine-tuning stages share (the yaml's ``finetune``).
    mitigations : list
        Text-side mitigations (``TextReplay``, ``TextDistillation``,
        ``ImportanceAnchor``): their dataset is the study's written training
        QA, their anchor scores the base LLM's, unless given.
    layerwise_lr : LayerwiseLR or None
        This stage's layer-wise rule (None: the settings' one).
    input_mode : str
        ``speech`` (the spoken questions) or ``text`` (their written form; the
        model is fed no audio while it trains).
    train_adaptor : bool
        Whether the adaptor trains (False: it stays as stage 1 left it, so that
        the stage's change of S2T is the LLM's; the export still carries it).
    opt_class, lr_schedule, epoch_counter, train_logger, checkpointer : object or None
        This stage's own objects (None: built from ``settings`` for the stage's folder).

    Example
    -------
    >>> from speechbrain_sllm.study.settings import FinetuneSettings
    >>> stage = FinetuneStage("full_ft", 2e-4, FinetuneSettings(adaptor_lr=2e-5))
    >>> stage.strategy_object().name, stage.strategy_object().adaptor_lr_scale
    ('full_ft', 0.1)
    >>> FinetuneStage("full_ft", 1e-3, FinetuneSettings(), layerwise_lr=object())
    Traceback (most recent call last):
    ...
    ValueError: a layer-wise LR rule only applies to the layer-wise strategies (layerwise_lr, lora_layerwise_lr), not to 'full_ft'.
    """

    needs_base = True
    training_folder = "finetune/{name}"  # its checkpoints' settings: study.stage_record

    def __init__(
        self,
        strategy,
        lr,
        settings,
        mitigations=(),
        layerwise_lr=None,
        input_mode="speech",
        train_adaptor=True,
        opt_class=None,
        lr_schedule=None,
        epoch_counter=None,
        train_logger=None,
        checkpointer=None,
    ):
        if layerwise_lr is not None and not strategy.endswith("layerwise_lr"):
            raise ValueError(
                "a layer-wise LR rule only applies to the layer-wise strategies "
                f"(layerwise_lr, lora_layerwise_lr), not to {strategy!r}."
            )
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode {input_mode!r} unknown; use one of {INPUT_MODES}.")
        self.strategy, self.lr, self.settings = strategy, float(lr), settings
        self.input_mode, self.train_adaptor = input_mode, train_adaptor
        self.mitigations = list(mitigations or [])
        self.layerwise_lr = layerwise_lr
        self.own_objects = {
            "opt_class": opt_class,
            "lr_schedule": lr_schedule,
            "epoch_counter": epoch_counter,
            "train_logger": train_logger,
            "checkpointer": checkpointer,
        }

    def strategy_object(self):
        """The ``Strategy`` this stage trains with (``build_strategy`` of its settings)."""
        return build_strategy(
            self.strategy,
            lora=self.settings.lora,
            layerwise_lr=self.layerwise_lr or self.settings.layerwise_lr,
            train_encoder=self.settings.train_encoder,
            adaptor_lr_scale=self.settings.adaptor_lr_scale(self.lr),
            train_adaptor=self.train_adaptor,
        )

    def training(self):
        """The ``StageTraining`` of this stage: its own objects, else the shared settings'."""
        settings, own = self.settings, dict(self.own_objects)
        own["opt_class"] = own["opt_class"] or settings.opt_class
        return StageTraining(
            lr=self.lr, epochs=settings.epochs, warmup_fraction=settings.warmup_fraction, **own
        )

    def run(self, runner, name):
        """Fine-tunes, scores and measures importance; results into ``runner.results``."""
        sb.utils.seed_everything(runner.hparams["seed"])
        strategy = self.strategy_object()
        model = runner.models.speech_model()
        alphas = self.settings.interpolation_alphas
        base_weights = llm_weights(model) if alphas else None
        apply_strategy(model, strategy)
        folder = os.path.join(runner.folder, "finetune", name)
        brain = runner.stage_brain(
            model,
            strategy,
            self.input_mode,
            folder,
            self.training(),
            mitigations=self.bound(runner),
        )
        data = runner.data
        fit_and_restore_best(brain, data.train_set, data.valid_set, self.settings.batch_size)
        runner.export(model, strategy, folder)
        results = runner.evaluate(brain, folder)
        merge_lora(model)
        if base_weights is not None:
            results["interpolation"] = interpolation_scores(
                runner, brain, base_weights, alphas, folder
            )
        profile, scores, _ = runner.importance(brain, name)
        if data.speech_importance_set is not None:
            speech_overlap(runner, brain, name, profile, scores)
        logger.info(f"{name}: {results}")
        results["shift"], results["top3_iou"] = importance_shift(
            runner.base_profile, runner.base_scores, profile, scores
        )
        results["shift"]["peak_after"] = peak_layer(profile)
        logger.info(f"{name}: {summarize_shift(results['shift'])}")
        # readable as soon as the stage ends (a long run stopped later keeps it)
        write_json(results, os.path.join(folder, STAGE_RESULTS))
        runner.results["strategies"][name] = results
        runner.profiles[name] = profile

    def bound(self, runner):
        """The mitigations with what the study knows filled in (written QA, base scores)."""
        for mitigation in self.mitigations:
            if hasattr(mitigation, "dataset") and mitigation.dataset is None:
                mitigation.dataset = runner.data.replay_set
            if hasattr(mitigation, "scores") and mitigation.scores is None:
                mitigation.scores = dict(runner.base_scores.items())
        return self.mitigations


def interpolation_scores(runner, brain, base_weights, alphas, folder):
    """Both sides scored with the LLM at ``base + alpha (finetuned - base)`` per alpha.

    Arguments
    ---------
    runner : StudyRunner
        The study.
    brain : SpeechLLMBrain
        The stage's Brain (fine-tuned model, LoRA merged).
    base_weights : dict
        The LLM's weights before fine-tuning.
    alphas : list of float
        The interpolation factors.
    folder : str
        The stage's folder (per-item files in ``alpha_<alpha>/``).

    Returns
    -------
    dict
        ``{alpha: scores}`` (``StudyRunner.evaluate``'s columns).
    """
    scores = {}
    for alpha in alphas:
        with interpolated(brain.model, base_weights, float(alpha)):
            scores[str(alpha)] = runner.evaluate(brain, os.path.join(folder, f"alpha_{alpha}"))
        logger.info(f"interpolation alpha {alpha}: {scores[str(alpha)]}")
    return scores


def speech_overlap(runner, brain, name, text_profile, text_scores):
    """Speech importance of the model and its overlap with its textual importance.

    Writes ``importance/<name>/speech/overlap.json``: the intersection over
    union of the two global top-3% sets and the Spearman correlation of their
    layer sums. The frozen LLM's row is the base LLM's (its weights are the
    base ones, heard through a trained adaptor).

    Arguments
    ---------
    runner : StudyRunner
        The study.
    brain : SpeechLLMBrain
        The stage's Brain (LoRA merged).
    name : str
        The stage.
    text_profile : dict
        The model's textual importance profile.
    text_scores : dict
        Its textual scores.

    Returns
    -------
    dict
    """
    profile, scores, _ = runner.importance(brain, name, mode="speech")
    overlap = {
        "top3_iou": topk_overlap(ScoreSet.from_dict(text_scores), ScoreSet.from_dict(scores), 0.03),
        "layer_spearman": spearman(layer_sums(text_profile), layer_sums(profile)),
    }
    if sb.utils.distributed.if_main_process():
        write_json(
            overlap, os.path.join(runner.folder, "importance", name, "speech", "overlap.json")
        )
    return overlap
