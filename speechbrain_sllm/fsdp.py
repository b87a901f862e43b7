"""FSDP2 sharding of a SpeechLLM under torchrun (``parallelism: fsdp`` in the yaml).

Each decoder layer of the LLM, the encoder and the adaptor become FSDP units
and the whole SpeechLLM the root unit (embeddings, final norm, output layer),
so a rank holds 1 / world of every parameter and gathers one unit at a time.
Parameters become ``DTensor`` shards; the strategy's parameter groups
(layer-wise rates, LoRA) are built after sharding, over those shards.

Authors
 * speechbrain-sllm developers 2026
"""

import contextlib
import re

import torch
from speechbrain.utils.checkpoints import mark_as_loader, register_checkpoint_hooks

LAYER_MODULE = re.compile(r"(^|\.)layers\.\d+$")
PARALLELISMS = ("ddp", "fsdp")


class FSDPSettings:
    """How the model is sharded (the yaml's ``fsdp`` entry).

    Arguments
    ---------
    param_dtype : str or None
        Dtype the gathered parameters compute in (e.g. ``bfloat16``); None
        keeps the parameters' dtype. Gradients are reduced in ``reduce_dtype``.
    reduce_dtype : str
        Dtype of the gradient reduce-scatter (``float32``).
    cpu_offload : bool
        Keep the sharded parameters, gradients and optimizer state in CPU memory.
    reshard_after_forward : bool
        Free gathered parameters after the forward (less memory, one more
        all-gather in the backward).

    Example
    -------
    >>> FSDPSettings(param_dtype="bfloat16").mixed_precision().param_dtype
    torch.bfloat16
    """

    def __init__(
        self,
        param_dtype=None,
        reduce_dtype="float32",
        cpu_offload=False,
        reshard_after_forward=True,
    ):
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def mixed_precision(self, unit="llm"):
        """The ``MixedPrecisionPolicy`` of a unit.

        Arguments
        ---------
        unit : str
            ``llm`` (a decoder layer: computes in ``param_dtype``), ``speech``
            (encoder, adaptor: keep their own dtype) or ``root`` (LLM
            embeddings and head in ``param_dtype``; its inputs, the audio,
            are not cast).

        Returns
        -------
        MixedPrecisionPolicy
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy

        compute = getattr(torch, self.param_dtype) if self.param_dtype else None
        return MixedPrecisionPolicy(
            param_dtype=None if unit == "speech" else compute,
            reduce_dtype=getattr(torch, self.reduce_dtype),
            cast_forward_inputs=unit == "llm",
        )

    def fully_shard_kwargs(self, unit="llm"):
        """Keyword arguments of ``fully_shard`` for a unit (see ``mixed_precision``)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        return {
            "mp_policy": self.mixed_precision(unit),
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
            "reshard_after_forward": self.reshard_after_forward,
        }


def decoder_layer_modules(llm):
    """The decoder layers of an HF causal LM (also inside a peft wrapper), in order.

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> from speechbrain_sllm.model.speech_llm import load_causal_lm
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> len(decoder_layer_modules(load_causal_lm(config=cfg)))
    2
    """
    return [module for name, module in llm.named_modules() if LAYER_MODULE.search(name)]


def sharding_units(model):
    """The modules FSDP2 wraps, inner first: each decoder layer, the encoder, the adaptor, the root.

    The encoder and the adaptor are units of their own, so a float32 speech
    side never shares a unit with a bfloat16 LLM.

    Arguments
    ---------
    model : SpeechLLM
        The model.

    Returns
    -------
    list of torch.nn.Module
    """
    layers = decoder_layer_modules(model.llm)
    if not layers:
        raise ValueError(
            f"FSDP: no decoder layer found in {type(model.llm).__name__} (modules named "
            "'layers.<i>'); use `parallelism: ddp` for this LLM."
        )
    speech = [
        part
        for part in (getattr(model, "encoder", None), getattr(model, "adaptor", None))
        if part is not None and any(True for _ in part.parameters())
    ]
    return [*layers, *speech, model]


