"""The paper's protocol as a loop over the stages a study's yaml declares.

A study (MiniSpokenQA, WebQuestions) prepares its data and says how to load
its models; ``StudyRunner`` holds what every stage shares (settings, datasets,
the base LLM's scores, results) and runs the yaml's ``stages`` in order, each
a stage object of ``stage_choices`` (``speechbrain_sllm.study.stages``):
the base LLM's scoring, the cascade reference, stage 1 (alignment) and one
fine-tuning stage per strategy, mitigations included. Memory is freed
between stages.

Authors
 * speechbrain-sllm developers 2026
"""

import gc
import logging
import os

import speechbrain as sb

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.checkpointing import AtomicCheckpointer, RNGState
from speechbrain_sllm.evaluation import EvaluationSettings  # noqa: F401  (docstring example)
from speechbrain_sllm.importance.stage import scored_importance
from speechbrain_sllm.model.speech_llm import SpeechLLM
from speechbrain_sllm.model_export import export_stage
from speechbrain_sllm.schedules import WarmupDecaySchedule
from speechbrain_sllm.study.report import StageClock
from speechbrain_sllm.study.settings import (  # noqa: F401  (ImportanceSettings: docstring example)
    ImportanceSettings,
    StageTraining,
)

logger = logging.getLogger(__name__)


class StudyRunner:
    """What a study's stages share, and the loop that runs them.

    Arguments
    ---------
    hparams : dict
        The study's loaded yaml, also each stage Brain's hparams: the runner
        reads ``output_folder``, ``seed``, ``prompt`` and ``qa_dataset``
        (``make_qa_dataset`` with the yaml's audio policy).
    run_opts : dict
        SpeechBrain run options.
    importance : ImportanceSettings
        The importance stage and zeroing check.
    evaluation : EvaluationSettings
        Decoding and scoring.
    clock : StageClock or None
        Times the stages (a new one if None).
    inference_hparams : str or None
        The inference template (``model_export.INFERENCE_TEMPLATE`` for Whisper +
        HF causal LM models): each trained stage is exported with it to
        ``<stage folder>/inference`` (None: no export).

    Example
    -------
    >>> runner = StudyRunner({"output_folder": "out"}, {}, ImportanceSettings(),
    ...     EvaluationSettings())
    >>> runner.results
    {'base': {}, 'strategies': {}}
    """

    def __init__(
        self, hparams, run_opts, importance, evaluation, clock=None, inference_hparams=None
    ):
        self.hparams = hparams
        self.run_opts = run_opts
        self.importance_settings = importance
        self.evaluation = evaluation
        self.inference_hparams = inference_hparams
        self.folder = hparams["output_folder"]
        self.clock = clock or StageClock()
        self.data = self.models = None
        self.base_profile = self.base_scores = None
        self.results = {"base": {}, "strategies": {}}
        self.profiles = {}
        self._base_model = None

    def use_data(self, data):
        """The datasets every stage reads (a ``StudyData``)."""
        self.data = data

    def use_models(self, models):
        """How the stages load their models (a ``StudyModels``)."""
        self.models = models

    def base_model(self):
        """The base LLM as a ``SpeechLLM`` (no encoder), loaded once and shared until released."""
        if self._base_model is None:
            self._base_model = SpeechLLM(self.models.llm())
        return self._base_model

    def release_base_model(self):
        """Frees the shared base LLM, if one is held (a later ``base_model()`` loads it again)."""
        if self._base_model is not None:
            self._base_model = None
            free_finished_stage()

    def run(self, names, choices):
        """Runs the stages ``names`` of ``choices`` in order; returns ``results``.

        Arguments
        ---------
        names : list of str
            The yaml's ``stages``.
        choices : dict
            The yaml's ``stage_choices``: ``{name: stage object}``.

        Returns
        -------
        dict
            ``base`` (the base LLM's scores, the cascade's under ``cascade``),
            ``align`` (stage 1, when it ran) and ``strategies`` (``{name: scores}``).
        """
        stages = check_stage_list(names, choices)
        for name, stage in stages:
            if not getattr(stage, "uses_base_model", False):
                self.release_base_model()
            with self.clock.stage(name):
                stage.run(self, name)
            free_finished_stage()
        self.release_base_model()
        return self.results

    def qa_dataset(self, manifest, prompt=None):
        """A spoken QA dataset of a manifest (its ``prompt_ids`` serve the written questions).

        Arguments
        ---------
        manifest : str
            A CSV manifest (``ID``, ``wav``, ``question``, ``answer``, ...).
        prompt : ChatPrompt or None
            The prompt (None: the yaml's ``prompt``).

        Returns
        -------
        DynamicItemDataset
        """
        return self.hparams["qa_dataset"](manifest, prompt or self.hparams["prompt"])

    def stage_brain(self, model, strategy, input_mode, folder, training=None, **overrides):
        """A ``SpeechLLMBrain`` for one stage (scoring only when ``training`` is None).

        Arguments
        ---------
        model : SpeechLLM
            The model, with ``strategy`` applied.
        strategy : Strategy
            The stage's strategy.
        input_mode : str
            ``speech`` or ``text``.
        folder : str
            The stage's folder (``train_log.txt``, ``save/``).
        training : StageTraining or None
            Rate, epochs, optimizer, schedule, logger (None: no optimizer, no
            checkpointer, no epochs).
        **overrides : dict
            Stage-specific hparams (e.g. another ``prompt``).

        Returns
        -------
        SpeechLLMBrain
        """
        training = training or StageTraining(lr=0.0, epochs=0)
        counter = training.epoch_counter or sb.utils.epoch_loop.EpochCounter(limit=training.epochs)
        stage_hparams = dict(
            self.hparams,
            training_strategy=strategy,
            lr=training.lr,
            input_mode=input_mode,
            epoch_counter=counter,
            output_folder=folder,
            mitigations=[],
        )
        stage_hparams.update(overrides)
        trains = counter.limit > 0
        checkpointer = training.checkpointer or AtomicCheckpointer(
            os.path.join(folder, "save"), recoverables={"counter": counter, "rng": RNGState()}
        )
        return (training.brain_class or SpeechLLMBrain)(
            modules={"model": model},
            opt_class=training.opt_class if trains else None,
            hparams=stage_hparams,
            run_opts=self.run_opts,
            checkpointer=checkpointer if trains else None,
            evaluation=self.evaluation,
            lr_schedule=training.lr_schedule
            or WarmupDecaySchedule(training.lr, warmup_fraction=training.warmup_fraction),
            train_logger=training.train_logger
            or sb.utils.train_logger.FileTrainLogger(os.path.join(folder, "train_log.txt")),
        )

    def evaluate(self, brain, folder, modes=("text", "speech")):
        """Accuracy on every test set in ``modes``; with text, the text perplexity.

        Arguments
        ---------
        brain : SpeechLLMBrain
            The stage's Brain.
        folder : str
            Where ``<column>.tsv`` (per-item answers) go.
        modes : tuple of str
            ``text`` (T2T) and / or ``speech`` (S2T).

        Returns
        -------
        dict
        """
        evaluator = brain.evaluator()
        batch_size = self.evaluation.batch_size
        results = {}
        for prefix, sets in self.data.test_sets.items():
            for mode in modes:
                column = accuracy_column(prefix, mode)
                results[column] = evaluator.qa_accuracy(
                    sets[mode],
                    mode,
                    output_file=os.path.join(folder, f"{column}.tsv"),
                    batch_size=batch_size,
                    progress=True,
                )
            if "text" in modes and "text_ppl" not in results:
                results["text_ppl"] = evaluator.perplexity(
                    self.data.perplexity_set, "text", batch_size
                )
        if evaluator.nonfinite_ids:  # left out of the scores, named in the log
            results["nonfinite_items"] = sorted(set(evaluator.nonfinite_ids))
        return results

    def importance(self, brain, name, mode="text"):
        """Importance of the brain's LLM; the profile and ``{parameter: scores}``.

        Also writes ``structure.json`` (rows / columns of the top 3%, see
        ``importance.structure``) beside the profile.

        Arguments
        ---------
        brain : SpeechLLMBrain
            The stage's Brain.
        name : str
            The model's name (``importance/<name>/``; speech: ``importance/<name>/speech/``).
        mode : str
            ``text`` (written questions of ``importance_set``) or ``speech``
            (spoken questions of ``speech_importance_set``).

        Returns
        -------
        profile : dict
            From ``run_importance``.
        scores : dict
            ``{parameter name: score tensor}``.
        accumulator : ImportanceAccumulator
            For the zeroing check.
        """
        settings = self.importance_settings
        folder = os.path.join(
            self.folder, "importance", name, *(["speech"] if mode == "speech" else [])
        )
        data = self.data
        dataset = data.speech_importance_set if mode == "speech" else data.importance_set
        evaluator = brain.evaluator(for_gradients=True)
        return scored_importance(evaluator, dataset, folder, settings, mode, self.hparams["seed"])

    def export(self, model, strategy, folder):
        """``<folder>/inference`` for ``SpeechLLMInference`` (``export_stage``; None: no template)."""
        if self.inference_hparams is None:
            return None
        return export_stage(model, strategy, folder, self.hparams, self.inference_hparams)


