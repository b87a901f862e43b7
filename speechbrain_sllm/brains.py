"""SpeechBrain ``Brain`` that trains a speech LLM with a strategy from the yaml.

The Brain holds the training loop and SpeechBrain's hooks; scoring (decoding,
accuracy, WER, perplexity) lives in ``speechbrain_sllm.evaluation`` as
functions of a model, which the Brain calls per batch for its validation and
test metrics.

Authors
 * speechbrain-sllm developers 2026
"""

import logging
import math

import speechbrain as sb
import torch

from speechbrain_sllm.brain_evaluation import EvaluationHooks
from speechbrain_sllm.brain_steps import MitigationTerms, NonFiniteGuard, ShardedTraining
from speechbrain_sllm.checkpointing import TrainableState
from speechbrain_sllm.data.context_lengths import check_context_lengths
from speechbrain_sllm.distributed import share_debug_checkpoint_folder, unwrap
from speechbrain_sllm.evaluation import (
    MAX_METRICS,
    EvaluationSettings,
    QAEvaluator,
    qa_forward,
)
from speechbrain_sllm.fsdp import check_parallelism
from speechbrain_sllm.model.speech_llm import shifted_lm_loss
from speechbrain_sllm.stage_metrics import StageMetrics

logger = logging.getLogger(__name__)
__all__ = ["MAX_METRICS", "SpeechLLMBrain"]


