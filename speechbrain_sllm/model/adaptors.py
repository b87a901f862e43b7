"""Adaptors that map speech-encoder frames to LLM input embeddings.

Two families are provided:

* :class:`FrameStackAdaptor`: LLaMA-Omni style, concatenate ``k`` consecutive
  frames then a two-layer MLP (``Linear -> ReLU -> Linear``).
* :class:`ConvDownsampler`: strided 1-D convolutions followed by a projection.
* :class:`WhisperQueryAdaptor`: DiVA style, a querying transformer initialised
  from Whisper's decoder: learned queries cross-attend to the encoder frames.

All take ``(B, T, D_enc)`` features with relative lengths and return
``(B, T', D_llm)`` embeddings with updated relative lengths.

Authors
 * speechbrain-sllm developers 2026
"""

import itertools

import torch
from torch import nn


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


class WhisperQueryAdaptor(nn.Module):
    """Learned queries read the encoder frames through Whisper's decoder (DiVA's Q-Former).

    The decoder of the same Whisper checkpoint as the encoder, which already
    turns those frames into text, is the querying transformer: ``num_queries``
    learned vectors pass through its layers (self-attention among the queries,
    cross-attention to every encoder frame, Whisper's own position embeddings),
    then a linear projection into the LLM's embedding space. The queries start
    as the decoder's embedding of its start-of-transcript token (each position
    then differs by its position embedding). The decoder's token embedding table
    is not kept (the queries replace it), so the adaptor holds the decoder's
    layers, its position embeddings, the queries and the projection.

    The output has ``num_queries`` embeddings for every clip, whatever its
    length (relative lengths all 1). Cross-attention reads each clip's valid
    frames only (Whisper's decoder takes no encoder mask, so clips of unequal
    length run one by one): a clip's output does not depend on its batch.

    Arguments
    ---------
    output_size : int
        LLM hidden size ``D_llm``.
    source : str or None
        Local folder or hub id of the Whisper checkpoint (the encoder's).
    config : transformers.WhisperConfig or None
        A randomly initialised decoder of this shape instead of ``source``.
    num_queries : int
        Output embeddings per clip (at most the decoder's
        ``max_target_positions``; enough for the longest question's tokens when
        stage 1a's CTC reads them).
    cache_dir : str or None
        HF cache folder.

    Example
    -------
    >>> from transformers import WhisperConfig
    >>> cfg = WhisperConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2,
    ...     encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2,
    ...     decoder_ffn_dim=32, max_target_positions=20)
    >>> adaptor = WhisperQueryAdaptor(output_size=24, config=cfg, num_queries=6)
    >>> out, lens = adaptor(torch.randn(2, 10, 16), torch.tensor([1.0, 0.5]))
    >>> out.shape, lens
    (torch.Size([2, 6, 24]), tensor([1., 1.]))
    """

    def __init__(self, output_size, source=None, config=None, num_queries=64, cache_dir=None):
        super().__init__()
        from transformers import WhisperModel

        if (source is None) == (config is None):
            raise ValueError("WhisperQueryAdaptor: give exactly one of `source` or `config`.")
        if source is not None:
            model = WhisperModel.from_pretrained(source, cache_dir=cache_dir)
        else:
            model = WhisperModel(config)
        config = model.config
        if not 1 <= num_queries <= config.max_target_positions:
            raise ValueError(
                f"WhisperQueryAdaptor: num_queries must be in [1, {config.max_target_positions}] "
                f"(the decoder's max_target_positions), got {num_queries}."
            )
        self.decoder = model.decoder
        start = self.decoder.embed_tokens.weight[config.decoder_start_token_id].detach()
        self.queries = nn.Parameter(start.repeat(num_queries, 1).clone())
        self.decoder.embed_tokens = None  # the queries are the decoder's inputs
        self.proj = nn.Linear(config.d_model, output_size)

    def forward(self, feats, lengths):
        """Runs the queries through the decoder over the frames, then projects them.

        Arguments
        ---------
        feats : torch.Tensor
            Encoder output ``(B, T, D_enc)`` (``D_enc`` = the decoder's ``d_model``).
        lengths : torch.Tensor
            Relative lengths ``(B,)``: frames past an item's length are not read.

        Returns
        -------
        embeds : torch.Tensor
            ``(B, num_queries, D_llm)``.
        lengths : torch.Tensor
            Ones ``(B,)``.
        """
        valid = torch.round(lengths * feats.shape[1]).clamp(min=1).long().tolist()
        queries = self.queries.unsqueeze(0).to(feats.dtype)
        hidden, start = [], 0
        for length, group in itertools.groupby(valid):  # neighbours of one length together
            count = len(list(group))
            frames = feats[start : start + count, :length]
            outputs = self.decoder(
                inputs_embeds=queries.expand(count, -1, -1),
                encoder_hidden_states=frames,
                use_cache=False,
            )
            hidden.append(outputs.last_hidden_state)
            start += count
        return self.proj(torch.cat(hidden)), torch.ones_like(lengths)


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