def fit_and_restore_best(brain, train_set, valid_set, batch_size):
    """Trains for the brain's epochs, then reloads the lowest-validation-loss checkpoint.

    Arguments
    ---------
    brain : SpeechLLMBrain
        From ``stage_brain`` with training.
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


def accuracy_column(prefix, mode):
    """The results key of an accuracy: ``<prefix>_t2t`` / ``<prefix>_s2t``.

    Example
    -------
    >>> accuracy_column("", "text"), accuracy_column("llamaq", "speech")
    ('t2t', 'llamaq_s2t')
    """
    name = "t2t" if mode == "text" else "s2t"
    return f"{prefix}_{name}" if prefix else name


def check_stage_list(names, choices):
    """The ``(name, stage)`` pairs of ``stages``, refused before any stage runs when wrong.

    Arguments
    ---------
    names : list of str
        The yaml's ``stages``.
    choices : dict
        The yaml's ``stage_choices``.

    Returns
    -------
    list of tuple
    """
    missing = [name for name in names if name not in choices]
    if missing:
        raise ValueError(
            f"stages: {missing} not in the yaml's `stage_choices` (it has {sorted(choices)}); "
            "declare a stage there, then list it in `stages`."
        )
    stages = [(name, choices[name]) for name in names]
    seen_base = False
    for name, stage in stages:
        if getattr(stage, "needs_base", False) and not seen_base:
            raise ValueError(
                f"stages: {name!r} compares with the base LLM's importance; list the base "
                f"stage before it (e.g. --stages=[base,{name}])."
            )
        seen_base = seen_base or getattr(stage, "scores_base", False)
    return stages


def free_finished_stage():
    """Frees the last stage's model, optimizer state and ``--debug`` checkpoint folder now.

    A SpeechBrain ``Brain`` sits in a reference cycle (its checkpointer holds it as a
    recoverable), so it outlives its stage until Python's cycle collector runs: without
    this, one strategy's LLM, gradients and AdamW state were still resident while the
    next strategy loaded its own, and its temporary checkpoint folder stayed on disk.
    """
    gc.collect()
