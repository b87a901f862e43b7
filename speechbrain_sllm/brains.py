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

from speechbrain_sllm.checkpointing import TrainableState, unwrap
from speechbrain_sllm.distributed import share_debug_checkpoint_folder
from speechbrain_sllm.evaluation import MAX_METRICS, QAEvaluator, StageMetrics, qa_forward
from speechbrain_sllm.fsdp import (
    DISTRIBUTED_MODES,
    FSDPSettings,
    ShardedState,
    full_tensor,
    is_sharded,
    shard_speech_llm,
)
from speechbrain_sllm.model.speech_llm import shifted_lm_loss
from speechbrain_sllm.strategies import param_groups

logger = logging.getLogger(__name__)
__all__ = ["MAX_METRICS", "SpeechLLMBrain"]


class SpeechLLMBrain(sb.Brain):
    """Trains a ``SpeechLLM`` (module key ``model``) with the strategy in ``hparams``.

    Expected hparams (a recipe passes its whole yaml): ``prompt`` (ChatPrompt),
    ``tokenizer``; for training also ``training_strategy`` (from
    ``build_strategy``, applied to the model before the Brain is built) and
    ``lr``. Optional: ``lr_schedule`` (WarmupDecaySchedule, set before each
    optimizer step), ``input_mode`` (``speech`` or ``text``), ``train_logger``,
    ``valid_metrics`` / ``test_metrics`` (see ``METRICS``, computed batch by
    batch), ``ckpt_key``, ``text_valid_set`` (written QA for ``text_ppl``),
    ``answer_match``, ``max_new_tokens``, ``num_beams``, ``output_folder``
    (per-item test reports). SpeechBrain run options in the yaml
    (``precision``, ``max_grad_norm``, ...) are read by ``sb.Brain``.

    Gradients are clipped over ALL parameter groups (SpeechBrain clips
    ``param_groups[0]`` only), checkpoints hold only trainable tensors, and all
    ranks share one checkpoint folder (also in ``--debug``). A training item
    whose audio is not finite is dropped from its batch; a step whose loss or
    gradient norm is not finite is skipped; both are counted in the train log.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        share_debug_checkpoint_folder(self.checkpointer)
        self.skipped_steps = 0  # non-finite loss or gradient norm, this process
        self.dropped_items = 0  # items with non-finite audio, this process
        self.counts_before_epoch = (0, 0)
        self.batch_ids = []
        self.stage_metrics = StageMetrics([])

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
            batch_size=getattr(self.hparams, "eval_batch_size", 8),
            max_new_tokens=getattr(self.hparams, "max_new_tokens", 32),
            num_beams=getattr(self.hparams, "num_beams", 1),
            answer_match=getattr(self.hparams, "answer_match", "contains"),
        )

    def compute_forward(self, batch, stage):
        """Runs the model on a batch in ``input_mode`` (``speech`` by default)."""
        batch = batch.to(self.device)
        mode = getattr(self.hparams, "input_mode", "speech")
        keep = None
        if mode == "speech" and stage == sb.Stage.TRAIN:
            keep = self.items_with_finite_audio(batch.sig.data, list(batch.id))
        return qa_forward(self.modules.model, batch, mode, self.hparams.prompt, keep)

    def items_with_finite_audio(self, wavs, ids):
        """Positions of the items whose audio is finite; the others are dropped and logged.

        A NaN or infinite sample makes the whole batch's loss and gradients
        non-finite; dropping the item keeps the step for the good items. A batch
        with no good item is kept whole (its step is then skipped).

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, T)`` padded audio.
        ids : list of str
            The items' ids.

        Returns
        -------
        list of int
        """
        finite = torch.isfinite(wavs).all(dim=1).tolist()
        keep = [index for index, good in enumerate(finite) if good]
        if len(keep) in (0, len(ids)):
            return list(range(len(ids)))
        dropped = [ids[index] for index, good in enumerate(finite) if not good]
        self.dropped_items += len(dropped)
        logger.warning(f"Step {self.step}: dropped items with non-finite audio: {dropped}")
        return keep

    def compute_objectives(self, predictions, batch, stage):
        """Mean next-token cross-entropy over answer tokens; off training, the batch's metrics."""
        logits, labels = predictions
        if stage != sb.Stage.TRAIN:
            self.stage_metrics.append(self.evaluator(), batch)
        return shifted_lm_loss(logits, labels, "mean")

    def init_optimizers(self):
        """Builds one optimizer over the strategy's parameter groups."""
        if self.opt_class is None:
            return
        groups = param_groups(self.model, self.hparams.training_strategy, self.hparams.lr)
        if not groups:
            raise ValueError("No trainable parameter: check `strategy` and the model settings.")
        self.optimizer = self.opt_class(groups)
        self.optimizers_dict = {"optimizer": self.optimizer}
        if self.checkpointer is None:
            return
        if is_sharded(self.model):  # one DCP entry: trainable shards + optimizer shards
            self.checkpointer.recoverables.pop("optimizer", None)
            self.checkpointer.add_recoverable("model", ShardedState(self.model, self.optimizer))
        else:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def on_fit_start(self):
        """Registers the compact model state and the schedule before recovery."""
        if self.checkpointer is not None:
            recoverables = self.checkpointer.recoverables
            if "model" not in recoverables:
                self.checkpointer.add_recoverable("model", TrainableState(self.modules.model))
            schedule = getattr(self.hparams, "lr_schedule", None)
            if schedule is not None and "lr_schedule" not in recoverables:
                self.checkpointer.add_recoverable("lr_schedule", schedule)
        super().on_fit_start()

    def _parallelism(self):
        """The yaml's ``parallelism`` (``ddp`` or ``fsdp``), checked."""
        mode = getattr(self.hparams, "parallelism", "ddp")
        if mode not in DISTRIBUTED_MODES:
            raise ValueError(
                f"parallelism {mode!r} unknown; use one of {DISTRIBUTED_MODES} "
                "(yaml key or --parallelism=...)."
            )
        return mode

    def shard_model(self):
        """Shards the model now under ``parallelism: fsdp`` and torchrun; else does nothing.

        ``fit`` shards anyway; a recipe calls this first when it scores
        importance before training, so that step too runs on shards (a model
        that does not fit one device). Call it after ``apply_strategy``:
        LoRA cannot be added to a sharded LLM.
        """
        if self._parallelism() == "fsdp" and self.distributed_launch:
            if not is_sharded(self.model):
                shard_speech_llm(self.model, getattr(self.hparams, "fsdp", None) or FSDPSettings())

    def _wrap_distributed(self):
        """SpeechBrain's DDP, or FSDP2 sharding with ``parallelism: fsdp`` under torchrun."""
        if self._parallelism() == "ddp" or not self.distributed_launch:
            return super()._wrap_distributed()
        self.shard_model()

    def check_loss_isfinite(self, loss):
        """Counts a non-finite loss (naming the batch's items); its step will be skipped.

        Training stops with a clear error once more than ``nonfinite_patience``
        losses of the current epoch were non-finite.
        """
        if torch.isfinite(loss):
            return
        self.nonfinite_count += 1
        self.skip_this_step = True
        self.skipped_steps += 1
        logger.warning(
            f"Non-finite loss at step {self.step} (items {self.batch_ids}): the optimizer "
            f"step is skipped ({self.nonfinite_count} this epoch, patience "
            f"{self.nonfinite_patience})."
        )
        if self.nonfinite_count > self.nonfinite_patience:
            raise FloatingPointError(
                f"{self.nonfinite_count} non-finite losses in this epoch exceed "
                f"nonfinite_patience={self.nonfinite_patience}. Lower the learning rate, "
                "check the data (empty or corrupted audio), or train in fp32/bf16 instead "
                "of fp16. The last good checkpoint is untouched."
            )

    def optimizers_step(self):
        """Optimizer step with gradient clipping over every parameter group.

        Steps whose loss or gradient norm is non-finite are skipped (gradients
        dropped) and counted in ``skipped_steps``.
        """
        if self.opt_class is None:
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        skip = getattr(self, "skip_this_step", False)
        if skip or not torch.isfinite(norm):
            if not skip:
                self.skipped_steps += 1
                logger.warning(
                    f"Non-finite gradient norm at step {self.step} (items {self.batch_ids}): "
                    "step skipped."
                )
            self.skip_this_step = False
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            return
        if not self.scaler.is_enabled() and self.skip_nonfinite_grads:
            self.check_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1

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
        train_loader_kwargs = dict(train_loader_kwargs or {})
        if not isinstance(train_set, torch.utils.data.DataLoader):
            train_set = self.make_dataloader(train_set, sb.Stage.TRAIN, **train_loader_kwargs)
        schedule = getattr(self.hparams, "lr_schedule", None)
        if schedule is not None:
            epochs = getattr(epoch_counter, "limit", None) or len(epoch_counter)
            steps = len(train_set) * epochs // self.grad_accumulation_factor
            schedule.set_total_steps(max(steps, 1))
        valid_loader_kwargs = dict(valid_loader_kwargs or {})
        super().fit(
            epoch_counter,
            train_set,
            valid_set,
            progressbar=progressbar,
            valid_loader_kwargs=valid_loader_kwargs,
        )

    def evaluate(
        self,
        test_set,
        max_key=None,
        min_key=None,
        progressbar=None,
        test_loader_kwargs=None,
        name="test",
    ):
        """``Brain.evaluate`` of the best checkpoint; logs and writes reports named ``name``.

        Arguments
        ---------
        test_set : DynamicItemDataset or DataLoader
            Test data.
        max_key : str or None
            Checkpoint meta key to maximise when choosing the checkpoint.
        min_key : str or None
            Checkpoint meta key to minimise.
        progressbar : bool or None
            Show a progress bar.
        test_loader_kwargs : dict or None
            Loader options.
        name : str
            Name of the set in the train log and the report files
            (``<output_folder>/<name>_<metric>.txt``).

        Returns
        -------
        dict
            The test stats (``loss`` and every metric of ``test_metrics``).
        """
        super().evaluate(
            test_set,
            max_key=max_key,
            min_key=min_key,
            progressbar=progressbar,
            test_loader_kwargs=dict(test_loader_kwargs or {}),
        )
        folder = getattr(self.hparams, "output_folder", None)
        if folder is not None:
            self.stage_metrics.write(folder, name)
        train_logger = getattr(self.hparams, "train_logger", None)
        if train_logger is not None:
            meta = {"Epoch loaded": getattr(self.hparams, "epoch_counter", None), "set": name}
            if meta["Epoch loaded"] is not None:
                meta["Epoch loaded"] = meta["Epoch loaded"].current
            train_logger.log_stats(stats_meta=meta, test_stats=self.test_stats)
        return self.test_stats

    def on_fit_batch_start(self, batch, should_step):
        """Restores recovered random generators, then sets this step's learning rates.

        The schedule advances BEFORE the optimizer step, so optimizer step ``k``
        runs at ``factor(k)``: step 1 at ``lr / warmup_steps``.
        """
        self.batch_ids = list(getattr(batch, "id", []))  # named when the step is skipped
        rng = self.checkpointer.recoverables.get("rng") if self.checkpointer else None
        if rng is not None:
            rng.apply_pending()
        schedule = getattr(self.hparams, "lr_schedule", None)
        if should_step and schedule is not None and self.opt_class is not None:
            schedule(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        """Fresh trackers of the stage's ``valid_metrics`` / ``test_metrics``."""
        if stage != sb.Stage.TRAIN:
            key = "valid_metrics" if stage == sb.Stage.VALID else "test_metrics"
            self.stage_metrics = StageMetrics(
                getattr(self.hparams, key, []),
                getattr(self.hparams, "answer_match", "contains"),
                getattr(self.hparams, "text_valid_set", None),
            )

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs the stage's stats; after validation keeps the best checkpoint by ``ckpt_key``."""
        stats = {"loss": stage_loss, "ppl": math.exp(min(stage_loss, 50.0))}
        if stage == sb.Stage.TRAIN:
            skipped, dropped = self.counts_before_epoch
            stats["skipped_steps"] = self.skipped_steps - skipped  # this epoch
            stats["dropped_items"] = self.dropped_items - dropped
            self.counts_before_epoch = (self.skipped_steps, self.dropped_items)
            self.train_stats = stats
            return
        stats.update(self.stage_metrics.summarize(self.evaluator()))
        if stage == sb.Stage.TEST:
            self.test_stats = stats  # logged by ``evaluate`` with the set's name
            return
        lr = self.optimizer.param_groups[0]["lr"] if self.opt_class else 0.0
        train_logger = getattr(self.hparams, "train_logger", None)
        if train_logger is not None:
            train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr},
                train_stats=getattr(self, "train_stats", None),
                valid_stats=stats,
            )
        if self.checkpointer is not None:
            key = self.ckpt_key
            keys = {"max_keys": [key]} if key in MAX_METRICS else {"min_keys": [key]}
            self.checkpointer.save_and_keep_only(meta=stats, **keys)

    @property
    def ckpt_key(self):
        """The checkpoint meta key that selects the best checkpoint (``ckpt_key`` hparam)."""
        key = getattr(self.hparams, "ckpt_key", "loss")
        allowed = ["loss", *getattr(self.hparams, "valid_metrics", [])]
        if key not in allowed:
            raise ValueError(
                f"ckpt_key {key!r} is not computed at validation; use one of {allowed} "
                "(add it to valid_metrics)."
            )
        return key
