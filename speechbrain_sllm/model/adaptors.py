"""Adaptors that map speech-encoder frames to LLM input embeddings, and their registry.

* :class:`FrameStackAdaptor`: LLaMA-Omni style, concatenate ``k`` consecutive
  frames then a two-layer MLP (``Linear -> ReLU -> Linear``).
* :class:`ConvDownsampler`: strided 1-D convolutions followed by a projection.
* the adaptors built on a Whisper checkpoint's decoder (query, transcript,
  bridge): ``speechbrain_sllm.model.whisper_adaptors``.

All take ``(B, T, D_enc)`` features with relative lengths and return
``(B, T', D_llm)`` embeddings with updated relative lengths. Each keeps the
arguments it was built with (``arguments``), so that an exported model
rebuilds it (:func:`build_adaptor`).

Authors
 * speechbrain-sllm developers 2026
"""

import torch
from torch import nn

from speechbrain_sllm.model.whisper_adaptors import (
    WhisperBridgeAdaptor,
    WhisperQueryAdaptor,
    WhisperTranscriptAdaptor,
)


class FrameStackAdaptor(nn.Module):
    """Stacks ``stack`` consecutive frames and projects them with a 2-layer MLP.

    Frames that do not fill a whole group at the end are padded with zeros,
    so every input frame contributes to exactly one output frame.

    Arguments
    ---------
    input_size : int
        Encoder feature size ``D_enc``.
    output_size : int
        LLM hidden size ``D_llm``.
    stack : int
        Number of frames concatenated into one output frame (``k``).
    hidden_size : int
        Width of the MLP hidden layer.

    Example
    -------
    >>> adaptor = FrameStackAdaptor(input_size=8, output_size=16, stack=3, hidden_size=32)
    >>> out, lens = adaptor(torch.randn(2, 10, 8), torch.tensor([1.0, 0.5]))
    >>> out.shape
    torch.Size([2, 4, 16])
    >>> lens
    tensor([1.0000, 0.5000])
    """

    def __init__(self, input_size, output_size, stack=5, hidden_size=2048):
        super().__init__()
        if stack < 1:
            raise ValueError(f"FrameStackAdaptor: stack must be >= 1, got {stack}.")
        self.stack = stack
        self.arguments = dict(
            input_size=input_size, output_size=output_size, stack=stack, hidden_size=hidden_size
        )
        self.mlp = nn.Sequential(
            nn.Linear(input_size * stack, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, output_size),
        )

    def forward(self, feats, lengths):
        """Stacks frames and projects them.

        Arguments
        ---------
        feats : torch.Tensor
            Encoder output ``(B, T, D_enc)``.
        lengths : torch.Tensor
            Relative lengths ``(B,)`` in ``[0, 1]``.

        Returns
        -------
        embeds : torch.Tensor
            ``(B, ceil(T/k), D_llm)``.
        lengths : torch.Tensor
            Relative lengths of the output, ``(B,)``.
        """
        batch, time, dim = feats.shape
        pad = (-time) % self.stack
        if pad:
            feats = nn.functional.pad(feats, (0, 0, 0, pad))  # (B, T+pad, D)
        stacked = feats.reshape(batch, -1, dim * self.stack)  # (B, T/k, D*k)
        return self.mlp(stacked), output_lengths(lengths, time, stacked.shape[1], self.stack)


class ConvDownsampler(nn.Module):
    """Strided 1-D convolutions (GELU between them) followed by a projection.

    Arguments
    ---------
    input_size : int
        Encoder feature size ``D_enc``.
    output_size : int
        LLM hidden size ``D_llm``.
    num_layers : int
        Number of stride-``stride`` convolutions; total downsampling is
        ``stride ** num_layers``.
    stride : int
        Stride (and kernel size is ``2 * stride - 1``) of each convolution.
    channels : int
        Channels of the convolution stack.

    Example
    -------
    >>> adaptor = ConvDownsampler(input_size=8, output_size=16, num_layers=2, stride=2, channels=12)
    >>> out, lens = adaptor(torch.randn(2, 10, 8), torch.tensor([1.0, 0.6]))
    >>> out.shape
    torch.Size([2, 3, 16])
    """

    def __init__(self, input_size, output_size, num_layers=2, stride=2, channels=1024):
        super().__init__()
        if num_layers < 1 or stride < 1:
            raise ValueError(
                "ConvDownsampler: num_layers and stride must be >= 1, "
                f"got num_layers={num_layers}, stride={stride}."
            )
        self.arguments = dict(
            input_size=input_size,
            output_size=output_size,
            num_layers=num_layers,
            stride=stride,
            channels=channels,
        )
        layers = []
        in_channels = input_size
        for _ in range(num_layers):
            layers += [
                nn.Conv1d(in_channels, channels, 2 * stride - 1, stride, padding=stride - 1),
                nn.GELU(),
            ]
            in_channels = channels
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(channels, output_size)
        self.factor = stride**num_layers

    def forward(self, feats, lengths):
        """Downsamples and projects.

        Arguments
        ---------
        feats : torch.Tensor
            Encoder output ``(B, T, D_enc)``.
        lengths : torch.Tensor
            Relative lengths ``(B,)``.

        Returns
        -------
        embeds : torch.Tensor
            ``(B, T', D_llm)`` with ``T' ~ T / stride**num_layers``.
        lengths : torch.Tensor
            Relative lengths of the output, ``(B,)``.
        """
        time = feats.shape[1]
        hidden = self.convs(feats.transpose(1, 2)).transpose(1, 2)  # (B, T', C)
        return self.proj(hidden), output_lengths(lengths, time, hidden.shape[1], self.factor)


