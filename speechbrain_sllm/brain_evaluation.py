"""Validation and test hooks of ``SpeechLLMBrain``: metrics, losses, reports, best checkpoint.

``EvaluationHooks`` is the ``sb.Brain`` mixin that scores a validation or test
stage: each batch's metrics (``evaluation``'s valid or test metrics, through
``StageMetrics``), the mean loss over the batches whose loss is finite (items
with non-finite audio named and left out, never scored as a loss of 0), the
logged stats, and after validation the checkpoint kept by ``ckpt_key``.

The Brain using it sets ``evaluation``, ``train_logger``, ``stage_metrics``,
``scored_batches`` and ``nonfinite_ids`` and has ``evaluator()`` and
``check_lengths()``.

Authors
 * speechbrain-sllm developers 2026
"""

import logging
import math

import speechbrain as sb
import torch

from speechbrain_sllm.data.batch_filter import without_nonfinite_audio
from speechbrain_sllm.evaluation import MAX_METRICS
from speechbrain_sllm.stage_metrics import StageMetrics

logger = logging.getLogger(__name__)


class EvaluationHooks:
    """``sb.Brain`` mixin: validation and test metrics, stats, reports and best checkpoint."""

    @torch.no_grad()
    def evaluate_batch(self, batch, stage):
        """``Brain.evaluate_batch`` on the batch's items with finite audio; the others
        are named and counted (``nonfinite_items``), never scored as a loss of 0."""
        batch, dropped = without_nonfinite_audio(batch, f"{stage.name.lower()} set")
        self.nonfinite_ids.extend(dropped)
        if batch is None:
            return torch.tensor(float("nan"))
        return super().evaluate_batch(batch, stage)

    def update_average(self, loss, avg_loss):
        """Off training, the mean loss of the batches whose loss is finite (SpeechBrain
        divides by every batch, so a non-finite one pulls the mean towards 0)."""
        if self.scored_batches is None:
            return super().update_average(loss, avg_loss)
        if not torch.isfinite(loss):
            return avg_loss
        self.scored_batches += 1
        return avg_loss + (float(loss) - avg_loss) / self.scored_batches

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
            (``<output_folder>/<name>_s2t.tsv``, ..., see ``StageMetrics.write``).

        Returns
        -------
        dict
            The test stats (``loss`` and every metric of ``test_metrics``).
        """
        self.check_lengths(test_set, f"test set {name!r}")
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
        if self.train_logger is not None:
            counter = getattr(self.hparams, "epoch_counter", None)
            meta = {"Epoch loaded": getattr(counter, "current", None), "set": name}
            self.train_logger.log_stats(stats_meta=meta, test_stats=self.test_stats)
        return self.test_stats

    def on_stage_start(self, stage, epoch=None):
        """Fresh trackers of the stage's metrics (``evaluation``'s valid or test ones)."""
        self.scored_batches = None if stage == sb.Stage.TRAIN else 0
        self.nonfinite_ids = []
        if stage != sb.Stage.TRAIN:
            metrics = (
                self.evaluation.valid_metrics
                if stage == sb.Stage.VALID
                else self.evaluation.test_metrics
            )
            self.stage_metrics = StageMetrics(
                metrics,
                self.evaluation.answer_match,
                getattr(self.hparams, "text_valid_set", None),
            )

    def evaluation_loss(self, stage, stage_loss):
        """The stage's mean loss over finite batches, with its perplexity and the
        count of items left out; raises when no validation batch scored.

        Arguments
        ---------
        stage : sb.Stage
            VALID or TEST.
        stage_loss : float
            The mean from ``update_average``.

        Returns
        -------
        dict
            ``loss`` and ``ppl`` (None when no batch had a finite loss) and
            ``nonfinite_items``.
        """
        stats = {"loss": None, "ppl": None, "nonfinite_items": len(self.nonfinite_ids)}
        if self.scored_batches is None or self.scored_batches > 0:  # None: no stage start
            stats.update(loss=stage_loss, ppl=math.exp(min(stage_loss, 50.0)))
        elif stage == sb.Stage.VALID:
            raise FloatingPointError(
                "No validation batch had a finite loss (items with non-finite audio: "
                f"{self.nonfinite_ids or 'none'}): check the validation audio, or the model "
                "(lower the learning rate, train in fp32/bf16). The last good checkpoint "
                "is untouched."
            )
        else:
            logger.warning(
                f"No test batch had a finite loss: `loss` is null (items with non-finite "
                f"audio: {self.nonfinite_ids or 'none'})."
            )
        return stats

    def on_evaluation_end(self, stage, stage_loss, epoch):
        """``on_stage_end`` of validation and test: stats, log, best checkpoint."""
        stats = self.evaluation_loss(stage, stage_loss)
        stats.update(self.stage_metrics.summarize(self.evaluator()))
        if stage == sb.Stage.TEST:
            self.test_stats = stats  # logged by ``evaluate`` with the set's name
            return
        lr = self.optimizer.param_groups[0]["lr"] if self.opt_class else 0.0
        if self.train_logger is not None:
            self.train_logger.log_stats(
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
        return self.evaluation.checkpoint_key(getattr(self.hparams, "ckpt_key", "loss"))