def check_parallelism(parallelism):
    """``parallelism`` if it is one of ``PARALLELISMS``, else a ``ValueError`` naming the key.

    Arguments
    ---------
    parallelism : str
        ``ddp`` or ``fsdp``.

    Returns
    -------
    str

    Example
    -------
    >>> check_parallelism("fsdp")
    'fsdp'
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(
            f"parallelism {parallelism!r} unknown; use one of {PARALLELISMS} "
            "(yaml key or --parallelism=...)."
        )
    return parallelism


def check_unit_dtypes(units):
    """Refuses a unit whose floating-point parameters mix dtypes.

    FSDP2 reduce-scatters a unit's gradients in one dtype and fixes it at the
    first forward, so a unit holding bfloat16 LLM weights and float32 LoRA
    adapters (peft's default) breaks as soon as the trainable set changes
    (importance scores the frozen weights, training updates the adapters).

    Arguments
    ---------
    units : list of torch.nn.Module
        From ``sharding_units`` (inner first; a parameter belongs to the first
        unit that holds it).

    Example
    -------
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> check_unit_dtypes([net[0].bfloat16(), net])
    >>> check_unit_dtypes([net])
    Traceback (most recent call last):
    ...
    ValueError: FSDP: one sharding unit (Sequential) mixes parameter dtypes (0.weight: torch.bfloat16, 1.weight: torch.float32). ...
    """
    claimed = set()
    for unit in units:
        first_of_dtype = {}
        for name, param in unit.named_parameters():
            if id(param) in claimed or not param.is_floating_point():
                continue
            claimed.add(id(param))
            first_of_dtype.setdefault(param.dtype, name)
        if len(first_of_dtype) > 1:
            found = ", ".join(f"{name}: {dtype}" for dtype, name in first_of_dtype.items())
            raise ValueError(
                f"FSDP: one sharding unit ({type(unit).__name__}) mixes parameter dtypes "
                f"({found}). FSDP2 reduces a unit's gradients in one dtype: keep the "
                'weights in float32 and compute in bfloat16 through FSDP: --llm="{dtype: '
                'float32}" --fsdp="{param_dtype: bfloat16}" (peft keeps LoRA adapters in float32).'
            )


def shard_speech_llm(model, settings=None):
    """Applies FSDP2 to ``model`` in place: each decoder layer, encoder, adaptor, then the root.

    Call it after ``apply_strategy`` (LoRA adapters are then sharded with their
    layer, frozen base weights included) and before building the optimizer.

    Arguments
    ---------
    model : SpeechLLM
        The model, on its device.
    settings : FSDPSettings or None
        Sharding settings (defaults: parameters' dtype, fp32 reduction).

    Returns
    -------
    SpeechLLM
        The same module, now an FSDP module.
    """
    from torch.distributed.fsdp import fully_shard

    settings = settings or FSDPSettings()
    units = sharding_units(model)
    check_unit_dtypes(units)
    speech = (getattr(model, "encoder", None), getattr(model, "adaptor", None))
    for unit in units:
        kind = "root" if unit is model else "speech" if unit in speech else "llm"
        fully_shard(unit, **settings.fully_shard_kwargs(kind))
    return model


def is_sharded(module):
    """Whether any parameter of ``module`` is a DTensor shard.

    Example
    -------
    >>> is_sharded(torch.nn.Linear(2, 2))
    False
    """
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in module.parameters())


def local_tensor(tensor):
    """This rank's part of a DTensor, or the tensor itself.

    Example
    -------
    >>> local_tensor(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor):
    """The whole tensor of a DTensor (a collective: every rank calls it), or the tensor.

    Example
    -------
    >>> full_tensor(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor, reference):
    """This rank's part of a whole ``tensor``, sharded as the DTensor ``reference``.

    Every rank passes the same whole tensor; an ordinary ``reference`` gives
    ``tensor`` back.

    Example
    -------
    >>> shard_like(torch.arange(3), torch.zeros(3)).tolist()
    [0, 1, 2]
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return tensor
    return distribute_tensor(tensor, reference.device_mesh, reference.placements).to_local()


@contextlib.contextmanager
def root_gathered(model):
    """Gathers an FSDP root's own parameters for calls that bypass its ``forward``.

    Decoding calls the SpeechLLM's parts (embeddings, encoder, adaptor, the
    LLM's ``generate``) directly, so the root's pre-forward gathering never
    runs; the decoder layers still gather in their own forwards.

    Arguments
    ---------
    model : torch.nn.Module
        The model (anything but an FSDP module passes through).

    Yields
    ------
    torch.nn.Module
        ``model``.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


@register_checkpoint_hooks
class ShardedState:
    """Checkpoints an FSDP model's trainable shards and its optimizer with DCP.

    Saving is a collective (every rank writes its own shards into one folder
    with ``torch.distributed.checkpoint``; no rank gathers the model), so the
    ``AtomicCheckpointer`` calls ``collective_save`` on every rank before its
    main-process part. Frozen parameters (the base weights under LoRA, a
    frozen LLM) are not written. Loading reshards, so a checkpoint written by
    N ranks loads on M.

    Arguments
    ---------
    model : torch.nn.Module
        The FSDP-sharded model.
    optimizer : torch.optim.Optimizer
        Its optimizer (state over DTensor shards).
    """

    collective = True

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True)

    def state_dict(self):
        """The model's and the optimizer's DTensor shards (DCP's state-dict API)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": model, "optimizer": optimizer}

    def collective_save(self, path):
        """Writes this rank's shards into the folder ``path`` (every rank calls it).

        Arguments
        ---------
        path : str or pathlib.Path
            The checkpoint entry (a folder).
        """
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state_dict(), checkpoint_id=str(path))

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Reads the shards of this rank from ``path`` (every rank calls it).

        Arguments
        ---------
        path : str or pathlib.Path
            Folder written by ``collective_save``.
        end_of_epoch : bool
            Unused (SpeechBrain hook signature).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        del end_of_epoch
        state = self.state_dict()
        dcp.load(state, checkpoint_id=str(path))  # raises if a trainable tensor is missing
        # not strict: the frozen parameters (never saved) are the only keys absent
        options = self._options()
        options.strict = False
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
