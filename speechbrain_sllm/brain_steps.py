"""Training-step mixins of ``SpeechLLMBrain``: non-finite guards and DDP / FSDP wiring.

Each is a ``sb.Brain`` mixin with one concern, kept out of the Brain's training
loop and hooks:

* ``NonFiniteGuard``: a training item whose audio is not finite is dropped from
  its batch; a step whose loss or gradient norm is not finite is skipped (and
  counted); gradients are clipped over every parameter group (SpeechBrain clips
  ``param_groups[0]`` only);
* ``ShardedTraining``: the yaml's ``parallelism`` (SpeechBrain's DDP, or FSDP2
  under torchrun) and the optimizer over the strategy's parameter groups, whose
  checkpoint holds the shards under FSDP;
* ``MitigationTerms``: the hparams' ``mitigations`` (``speechbrain_sllm.mitigations``)
  and the sum of their loss terms at a training step.

The Brain using them sets ``skipped_steps``, ``dropped_items`` and ``batch_ids``.

Authors
 * speechbrain-sllm developers 2026
"""

import logging

import torch

from speechbrain_sllm.fsdp import (
    FSDPSettings,
    ShardedState,
    full_tensor,
    is_sharded,
    shard_speech_llm,
)
from speechbrain_sllm.strategies import param_groups

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """``sb.Brain`` mixin: drops non-finite audio, skips non-finite steps, clips every group."""

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


class ShardedTraining:
    """``sb.Brain`` mixin: DDP or FSDP2 by the Brain's ``parallelism`` (options: ``fsdp``);
    the strategy's optimizer."""

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

    def shard_model(self):
        """Shards the model now under ``parallelism: fsdp`` and torchrun; else does nothing.

        ``fit`` shards anyway; a recipe calls this first when it scores
        importance before training, so that step too runs on shards (a model
        that does not fit one device). Call it after ``apply_strategy``:
        LoRA cannot be added to a sharded LLM.
        """
        if self.parallelism == "fsdp" and self.distributed_launch:
            if not is_sharded(self.model):
                shard_speech_llm(self.model, self.fsdp or FSDPSettings())

    def _wrap_distributed(self):
        """SpeechBrain's DDP, or FSDP2 sharding with ``parallelism: fsdp`` under torchrun."""
        if self.parallelism == "ddp" or not self.distributed_launch:
            return super()._wrap_distributed()
        self.shard_model()


class MitigationTerms:
    """``sb.Brain`` mixin: the hparams' ``mitigations`` and their training-loss terms."""

    def mitigation_loss(self):
        """The sum of the yaml's ``mitigations`` terms at this step (0 without any)."""
        return sum(mitigation.extra_loss(self) for mitigation in self.mitigations())

    def mitigations(self):
        """The hparams' ``mitigations`` list (see ``speechbrain_sllm.mitigations``)."""
        chosen = getattr(self.hparams, "mitigations", None) or []
        if not isinstance(chosen, (list, tuple)):
            raise ValueError(
                f"`mitigations` must be a list of mitigation objects, got {type(chosen).__name__};"
                " a study's fine-tuning stage lists them (`mitigations: [!ref <replay>]`)."
            )
        return chosen
