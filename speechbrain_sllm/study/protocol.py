"""The paper's protocol as one runner that every study drives from its yaml.

A study (MiniSpokenQA, WebQuestions) prepares its data and builds its models;
``StudyRunner`` does the rest the same way for both:

1. the base LLM: T2T (and S2T when it has an encoder) accuracy, text
   perplexity, textual importance and the zeroing check;
2. for each strategy of the yaml: speech fine-tuning (best checkpoint by
   validation loss), both-sided evaluation, importance after fine-tuning
   (LoRA merged first) and its shift from the base profile;
3. the stage's memory freed before the next one loads its LLM.

Each stage gets its own Brain, learning rate, epoch counter, log and
checkpoint folder; the optimizer (``opt_class``) and the warmup share
(``warmup_fraction``) come from the yaml.

Authors
 * speechbrain-sllm developers 2026
"""

import gc
import logging
import os

import speechbrain as sb

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.cascade import cascade_reference, transcribe_test_sets
from speechbrain_sllm.checkpointing import AtomicCheckpointer, RNGState
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.evaluation import EvaluationSettings  # noqa: F401  (docstring example)
from speechbrain_sllm.importance.aggregate import ScoreSet
from speechbrain_sllm.importance.report import summarize_shift
from speechbrain_sllm.importance.shift import spearman, topk_overlap
from speechbrain_sllm.importance.stage import run_importance, zeroing_check
from speechbrain_sllm.importance.structure import write_structure
from speechbrain_sllm.model_export import (
    export_trained_model,
    inference_settings,
    whole_trainable_state,
)
from speechbrain_sllm.outputs import write_json
from speechbrain_sllm.schedules import WarmupDecaySchedule
from speechbrain_sllm.strategies import LayerwiseLR, apply_strategy, build_strategy
from speechbrain_sllm.strategies.interpolation import interpolated, llm_weights
from speechbrain_sllm.strategies.lora import merge_lora
from speechbrain_sllm.study.report import StageClock, importance_shift, layer_sums, peak_layer
from speechbrain_sllm.study.settings import (
    AlignmentSettings,
    FinetuneSettings,  # noqa: F401  (the docstring example)
    ImportanceSettings,  # noqa: F401
)

logger = logging.getLogger(__name__)
BASE = "base"


