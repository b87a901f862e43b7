"""Per-parameter importance estimators accumulated from gradients as they arrive.

Estimators (``g_b``: gradient of batch ``b``'s summed LM loss, ``g = sum_b g_b``):

* ``taylor``: ``|g * w|``, the paper's first-order estimate of the loss change
  when ``w`` is zeroed, with the loss summed over the whole scoring set.
* ``taylor_batch``: ``sum_b |g_b * w|`` (per-batch magnitudes do not cancel).
* ``fisher``: ``sum_b g_b ** 2`` (empirical Fisher diagonal).
* ``second_order``: ``|g * w - 0.5 * w * F * w|`` with ``F = sum_b g_b ** 2``
  (LLM-Pruner's second-order Taylor with the Fisher as Hessian diagonal).

Gradients are folded into the accumulators by post-accumulate-grad hooks and
then freed, so the peak memory is the model, the accumulators and ONE
parameter's gradient: with accumulators in the parameter dtype that is the
footprint of a plain forward + backward. Accumulation in a reduced dtype is
checked at the end: an overflow to inf / nan raises instead of returning scores.

Under FSDP the parameters are DTensor shards: each rank's accumulators cover
its shard only. FSDP has already reduce-scattered the gradients (averaged
over ranks), so the shard's gradient times the world size is the gradient of
the loss summed over every rank's data: nothing is all-reduced afterwards.

Authors
 * speechbrain-sllm developers 2026
"""

import torch

from speechbrain_sllm.fsdp import local_tensor

ESTIMATORS = ("taylor", "taylor_batch", "fisher", "second_order")


class ImportanceAccumulator:
    """Folds gradients of the given parameters into importance accumulators.

    Arguments
    ---------
    named_parameters : dict
        ``{name: parameter}`` to score; they get ``requires_grad=True`` while attached.
    estimator : str
        One of ``ESTIMATORS``.
    accumulate_dtype : torch.dtype or None
        Accumulator dtype; None uses float32 (use the parameter dtype, e.g.
        bfloat16, for the lean memory footprint on large models).

    Example
    -------
    >>> lin = torch.nn.Linear(3, 1, bias=False)
    >>> acc = ImportanceAccumulator({"w": lin.weight}, "taylor")
    >>> lin(torch.ones(2, 3)).sum().backward()
    >>> lin.weight.grad is None
    True
    >>> scores = acc.scores()
    >>> torch.allclose(scores["w"], (2 * lin.weight).abs().detach())
    True
    >>> acc.detach()
    """

    def __init__(self, named_parameters, estimator="taylor", accumulate_dtype=None):
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"Unknown importance estimator {estimator!r}; use one of {ESTIMATORS}."
            )
        if not named_parameters:
            raise ValueError("ImportanceAccumulator: no parameter to score.")
        self.estimator = estimator
        self.params = dict(named_parameters)
        self.sharded = any(local_tensor(p) is not p for p in self.params.values())
        self.world_size = torch.distributed.get_world_size() if self.sharded else 1
        dtype = accumulate_dtype or torch.float32
        self.first = {}  # taylor / second_order: sum of g; taylor_batch: sum |g w|; fisher: sum g^2
        self.second = {}  # second_order: sum of g^2
        self.num_backward = 0
        self._handles = []
        self._was_trainable = {}
        for name, param in self.params.items():
            self.first[name] = torch.zeros_like(local_tensor(param), dtype=dtype)
            if estimator == "second_order":
                self.second[name] = torch.zeros_like(self.first[name])
            self._was_trainable[name] = param.requires_grad
            param.requires_grad_(True)
            param.grad = None
            self._handles.append(param.register_post_accumulate_grad_hook(self._fold_hook(name)))

    def _fold_hook(self, name):
        def fold(param):
            """Folds the fresh gradient of one parameter into its accumulator, then frees it."""
            grad = param.grad
            param.grad = None
            self.fold(name, grad)

        return fold

    @torch.no_grad()
    def fold(self, name, grad):
        """Adds one backward pass's gradient of parameter ``name`` to its accumulators.

        Arguments
        ---------
        name : str
            Parameter name.
        grad : torch.Tensor
            Its gradient (consumed: it may be modified in place).
        """
        if self.sharded:  # FSDP averaged the shard's gradient over ranks
            grad = local_tensor(grad).mul_(self.world_size)
        if self.estimator == "taylor":
            self.first[name].add_(grad)
        elif self.estimator == "taylor_batch":
            self.first[name].add_(grad.mul_(local_tensor(self.params[name])).abs_())
        elif self.estimator == "fisher":
            self.first[name].addcmul_(grad, grad)
        else:
            self.first[name].add_(grad)
            self.second[name].addcmul_(grad, grad)

    def step(self):
        """Marks the end of one backward pass (counts batches)."""
        self.num_backward += 1

    @torch.no_grad()
    def all_reduce(self):
        """Sums the accumulators over DDP ranks (no-op outside torch.distributed).

        Sharded (FSDP) accumulators already hold the sums: only the batch count is summed.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for buffers in (self.first, self.second) if not self.sharded else ():
            for buffer in buffers.values():
                torch.distributed.all_reduce(buffer)
        count = torch.tensor([self.num_backward], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            count = count.cuda()
        torch.distributed.all_reduce(count)
        self.num_backward = int(count.item())

    @torch.no_grad()
    def score(self, name):
        """fp32 importance of one parameter tensor (computed on the fly).

        Arguments
        ---------
        name : str
            Parameter name.

        Returns
        -------
        torch.Tensor
            Non-negative scores, shape of the parameter.
        """
        weight = local_tensor(self.params[name]).float()
        first = self.first[name].float()
        if self.estimator == "taylor":
            return (first * weight).abs_()
        if self.estimator in ("taylor_batch", "fisher"):
            return first
        second = self.second[name].float()
        return (first * weight - 0.5 * weight * second * weight).abs_()

    def scores(self):
        """All scores as a dict of fp32 tensors (small models; large ones use ``score``).

        Returns
        -------
        dict
        """
        self.check_finite()
        return {name: self.score(name) for name in self.params}

    @torch.no_grad()
    def check_finite(self):
        """Raises (on every rank) if any accumulator overflowed or saw a non-finite gradient."""
        bad = [
            name
            for buffers in (self.first, self.second)
            for name, buffer in buffers.items()
            if not torch.isfinite(buffer).all()
        ]
        if self.sharded:  # every rank raises, or none does
            flag = torch.tensor([len(bad)])
            torch.distributed.all_reduce(flag)
            bad = bad or (["(a shard on another rank)"] if flag.item() else [])
        if bad:
            dtype = next(iter(self.first.values())).dtype
            raise FloatingPointError(
                f"Importance accumulator of {bad[0]!r} holds inf/nan "
                f"(dtype {dtype}): a gradient was non-finite or the sum "
                "overflowed. Use accumulate_dtype float32 and check the data."
            )

    def detach(self):
        """Removes the hooks and restores the parameters' ``requires_grad``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, param in self.params.items():
            param.requires_grad_(self._was_trainable[name])