class SpeechLLMBrain(NonFiniteGuard, ShardedTraining, MitigationTerms, EvaluationHooks, sb.Brain):
    """Trains a ``SpeechLLM`` (module key ``model``) with the strategy in ``hparams``.

    The hparams (a recipe passes its whole yaml) give ``prompt`` (ChatPrompt)
    and ``tokenizer``; for training also ``training_strategy`` (from
    ``build_strategy``, applied to the model before the Brain is built) and
    ``lr``; optionally ``ckpt_key`` (default ``loss``), ``input_mode``
    (``speech`` or ``text``), ``text_valid_set`` (written QA for ``text_ppl``)
    and ``output_folder`` (per-item test reports). SpeechBrain run options in
    the yaml (``precision``, ``max_grad_norm``, ...) are read by ``sb.Brain``.

    Checkpoints hold only trainable tensors and all ranks share one
    checkpoint folder (also in ``--debug``). From its mixins
    (``speechbrain_sllm.brain_steps``): gradients clipped over ALL parameter
    groups, non-finite audio items dropped and non-finite steps skipped (both
    counted in the train log), DDP or FSDP2 by ``parallelism``; from
    ``speechbrain_sllm.brain_evaluation``: validation and test metrics, reports
    and the best checkpoint by ``ckpt_key``.

    Arguments
    ---------
    modules, opt_class, hparams, run_opts, checkpointer
        As ``sb.Brain``.
    evaluation : EvaluationSettings or None
        Validation and test metrics and decoding (None: loss only, defaults).
    lr_schedule : WarmupDecaySchedule or None
        Sets the learning rates before each optimizer step (None: constant ``lr``).
    train_logger : speechbrain.utils.train_logger.TrainLogger or None
        Where each epoch's and test set's stats are logged.
    parallelism : str
        ``ddp`` or ``fsdp`` (FSDP2 sharding under torchrun).
    fsdp : FSDPSettings or None
        The sharding options of ``parallelism: fsdp``.
    """

    def __init__(
        self,
        modules=None,
        opt_class=None,
        hparams=None,
        run_opts=None,
        checkpointer=None,
        evaluation=None,
        lr_schedule=None,
        train_logger=None,
        parallelism="ddp",
        fsdp=None,
    ):
        super().__init__(modules, opt_class, hparams, run_opts, checkpointer)
        self.evaluation = evaluation or EvaluationSettings()
        self.lr_schedule = lr_schedule
        self.train_logger = train_logger
        self.parallelism = check_parallelism(parallelism)
        self.fsdp = fsdp
        share_debug_checkpoint_folder(self.checkpointer)
        self.skipped_steps = 0  # non-finite loss or gradient norm, this process
        self.dropped_items = 0  # items with non-finite audio, this process
        self.counts_before_epoch = (0, 0)
        self.batch_ids = []
        self.stage_metrics = StageMetrics([])
        self.scored_batches = None  # validation / test: batches with a finite loss
        self.nonfinite_ids = []  # validation / test: items left out (non-finite audio)

    @property
    def model(self):
        """The ``SpeechLLM``, unwrapped from DDP."""
        return unwrap(self.modules.model)

    def evaluator(self, for_gradients=False):
        """A ``QAEvaluator`` of the model with this Brain's device, precision and settings.

        Arguments
        ---------
        for_gradients : bool
            Use the training precision context (importance scores) instead of
            the evaluation one.

        Returns
        -------
        QAEvaluator
        """
        return QAEvaluator(
            self.model,
            self.hparams.prompt,
            getattr(self.hparams, "tokenizer", None),
            device=self.device,
            autocast=self.training_ctx if for_gradients else self.evaluation_ctx,
            settings=self.evaluation,
        )

    def compute_forward(self, batch, stage):
        """Runs the model on a batch in ``input_mode`` (``speech`` by default)."""
        batch = batch.to(self.device)
        mode = getattr(self.hparams, "input_mode", "speech")
        keep = None
        if mode == "speech" and stage == sb.Stage.TRAIN:
            keep = self.items_with_finite_audio(batch.sig.data, list(batch.id))
        return qa_forward(self.modules.model, batch, mode, self.hparams.prompt, keep)

    def compute_objectives(self, predictions, batch, stage):
        """Mean next-token cross-entropy over answer tokens (in training, plus each
        mitigation's term); off training, the batch's metrics."""
        logits, labels = predictions
        if stage != sb.Stage.TRAIN:
            self.stage_metrics.append(self.evaluator(), batch)
            return shifted_lm_loss(logits, labels, "mean")
        return shifted_lm_loss(logits, labels, "mean") + self.mitigation_loss()

    def on_fit_start(self):
        """Starts the mitigations and registers the compact model state and the schedule,
        all before recovery (a mitigation keeps the base model, also on a resumed run)."""
        for mitigation in self.mitigations():
            mitigation.on_fit_start(self)
        if self.checkpointer is not None:
            recoverables = self.checkpointer.recoverables
            if "model" not in recoverables:
                self.checkpointer.add_recoverable("model", TrainableState(self.modules.model))
            if self.lr_schedule is not None and "lr_schedule" not in recoverables:
                self.checkpointer.add_recoverable("lr_schedule", self.lr_schedule)
        super().on_fit_start()

    def fit(
        self,
        epoch_counter,
        train_set,
        valid_set=None,
        progressbar=None,
        train_loader_kwargs=None,
        valid_loader_kwargs=None,
    ):
        """``Brain.fit`` (same arguments) that first sizes the LR schedule.

        The schedule's length (optimizer steps of the whole run) is known only
        once the training loader exists: loader length on this rank x epochs
        (``len(epoch_counter)`` or an ``EpochCounter``'s ``limit``: any iterable
        counter works) / ``grad_accumulation_factor``.
        """
        self.check_lengths(train_set, "training set")
        if valid_set is not None:
            self.check_lengths(valid_set, "validation set")
        train_loader_kwargs = dict(train_loader_kwargs or {})
        if not isinstance(train_set, torch.utils.data.DataLoader):
            train_set = self.make_dataloader(train_set, sb.Stage.TRAIN, **train_loader_kwargs)
        if self.lr_schedule is not None:
            epochs = getattr(epoch_counter, "limit", None) or len(epoch_counter)
            steps = len(train_set) * epochs // self.grad_accumulation_factor
            self.lr_schedule.set_total_steps(max(steps, 1))
        valid_loader_kwargs = dict(valid_loader_kwargs or {})
        super().fit(
            epoch_counter,
            train_set,
            valid_set,
            progressbar=progressbar,
            valid_loader_kwargs=valid_loader_kwargs,
        )

    def check_lengths(self, dataset, name):
        """Names every item of ``dataset`` longer than the LLM's context, before any step.

        Arguments
        ---------
        dataset : DynamicItemDataset or DataLoader
            A set about to be trained on or scored (a loader: its dataset).
        name : str
            The set's name in the message.
        """
        data = getattr(dataset, "dataset", dataset)
        if not isinstance(data, sb.dataio.dataset.DynamicItemDataset):
            return
        mode = getattr(self.hparams, "input_mode", "speech")
        rate = getattr(self.hparams, "sample_rate", 16000)
        check_context_lengths(self.model, data, self.hparams.prompt, mode, name, rate)

    def on_fit_batch_start(self, batch, should_step):
        """Restores recovered random generators, then sets this step's learning rates.

        The schedule advances BEFORE the optimizer step, so optimizer step ``k``
        runs at ``factor(k)``: step 1 at ``lr / warmup_steps``.
        """
        self.batch_ids = list(getattr(batch, "id", []))  # named when the step is skipped
        rng = self.checkpointer.recoverables.get("rng") if self.checkpointer else None
        if rng is not None:
            rng.apply_pending()
        if should_step and self.lr_schedule is not None and self.opt_class is not None:
            self.lr_schedule(self.optimizer)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs the stage's stats; after validation keeps the best checkpoint by ``ckpt_key``."""
        if stage != sb.Stage.TRAIN:
            return self.on_evaluation_end(stage, stage_loss, epoch)
        stats = {"loss": stage_loss, "ppl": math.exp(min(stage_loss, 50.0))}
        skipped, dropped = self.counts_before_epoch
        stats["skipped_steps"] = self.skipped_steps - skipped  # this epoch
        stats["dropped_items"] = self.dropped_items - dropped
        self.counts_before_epoch = (self.skipped_steps, self.dropped_items)
        self.train_stats = stats