class StudyRunner:
    """Runs the evaluate / importance / fine-tune protocol of a study.

    Arguments
    ---------
    hparams : dict
        The study's loaded yaml, also each stage Brain's hparams: the runner
        reads ``output_folder``, ``seed``, ``prompt``, ``tokenizer``,
        ``sample_rate`` and ``max_duration``.
    run_opts : dict
        SpeechBrain run options.
    finetune : FinetuneSettings
        The strategy loop.
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
    alignment : AlignmentSettings or None
        Stage 1 (``align_stage``), for studies that align an adaptor.
    cascade_asr : callable or None
        Builds the cascade reference's recogniser (``WhisperTranscriber``
        partial) with the run's ``device``; None: no cascade reference.

    Example
    -------
    >>> settings = FinetuneSettings(["full_ft"], 1, 8, 1e-4, None)
    >>> runner = StudyRunner({"output_folder": "out"}, {}, settings, ImportanceSettings(),
    ...     EvaluationSettings())
    >>> runner.column("", "text")
    't2t'
    """

    def __init__(
        self,
        hparams,
        run_opts,
        finetune,
        importance,
        evaluation,
        clock=None,
        inference_hparams=None,
        alignment=None,
        cascade_asr=None,
    ):
        self.hparams = hparams
        self.finetune = finetune
        self.importance_settings = importance
        self.evaluation = evaluation
        self.alignment = alignment or AlignmentSettings()
        self.cascade_asr = cascade_asr
        self.inference_hparams = inference_hparams
        self.run_opts = run_opts
        self.folder = hparams["output_folder"]
        self.clock = clock or StageClock()
        self.test_sets, self.importance_set, self.perplexity_set = {}, None, None
        self.speech_importance_set = self.replay_set = self.base_scores = None

    def use_data(
        self, test_sets, importance_set, perplexity_set, speech_importance_set=None, replay_set=None
    ):
        """The datasets every stage scores.

        Arguments
        ---------
        test_sets : dict
            ``{column prefix: {"text": dataset, "speech": dataset}}``: accuracy
            columns are ``<prefix>_t2t`` / ``<prefix>_s2t`` (``t2t`` / ``s2t``
            for the prefix ``""``); per-item answers go to ``<column>.tsv``.
        importance_set : DynamicItemDataset
            Written QA whose answers' loss scores the parameters.
        perplexity_set : DynamicItemDataset
            Written QA for text perplexity and the zeroing check.
        speech_importance_set : DynamicItemDataset or None
            Spoken QA for speech importance after fine-tuning (None: not scored).
        replay_set : DynamicItemDataset or None
            Written training QA that text-side mitigations (replay, distillation)
            train on (None: none can run).
        """
        self.replay_set = replay_set
        self.speech_importance_set = speech_importance_set
        self.test_sets = test_sets
        self.importance_set = importance_set
        self.perplexity_set = perplexity_set

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
        return make_qa_dataset(
            manifest,
            prompt or self.hparams["prompt"],
            sample_rate=self.hparams["sample_rate"],
            max_duration=self.hparams["max_duration"],
            min_duration=self.hparams["min_duration"],
        )

    def stage_brain(
        self, model, strategy, lr, input_mode, folder, epochs, brain_class=None, **overrides
    ):
        """A ``SpeechLLMBrain`` for one stage (scoring only when ``epochs == 0``).

        Arguments
        ---------
        model : SpeechLLM
            The model, with ``strategy`` applied.
        strategy : Strategy
            The stage's strategy.
        lr : float
            Base learning rate.
        input_mode : str
            ``speech`` or ``text``.
        folder : str
            The stage's folder (``train_log.txt``, ``save/``).
        epochs : int
            Training epochs; 0: no optimizer, no checkpointer.
        brain_class : type or None
            A ``SpeechLLMBrain`` subclass (None: ``SpeechLLMBrain``).
        **overrides : dict
            Stage-specific hparams (e.g. another ``prompt``).

        Returns
        -------
        SpeechLLMBrain
        """
        counter = sb.utils.epoch_loop.EpochCounter(limit=epochs)
        stage_hparams = dict(
            self.hparams,
            training_strategy=strategy,
            lr=lr,
            input_mode=input_mode,
            epoch_counter=counter,
            output_folder=folder,
            mitigations=[],
        )
        stage_hparams.update(overrides)
        checkpointer = AtomicCheckpointer(
            os.path.join(folder, "save"), recoverables={"counter": counter, "rng": RNGState()}
        )
        return (brain_class or SpeechLLMBrain)(
            modules={"model": model},
            opt_class=self.finetune.opt_class if epochs else None,
            hparams=stage_hparams,
            run_opts=self.run_opts,
            checkpointer=checkpointer if epochs else None,
            evaluation=self.evaluation,
            lr_schedule=WarmupDecaySchedule(lr, warmup_fraction=self.finetune.warmup_fraction),
            train_logger=sb.utils.train_logger.FileTrainLogger(
                os.path.join(folder, "train_log.txt")
            ),
        )

    def fit_and_restore_best(self, brain, train_set, valid_set, batch_size=None):
        """Trains for the brain's epochs, then reloads the lowest-validation-loss checkpoint.

        Arguments
        ---------
        brain : SpeechLLMBrain
            From ``stage_brain`` with ``epochs > 0``.
        train_set : DynamicItemDataset
            Training data.
        valid_set : DynamicItemDataset
            Validation data (its loss picks the checkpoint).
        batch_size : int or None
            Batch size of both loaders (None: the fine-tuning batch size).
        """
        batch_size = batch_size or self.finetune.batch_size
        brain.fit(
            brain.hparams.epoch_counter,
            train_set,
            valid_set,
            train_loader_kwargs={"batch_size": batch_size, "shuffle": True},
            valid_loader_kwargs={"batch_size": batch_size},
        )
        brain.checkpointer.recover_if_possible(min_key="loss")

    @staticmethod
    def column(prefix, mode):
        """The results key of an accuracy: ``<prefix>_t2t`` / ``<prefix>_s2t``."""
        name = "t2t" if mode == "text" else "s2t"
        return f"{prefix}_{name}" if prefix else name

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
        for prefix, sets in self.test_sets.items():
            for mode in modes:
                column = self.column(prefix, mode)
                results[column] = evaluator.qa_accuracy(
                    sets[mode],
                    mode,
                    output_file=os.path.join(folder, f"{column}.tsv"),
                    batch_size=batch_size,
                    progress=True,
                )
            if "text" in modes and "text_ppl" not in results:
                results["text_ppl"] = evaluator.perplexity(self.perplexity_set, "text", batch_size)
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
        dataset = self.speech_importance_set if mode == "speech" else self.importance_set
        profile, accumulator = run_importance(
            brain.evaluator(for_gradients=True),
            dataset,
            folder,
            topk_percents=settings.topk,
            estimator=settings.estimator,
            mode=mode,
            scope=settings.scope,
            fraction=settings.fraction,
            batch_size=settings.batch_size,
            seed=self.hparams["seed"],
            progress=True,
        )
        scores = accumulator.scores()
        if sb.utils.distributed.if_main_process():  # rows / columns of the top 3%
            write_structure(scores, folder)
        return profile, scores, accumulator

    def base_stage(self, model, folder, modes=("text",)):
        """The base LLM: accuracy, perplexity, importance, zeroing check and peak layer.

        Arguments
        ---------
        model : SpeechLLM
            The base model (LLM frozen).
        folder : str
            The stage's folder.
        modes : tuple of str
            Input modes to score (``speech`` needs an encoder).

        Returns
        -------
        results : dict
        profile : dict
        scores : dict
        """
        brain = self.stage_brain(model, build_strategy("frozen_llm"), 0.0, "text", folder, 0)
        results = self.evaluate(brain, folder, modes)
        profile, scores, accumulator = self.importance(brain, BASE)
        results["zeroing"] = zeroing_check(
            brain.evaluator(),
            self.perplexity_set,
            accumulator,
            self.importance_settings.zeroing_fraction,
            "text",
            self.hparams["seed"],
        )
        results["peak"] = peak_layer(profile)
        logger.info(f"base LLM: {results}")
        return results, profile, scores

    def cascade_stage(self, model, manifests):
        """The cascade reference: ``cascade_asr`` hears each spoken test set, ``model`` answers.

        Arguments
        ---------
        model : SpeechLLM
            The base LLM (answers the transcripts as written questions).
        manifests : dict
            ``{column prefix: the spoken test set's CSV manifest}``.

        Returns
        -------
        dict or None
            ``<prefix>_s2t`` (accuracy %) and ``<prefix>_wer`` (transcripts against
            the written questions, %) per set, under ``<output>/cascade/``; None
            when ``cascade_asr`` is None (a ``WhisperTranscriber`` class or partial,
            called with the run's ``device``).
        """
        if self.cascade_asr is None:
            return None
        transcriber = self.cascade_asr(device=self.run_opts.get("device", "cpu"))
        folder = os.path.join(self.folder, "cascade")
        batch_size = self.evaluation.batch_size
        sb.utils.distributed.run_on_main(
            transcribe_test_sets,
            args=[transcriber, manifests, self.qa_dataset, folder, batch_size],
        )
        transcribed = {name: os.path.join(folder, f"{name}.csv") for name in manifests}
        brain = self.stage_brain(model, build_strategy("frozen_llm"), 0.0, "text", folder, 0)
        return cascade_reference(transcribed, manifests, brain.evaluator(), self.qa_dataset, folder)

    def finetune_stage(self, name, model, strategy, train_set, valid_set, base_weights=None):
        """Speech fine-tuning with one strategy, evaluation of both sides, importance.

        Arguments
        ---------
        name : str
            The strategy's name (``finetune/<name>/``, ``importance/<name>/``).
        model : SpeechLLM
            The model, ``strategy`` applied.
        strategy : Strategy
            From ``build_strategy``.
        train_set : DynamicItemDataset
            Spoken training QA.
        valid_set : DynamicItemDataset
            Spoken validation QA.
        base_weights : dict or None
            The LLM's weights before fine-tuning (``llm_weights``): the model is
            then also scored at each ``interpolation_alphas`` (``results["interpolation"]``).

        Returns
        -------
        results : dict
        profile : dict
        scores : dict
        """
        folder = os.path.join(self.folder, "finetune", name)
        lr = self.finetune.lr_of(name)
        epochs = self.finetune.epochs
        mitigations = self.mitigations_of(name)
        brain = self.stage_brain(
            model, strategy, lr, "speech", folder, epochs, mitigations=mitigations
        )
        self.fit_and_restore_best(brain, train_set, valid_set)
        self.export(model, strategy, folder)
        results = self.evaluate(brain, folder)
        merge_lora(model)
        if base_weights is not None:
            results["interpolation"] = self.interpolation_scores(brain, base_weights, folder)
        profile, scores, _ = self.importance(brain, name)
        if self.speech_importance_set is not None:
            self.speech_overlap(brain, name, profile, scores)
        logger.info(f"{name}: {results}")
        return results, profile, scores

    def mitigations_of(self, name):
        """The yaml's mitigations a strategy name asks for (``full_ft+replay+anchor``).

        Each named entry of the yaml's ``mitigation_choices`` gets what the study
        knows: the written training questions (``replay_set``) and the base
        LLM's textual importance as anchor scores.

        Arguments
        ---------
        name : str
            A strategy name, optionally followed by ``+<mitigation>`` parts.

        Returns
        -------
        list
        """
        chosen = []
        for mitigation in self.named_choices(name):
            if isinstance(mitigation, LayerwiseLR):
                continue  # a learning-rate rule, taken by build_strategy
            if hasattr(mitigation, "dataset") and mitigation.dataset is None:
                mitigation.dataset = self.replay_set
            if hasattr(mitigation, "scores") and mitigation.scores is None:
                mitigation.scores = dict(self.base_scores.items())
            chosen.append(mitigation)
        return chosen

    def named_choices(self, name):
        """The yaml's ``mitigation_choices`` entries a strategy name adds (``+<choice>`` parts).

        Arguments
        ---------
        name : str
            A strategy name, optionally followed by ``+<choice>`` parts.

        Returns
        -------
        list
            The chosen objects, in the name's order.
        """
        available = self.finetune.mitigation_choices
        missing = [part for part in name.split("+")[1:] if part not in available]
        if missing:
            raise ValueError(
                f"strategy {name!r}: no mitigation {missing[0]!r} in the yaml's "
                f"`mitigation_choices` (it has {sorted(available)})."
            )
        return [available[part] for part in name.split("+")[1:]]

    def interpolation_alphas(self):
        """The fine-tuning's ``interpolation_alphas`` (empty: no weight interpolation)."""
        return self.finetune.interpolation_alphas

    def interpolation_scores(self, brain, base_weights, folder):
        """Both sides scored with the LLM at ``base + alpha (finetuned - base)`` per alpha.

        Arguments
        ---------
        brain : SpeechLLMBrain
            The stage's Brain (fine-tuned model, LoRA merged).
        base_weights : dict
            The LLM's weights before fine-tuning.
        folder : str
            The stage's folder (per-item files in ``alpha_<alpha>/``).

        Returns
        -------
        dict
            ``{alpha: scores}`` (``evaluate``'s columns).
        """
        scores = {}
        for alpha in self.interpolation_alphas():
            with interpolated(brain.model, base_weights, float(alpha)):
                scores[str(alpha)] = self.evaluate(brain, os.path.join(folder, f"alpha_{alpha}"))
            logger.info(f"interpolation alpha {alpha}: {scores[str(alpha)]}")
        return scores

    def export(self, model, strategy, folder):
        """Writes ``<folder>/inference`` for ``SpeechLLMInference.from_hparams`` (LoRA: a peft adapter).

        Nothing when the runner has no ``inference_hparams``. Every rank calls
        it (an FSDP model is gathered); the main process writes.

        Arguments
        ---------
        model : SpeechLLM
            The trained model (LoRA not merged).
        strategy : Strategy
            Its strategy.
        folder : str
            The stage's folder.

        Returns
        -------
        str or None
            The exported folder.
        """
        if self.inference_hparams is None:
            return None
        export = os.path.join(folder, "inference")
        trainable = whole_trainable_state(model)
        if sb.utils.distributed.if_main_process():
            settings = inference_settings(self.hparams, model)
            export_trained_model(
                model, strategy, self.inference_hparams, export, settings, trainable
            )
        sb.utils.distributed.ddp_barrier()
        return export

    def speech_overlap(self, brain, name, text_profile, text_scores):
        """Speech importance of the model and its overlap with its textual importance.

        Writes ``importance/<name>/speech/overlap.json``: the intersection over
        union of the two global top-3% sets and the Spearman correlation of
        their layer sums. The frozen LLM's row is the base LLM's (its weights
        are the base ones, heard through a trained adaptor).

        Arguments
        ---------
        brain : SpeechLLMBrain
            The stage's Brain (LoRA merged).
        name : str
            The strategy.
        text_profile : dict
            The model's textual importance profile.
        text_scores : dict
            Its textual scores.

        Returns
        -------
        dict
        """
        profile, scores, _ = self.importance(brain, name, mode="speech")
        overlap = {
            "top3_iou": topk_overlap(
                ScoreSet.from_dict(text_scores), ScoreSet.from_dict(scores), 0.03
            ),
            "layer_spearman": spearman(layer_sums(text_profile), layer_sums(profile)),
        }
        if sb.utils.distributed.if_main_process():
            write_json(
                overlap, os.path.join(self.folder, "importance", name, "speech", "overlap.json")
            )
        return overlap

    def run_strategies(self, build_model, train_set, valid_set, base_profile, base_scores):
        """The strategy loop: each strategy of the yaml fine-tuned and scored against the base.

        Arguments
        ---------
        build_model : callable
            ``build_model(strategy)`` returns a fresh ``SpeechLLM`` (pretrained
            LLM, frozen encoder, adaptor) for ``strategy``, not yet applied.
        train_set : DynamicItemDataset
            Spoken training QA.
        valid_set : DynamicItemDataset
            Spoken validation QA.
        base_profile : dict
            The base LLM's profile.
        base_scores : dict
            The base LLM's scores.

        Returns
        -------
        runs : dict
            ``{strategy: results with shift, top3_iou}``.
        profiles : dict
            ``{strategy: profile}``.
        """
        runs, profiles = {}, {}
        self.base_scores = base_scores  # copied out only for a mitigation that needs them
        for name in self.finetune.strategies:
            with self.clock.stage(f"finetune_{name}"):
                sb.utils.seed_everything(self.hparams["seed"])
                strategy = self.build_strategy(name)
                model = build_model(strategy)
                base_weights = llm_weights(model) if self.interpolation_alphas() else None
                apply_strategy(model, strategy)
                run, profile, scores = self.finetune_stage(
                    name, model, strategy, train_set, valid_set, base_weights
                )
            run["shift"], run["top3_iou"] = importance_shift(
                base_profile, base_scores, profile, scores
            )
            run["shift"]["peak_after"] = peak_layer(profile)
            logger.info(f"{name}: {summarize_shift(run['shift'])}")
            runs[name], profiles[name] = run, profile
            del model, scores
            free_finished_stage()
        return runs, profiles

    def build_strategy(self, name):
        """A strategy from the yaml's ``lora``, ``layerwise_lr``, ``train_encoder`` and ``ft_adaptor_lr``.

        The yaml's ``layerwise_lr`` reads the base profile this study writes
        (``<output_folder>/importance/base/profile.json``). A ``+<choice>`` part
        naming a ``LayerwiseLR`` of ``mitigation_choices`` (e.g. the
        module-granular rule, ``layerwise_lr+by_module``) replaces that rule.

        Arguments
        ---------
        name : str
            A strategy name, optionally followed by ``+<choice>`` parts.

        Returns
        -------
        Strategy
        """
        base_name = name.split("+")[0]
        rules = [c for c in self.named_choices(name) if isinstance(c, LayerwiseLR)]
        if rules and not base_name.endswith("layerwise_lr"):
            raise ValueError(
                f"strategy {name!r}: a layer-wise LR rule only applies to the layer-wise "
                f"strategies (layerwise_lr, lora_layerwise_lr), not to {base_name!r}."
            )
        return build_strategy(
            base_name,
            lora=self.finetune.lora,
            layerwise_lr=rules[-1] if rules else self.finetune.layerwise_lr,
            train_encoder=self.finetune.train_encoder,
            adaptor_lr_scale=self.finetune.adaptor_lr_scale(name),
        )


def free_finished_stage():
    """Frees the last stage's model, optimizer state and ``--debug`` checkpoint folder now.

    A SpeechBrain ``Brain`` sits in a reference cycle (its checkpointer holds it as a
    recoverable), so it outlives its stage until Python's cycle collector runs: without
    this, one strategy's LLM, gradients and AdamW state were still resident while the
    next strategy loaded its own, and its temporary checkpoint folder stayed on disk.
    """
    gc.collect()
