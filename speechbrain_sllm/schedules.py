"""Learning-rate schedules of the Brains: linear warmup from the first step, then decay.

Authors
 * speechbrain-sllm developers 2026
"""

import math

import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)


@register_checkpoint_hooks
class WarmupDecaySchedule:
    """Per-step LR schedule: linear warmup then cosine / linear decay, or constant.

    Each optimizer group keeps its own ``lr_scale`` (layer-wise LR), so
    ``lr_group = base_lr * lr_scale * factor(step)``. SpeechBrain's schedulers
    (``speechbrain.nnet.schedulers``) write one LR into every group, which
    would erase the layer-wise scales: that is why this one exists.

    Call it once per optimizer step, BEFORE the step: step ``k`` (1-based)
    runs at ``factor(k)``, so the first step already warms up
    (``base_lr / warmup_steps``). ``SpeechLLMBrain.fit`` sets ``total_steps``
    from the training loader when the yaml leaves it unset.

    Arguments
    ---------
    base_lr : float
        Peak learning rate of a group with ``lr_scale == 1``.
    warmup_steps : int or None
        Linear warmup steps; None: ``warmup_fraction`` of ``total_steps``.
    total_steps : int or None
        Steps of the whole run (decay reaches ``min_ratio`` there); None: set
        by ``set_total_steps`` (the Brain does it at ``fit``).
    decay : str
        ``cosine``, ``linear`` or ``constant``.
    min_ratio : float
        Final LR as a fraction of the peak.
    warmup_fraction : float
        Fraction of the run spent warming up when ``warmup_steps`` is None.

    Example
    -------
    >>> opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}], lr=1.0)
    >>> sched = WarmupDecaySchedule(1.0, warmup_steps=2, total_steps=4, decay="linear")
    >>> [round(sched(opt), 3) for _ in range(4)]
    [0.5, 1.0, 0.5, 0.0]
    >>> opt.param_groups[0]["lr"]
    0.0
    """

    DECAYS = ("cosine", "linear", "constant")

    def __init__(
        self,
        base_lr,
        warmup_steps=None,
        total_steps=None,
        decay="cosine",
        min_ratio=0.0,
        warmup_fraction=0.0,
    ):
        if decay not in self.DECAYS:
            raise ValueError(f"WarmupDecaySchedule: decay {decay!r} unknown; use {self.DECAYS}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(
                f"WarmupDecaySchedule: warmup_fraction {warmup_fraction} must be in [0, 1)."
            )
        self.base_lr = base_lr
        self.decay = decay
        self.min_ratio = min_ratio
        self.warmup_fraction = warmup_fraction
        self.fixed_warmup = warmup_steps
        self.fixed_total = total_steps
        self.step = 0
        self.set_total_steps(total_steps or 1)

    def set_total_steps(self, total_steps):
        """Sizes the schedule for a run of ``total_steps`` (unless the yaml fixed it).

        Arguments
        ---------
        total_steps : int
            Optimizer steps of the whole run.
        """
        self.total_steps = max(int(self.fixed_total or total_steps), 1)
        if self.fixed_warmup is not None:
            self.warmup_steps = int(self.fixed_warmup)
        else:
            self.warmup_steps = int(self.warmup_fraction * self.total_steps)

    def factor(self, step):
        """LR multiplier at optimizer step ``step`` (1-based)."""
        if step <= self.warmup_steps:
            return step / max(self.warmup_steps, 1)
        if self.decay == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def __call__(self, optimizer):
        """Advances one step and sets the LR of every group; returns the base group's LR."""
        self.step += 1
        factor = self.factor(self.step)
        for group in optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_scale", 1.0) * factor
        return self.base_lr * factor

    @mark_as_saver
    def save(self, path):
        """Saves the step count."""
        torch.save({"step": self.step}, path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Restores the step count."""
        del end_of_epoch
        self.step = torch.load(path, weights_only=True)["step"]