ADAPTOR_CLASSES = {
    adaptor.__name__: adaptor
    for adaptor in (
        FrameStackAdaptor,
        ConvDownsampler,
        WhisperQueryAdaptor,
        WhisperTranscriptAdaptor,
        WhisperBridgeAdaptor,
    )
}
ADAPTOR_TYPES = tuple(ADAPTOR_CLASSES)


def build_adaptor(adaptor_type, arguments):
    """An adaptor of this module rebuilt by class name from its ``arguments``.

    Arguments
    ---------
    adaptor_type : str
        One of ``ADAPTOR_TYPES``.
    arguments : dict
        Its constructor's arguments (an adaptor's ``arguments`` attribute; a
        class's ``rebuild_arguments`` adds what they name, e.g. the Whisper
        bridge's table).

    Returns
    -------
    torch.nn.Module

    Example
    -------
    >>> adaptor = FrameStackAdaptor(input_size=8, output_size=16, stack=3, hidden_size=32)
    >>> rebuilt = build_adaptor("FrameStackAdaptor", adaptor.arguments)
    >>> rebuilt.stack, rebuilt.mlp[0].out_features
    (3, 32)
    """
    if adaptor_type not in ADAPTOR_TYPES:
        raise ValueError(
            f"adaptor_type {adaptor_type!r} unknown; use one of {list(ADAPTOR_TYPES)}."
        )
    adaptor_class = ADAPTOR_CLASSES[adaptor_type]
    if hasattr(adaptor_class, "rebuild_arguments"):  # e.g. a table built from a named source
        arguments = adaptor_class.rebuild_arguments(arguments)
    return adaptor_class(**arguments)


def adaptor_type_of(adaptor):
    """The class name an export records for ``adaptor`` (FSDP2's wrapper class looked through).

    Arguments
    ---------
    adaptor : torch.nn.Module
        An adaptor of this module, possibly sharded (FSDP2 subclasses it as
        ``FSDP<name>``).

    Returns
    -------
    str or None
        One of ``ADAPTOR_TYPES``, or None for another module.

    Example
    -------
    >>> adaptor_type_of(FrameStackAdaptor(input_size=8, output_size=16, stack=2))
    'FrameStackAdaptor'
    >>> adaptor_type_of(type("FSDPFrameStackAdaptor", (FrameStackAdaptor,), {})(8, 16))
    'FrameStackAdaptor'
    >>> adaptor_type_of(nn.Linear(2, 2)) is None
    True
    """
    return next(
        (cls.__name__ for cls in type(adaptor).__mro__ if cls.__name__ in ADAPTOR_TYPES), None
    )


def choose_adaptor(adaptor_type, choices):
    """The adaptor named by ``adaptor_type``, built from its entry in ``choices``.

    A recipe yaml lists each adaptor's arguments under its class name, so that
    ``--adaptor_type=...`` on the command line swaps the class (an override of
    an ``!include``d node merges into it and cannot).

    Arguments
    ---------
    adaptor_type : str
        One of ``ADAPTOR_TYPES``, a key of ``choices``.
    choices : dict
        ``{adaptor_type: arguments}``.

    Returns
    -------
    torch.nn.Module

    Example
    -------
    >>> choices = {"FrameStackAdaptor": {"input_size": 8, "output_size": 16, "stack": 2}}
    >>> choose_adaptor("FrameStackAdaptor", choices).stack
    2
    >>> try:
    ...     choose_adaptor("ConvDownsampler", choices)
    ... except KeyError as error:
    ...     print(error.args[0][:60])
    adaptor_type 'ConvDownsampler' has no entry in adaptor_choic
    """
    if adaptor_type not in choices:
        raise KeyError(
            f"adaptor_type {adaptor_type!r} has no entry in adaptor_choices; give its "
            f"arguments there or use one of {list(choices)}."
        )
    return build_adaptor(adaptor_type, choices[adaptor_type])


def output_lengths(lengths, in_time, out_time, factor):
    """Converts relative input lengths to relative output lengths.

    Arguments
    ---------
    lengths : torch.Tensor
        Relative input lengths ``(B,)``.
    in_time : int
        Padded input length ``T``.
    out_time : int
        Padded output length ``T'``.
    factor : int
        Downsampling factor.

    Returns
    -------
    torch.Tensor
        Relative output lengths ``(B,)``, each output frame counted if any of
        its input frames is valid.

    Example
    -------
    >>> output_lengths(torch.tensor([1.0, 0.5]), 10, 5, 2)
    tensor([1.0000, 0.6000])
    """
    valid_frames = torch.round(lengths * in_time)
    valid_out = torch.ceil(valid_frames / factor).clamp(min=1, max=out_time)
    return valid_out / out_time
