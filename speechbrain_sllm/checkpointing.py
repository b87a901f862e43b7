"""Compact checkpoints: only trainable tensors, and a per-group LR schedule.

Authors
 * speechbrain-sllm developers 2026
"""

import math

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks


@register_checkpoint_hooks
class TrainableState:
    """Checkpoints the trainable tensors of a module (adaptor, LoRA, unfrozen LLM).

    A frozen LLM is never copied into a checkpoint: a LoRA run on an 8B model
    writes megabytes. The parameters saved are the ones with
    ``requires_grad=True`` when the checkpoint is written.

    Arguments
    ---------
    module : torch.nn.Module
        The model (e.g. ``SpeechLLM`` after ``apply_strategy``).

    Example
    -------
    >>> import tempfile, os
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> net[0].requires_grad_(False)  # doctest: +ELLIPSIS
    Linear(...)
    >>> state = TrainableState(net)
    >>> sorted(state.state_dict())
    ['1.bias', '1.weight']
    >>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
    >>> state.save(path)
    >>> state.load(path)
    """

    def __init__(self, module):
        self.module = module

    def state_dict(self):
        """Trainable parameters by name (detached, on their device)."""
        return {
            name: param.detach()
            for name, param in unwrap(self.module).named_parameters()
            if param.requires_grad
        }

    @mark_as_saver
    def save(self, path):
        """Writes the trainable tensors to ``path``."""
        torch.save(self.state_dict(), path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Loads tensors written by ``save`` (``weights_only=True``).

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain hook signature).
        """
        del end_of_epoch
        saved = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(unwrap(self.module).named_parameters())
        missing = sorted(set(self.state_dict()) - set(saved))
        unknown = sorted(set(saved) - set(params))
        if missing or unknown:
            raise ValueError(
                f"Checkpoint {path!r} does not match the model: missing {missing[:5]}, "
                f"unknown {unknown[:5]}. Resume with the same strategy and model settings "
                "that wrote it, or start a fresh output folder."
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                if params[name].shape != tensor.shape:
                    raise ValueError(
                        f"Checkpoint {path!r}: {name} has shape {tuple(tensor.shape)}, "
                        f"model expects {tuple(params[name].shape)}."
                    )
                params[name].copy_(tensor)


def unwrap(module):
    """The module inside a DDP / DataParallel wrapper, else ``module``."""
    return getattr(module, "module", module)


@register_checkpoint_hooks
class WarmupDecaySchedule:
    """Per-step LR schedule: linear warmup then cosine / linear decay, or constant.

    Each optimizer group keeps its own ``lr_scale`` (layer-wise LR), so
    ``lr_group = base_lr * lr_scale * factor(step)``.

    Arguments
    ---------
    base_lr : float
        Peak learning rate of a group with ``lr_scale == 1``.
    warmup_steps : int
        Linear warmup steps.
    total_steps : int
        Steps of the whole run (decay reaches ``min_ratio`` there).
    decay : str
        ``cosine``, ``linear`` or ``constant``.
    min_ratio : float
        Final LR as a fraction of the peak.

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

    def __init__(self, base_lr, warmup_steps=0, total_steps=1, decay="cosine", min_ratio=0.0):
        if decay not in self.DECAYS:
            raise ValueError(f"WarmupDecaySchedule: decay {decay!r} unknown; use {self.DECAYS}.")
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)
        self.decay = decay
        self.min_ratio = min_ratio
        self.step = 0

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
