"""Adaptors that map speech-encoder frames to LLM input embeddings.

Two families are provided:

* :class:`FrameStackAdaptor`: LLaMA-Omni style, concatenate ``k`` consecutive
  frames then a two-layer MLP (``Linear -> ReLU -> Linear``).
* :class:`ConvDownsampler`: strided 1-D convolutions followed by a projection.
* :class:`WhisperQueryAdaptor`: DiVA style, a querying transformer initialised
  from Whisper's decoder: learned queries cross-attend to the encoder frames.
* :class:`WhisperTranscriptAdaptor`: the checkpoint's own (frozen) decoder
  transcribes the frames greedily; its states at the transcript's tokens are
  projected into the LLM's embedding space (a soft cascade, trained end to end
  from the projection on).

All take ``(B, T, D_enc)`` features with relative lengths and return
``(B, T', D_llm)`` embeddings with updated relative lengths. Each keeps the
arguments it was built with (``arguments``), so that an exported model
rebuilds it (:func:`build_adaptor`).

Authors
 * speechbrain-sllm developers 2026
"""

import collections
import hashlib
import inspect
import itertools

import torch
from torch import nn

from speechbrain_sllm.model.padding import absolute_lengths


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
        self.arguments = dict(output_size=output_size, source=source, num_queries=num_queries)
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
        valid = absolute_lengths(lengths, feats.shape[1]).tolist()
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


class WhisperTranscriptAdaptor(nn.Module):
    """Whisper's own decoder transcribes the frames; its token states, projected, feed the LLM.

    The decoder of the same Whisper checkpoint as the encoder is kept frozen and
    decodes each clip greedily (its prompt: start of transcript, then for a
    multilingual checkpoint English and transcribe, then no timestamps; its
    ``suppress_tokens`` masked), up to its end-of-text token, the point where
    it starts the transcript over, or ``max_tokens``.
    The decoder's final states at the positions that predict the transcript's
    tokens (each one the state whose output head gives that token) are the
    adaptor's input: they carry the words the decoder heard, largely
    independent of the voice. A trainable two-layer MLP maps each state to
    ``upsample`` LLM input embeddings (upsampling leaves stage 1a's CTC room
    when the LLM's tokenizer needs more tokens than Whisper's). No gradient
    reaches the decoder; the projection is the only trained part. As the
    decoder is frozen, a clip's states depend on its frames only: they are
    kept in memory (up to ``memo_clips`` clips, least recently used dropped),
    so that an epoch after the first decodes nothing it has seen.

    The output length is ``upsample`` times the clip's transcript length (the
    padded batch: the longest); relative lengths mark each clip's own.

    Arguments
    ---------
    output_size : int
        LLM hidden size ``D_llm``.
    source : str or None
        Local folder or hub id of the Whisper checkpoint (the encoder's).
    config : transformers.WhisperConfig or None
        A randomly initialised decoder of this shape instead of ``source``.
    max_tokens : int
        Greedy decoding budget per clip (Whisper tokens).
    restart_ngram : int
        A transcript whose last ``restart_ngram`` tokens repeat its first ones
        ends there (the decoder starts over on frames trimmed to the clip).
    memo_clips : int
        Clips whose decoder states are kept (0: none).
    upsample : int
        LLM embeddings per decoder state.
    hidden_size : int
        Width of the projection MLP.
    cache_dir : str or None
        HF cache folder.

    Example
    -------
    >>> from transformers import WhisperConfig
    >>> cfg = WhisperConfig(vocab_size=60, d_model=16, encoder_layers=1,
    ...     encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
    ...     decoder_attention_heads=2, decoder_ffn_dim=32, max_target_positions=20,
    ...     decoder_start_token_id=1, eos_token_id=2, pad_token_id=2)
    >>> adaptor = WhisperTranscriptAdaptor(output_size=24, config=cfg, max_tokens=5)
    >>> out, lens = adaptor(torch.randn(2, 10, 16), torch.tensor([1.0, 0.5]))
    >>> out.shape[0], out.shape[2], out.shape[1] <= 10
    (2, 24, True)
    """

    def __init__(
        self,
        output_size,
        source=None,
        config=None,
        max_tokens=64,
        restart_ngram=3,
        memo_clips=20000,
        upsample=2,
        hidden_size=1024,
        cache_dir=None,
    ):
        super().__init__()
        from transformers import WhisperModel

        if (source is None) == (config is None):
            raise ValueError("WhisperTranscriptAdaptor: give exactly one of `source` or `config`.")
        model = (
            WhisperModel.from_pretrained(source, cache_dir=cache_dir)
            if source is not None
            else WhisperModel(config)
        )
        self.arguments = dict(
            output_size=output_size,
            source=source,
            max_tokens=max_tokens,
            restart_ngram=restart_ngram,
            upsample=upsample,
            hidden_size=hidden_size,
        )
        self.decoder = model.decoder.eval().requires_grad_(False)
        # the decoder's key-value cache argument: ``cache`` from transformers 5, before it
        # ``past_key_values``
        parameters = inspect.signature(self.decoder.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.prompt, self.suppress, self.token_keys = _transcription_prompt(
            model.config, source, cache_dir
        )
        self.eos = model.config.eos_token_id
        self.max_tokens = min(max_tokens, model.config.max_target_positions - len(self.prompt))
        self.restart_ngram = restart_ngram
        self.memo_clips = memo_clips
        self.memo = collections.OrderedDict()
        self.upsample = upsample
        self.output_size = output_size
        self.proj = nn.Sequential(
            nn.Linear(model.config.d_model, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, upsample * output_size),
        )

    LOOP_PERIOD = 4  # longest run of tokens whose third repeat ends a transcript

    def train(self, mode=True):
        """Sets the projection's mode; the frozen decoder stays in eval mode."""
        super().train(mode)
        self.decoder.eval()
        return self

    def requires_grad_(self, requires_grad=True):
        """Sets the projection's ``requires_grad``; the decoder stays frozen.

        Training strategies set a whole adaptor trainable; the decoder only
        transcribes (no gradient reaches it), so it never joins an optimiser
        or a checkpoint of trained tensors.
        """
        self.proj.requires_grad_(requires_grad)
        return self

    @torch.no_grad()
    def transcribe(self, frames):
        """Greedy transcription of clips of one length, with the decoder's token states.

        Arguments
        ---------
        frames : torch.Tensor
            Encoder output ``(N, T, D)`` of ``N`` clips, every frame valid.

        Returns
        -------
        tokens : list of list of int
            Each clip's transcript tokens (without the prompt and end of text).
        states : list of torch.Tensor
            Each clip's decoder states, the one predicting each token (an empty
            transcript keeps the one that predicted its end: one state).
        """
        count = frames.shape[0]
        ids = torch.tensor(self.prompt, device=frames.device).repeat(count, 1)
        states, ends, cache = [], [None] * count, None
        for _ in range(self.max_tokens):
            step = self.decoder(
                input_ids=ids if cache is None else ids[:, -1:],
                encoder_hidden_states=frames,
                use_cache=True,
                **{self.cache_argument: cache},
            )
            hidden, cache = step.last_hidden_state[:, -1], step.past_key_values
            logits = hidden @ self.decoder.embed_tokens.weight.T
            logits[:, self.suppress] = float("-inf")
            states.append(hidden)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            generated = ids[:, len(self.prompt) :].tolist()
            ends = [
                end if end is not None else self.transcript_end(row)
                for end, row in zip(ends, generated)
            ]
            if all(end is not None for end in ends):
                break
        lengths = [len(row) if end is None else end for end, row in zip(ends, generated)]
        stacked = torch.stack(states, dim=1)
        return (
            [row[:length] for row, length in zip(generated, lengths)],
            [clip[: max(length, 1)] for clip, length in zip(stacked, lengths)],
        )

    def transcript_end(self, tokens):
        """Where a transcript ends: its end-of-text token, or where it starts over or loops.

        Whisper's decoder reading frames trimmed to the clip (not its 30 s
        window) repeats the transcript from its beginning instead of ending it,
        or, on speech it hears badly, loops on a few tokens. A transcript whose
        last ``restart_ngram`` tokens equal its first ones (compared without
        case or leading space) ends before them; one whose last tokens are the
        third repeat of a run of at most ``LOOP_PERIOD`` tokens keeps the first.

        Arguments
        ---------
        tokens : list of int
            Tokens generated so far.

        Returns
        -------
        int or None
            The transcript's length, or None while it goes on.
        """
        if tokens and tokens[-1] == self.eos:
            return len(tokens) - 1
        keys = [self.token_keys.get(token, token) for token in tokens]
        size = self.restart_ngram
        if len(keys) >= 2 * size and keys[:size] == keys[-size:]:
            return len(keys) - size
        for period in range(1, self.LOOP_PERIOD + 1):
            run = keys[-period:]
            if len(keys) >= 3 * period and keys[-3 * period : -period] == run + run:
                return len(keys) - 2 * period
        return None

    def remember(self, key, clip_states):
        """Keeps one clip's decoder states under its frames' key."""
        self.memo[key] = clip_states.detach()

    def forward(self, feats, lengths):
        """Transcribes each clip's valid frames, then projects the token states.

        Arguments
        ---------
        feats : torch.Tensor
            Encoder output ``(B, T, D_enc)`` (``D_enc`` = the decoder's ``d_model``).
        lengths : torch.Tensor
            Relative lengths ``(B,)``: frames past an item's length are not read.

        Returns
        -------
        embeds : torch.Tensor
            ``(B, upsample * longest transcript, D_llm)`` (at least one state
            per clip: an empty transcript keeps the state that predicted its end).
        lengths : torch.Tensor
            Relative output lengths ``(B,)``.
        """
        valid = absolute_lengths(lengths, feats.shape[1]).tolist()
        clips = [clip[:length] for clip, length in zip(feats, valid)]
        keys = [frames_key(clip) for clip in clips]
        unseen = [index for index, key in enumerate(keys) if key not in self.memo]
        unseen.sort(key=lambda index: valid[index])  # clips of one length decode together
        for _, group in itertools.groupby(unseen, key=lambda index: valid[index]):
            group = list(group)
            decoded = self.transcribe(torch.stack([clips[index] for index in group]))[1]
            for index, clip_states in zip(group, decoded):
                self.remember(keys[index], clip_states)
        states = [self.memo[key].to(feats.device) for key in keys]
        for key in keys:
            self.memo.move_to_end(key)
        if len(self.memo) > self.memo_clips:
            for key in list(self.memo)[: len(self.memo) - self.memo_clips]:
                del self.memo[key]
        sizes = torch.tensor([len(clip) for clip in states], device=feats.device)
        padded = nn.utils.rnn.pad_sequence(states, batch_first=True)
        return self.project(padded), sizes / sizes.max()

    def project(self, states):
        """``(B, N, D)`` decoder states to ``(B, upsample * N, D_llm)`` LLM embeddings."""
        embeds = self.proj(states.to(self.proj[0].weight.dtype))
        return embeds.reshape(states.shape[0], -1, self.output_size)


class WhisperBridgeAdaptor(WhisperTranscriptAdaptor):
    """The transcript adaptor read through a vocabulary bridge into the LLM's embeddings.

    A decoder state gives Whisper's distribution over its text tokens (its
    output head, at ``temperature``); a table maps each Whisper token to the
    LLM's input embedding of the same text (the mean of the embeddings of the
    LLM's tokens for that string), so the expected row is an LLM embedding of
    what Whisper heard, for every word of the vocabulary from the first step
    (LegoSLM's posterior-weighted embeddings, with Whisper's decoder as the
    recogniser). A residual MLP on the state (its output layer starting at
    zero) adds what the table cannot say, and the table trains too unless
    ``train_table`` is False (measured in the WebQuestions recipe: 100 AdamW
    steps at 1e-3 on eSpeak clips moved every row and the LLM answered the
    real recordings at 0.7% instead of 28.7%). One LLM embedding per Whisper
    token.

    Arguments
    ---------
    output_size : int
        LLM hidden size ``D_llm``.
    source : str
        Local folder or hub id of the Whisper checkpoint (the encoder's).
    llm_source : str
        Local folder or hub id of the LLM (its tokenizer and input embeddings).
    temperature : float
        Divides Whisper's logits before the softmax.
    max_tokens : int
        Greedy decoding budget per clip (Whisper tokens).
    restart_ngram : int
        As in :class:`WhisperTranscriptAdaptor`.
    memo_clips : int
        As in :class:`WhisperTranscriptAdaptor`.
    hidden_size : int
        Width of the residual MLP.
    train_table : bool
        Whether the bridge table is trained (False: only the residual MLP).
    cache_dir : str or None
        HF cache folder.

    Example
    -------
    >>> adaptor = WhisperBridgeAdaptor(  # doctest: +SKIP
    ...     576, "openai/whisper-tiny.en", "HuggingFaceTB/SmolLM2-135M-Instruct", train_table=False
    ... )
    """

    def __init__(
        self,
        output_size,
        source,
        llm_source,
        temperature=1.0,
        max_tokens=64,
        restart_ngram=3,
        memo_clips=20000,
        hidden_size=1024,
        train_table=True,
        cache_dir=None,
    ):
        super().__init__(
            output_size,
            source=source,
            max_tokens=max_tokens,
            restart_ngram=restart_ngram,
            memo_clips=memo_clips,
            upsample=1,
            hidden_size=hidden_size,
            cache_dir=cache_dir,
        )
        self.arguments = dict(
            output_size=output_size,
            source=source,
            llm_source=llm_source,
            temperature=temperature,
            max_tokens=max_tokens,
            restart_ngram=restart_ngram,
            hidden_size=hidden_size,
            train_table=train_table,
        )
        self.temperature = temperature
        self.train_table = train_table
        self.text_tokens = min(self.eos, self.decoder.embed_tokens.num_embeddings)
        table = bridge_table(source, llm_source, self.text_tokens, cache_dir)
        if table.shape[1] != output_size:
            raise ValueError(
                f"WhisperBridgeAdaptor: the LLM {llm_source!r} has {table.shape[1]}-wide "
                f"embeddings, output_size is {output_size}; set output_size to the LLM's width."
            )
        self.bridge = nn.Parameter(table)
        nn.init.zeros_(self.proj[2].weight)
        nn.init.zeros_(self.proj[2].bias)

    def requires_grad_(self, requires_grad=True):
        """Sets the residual MLP's (and a trained table's) ``requires_grad``; the decoder stays frozen."""
        self.bridge.requires_grad_(requires_grad and self.train_table)
        return super().requires_grad_(requires_grad)

    def project(self, states):
        """``(B, N, D)`` decoder states to ``(B, N, D_llm)``: bridge rows plus the residual."""
        states = states.to(self.bridge.dtype)
        head = self.decoder.embed_tokens.weight[: self.text_tokens].to(self.bridge.dtype)
        posterior = torch.softmax(states @ head.T / self.temperature, dim=-1)
        return posterior @ self.bridge + self.proj(states)


def bridge_table(source, llm_source, text_tokens, cache_dir=None):
    """Each Whisper text token's string as the mean of the LLM's input embeddings of it.

    Arguments
    ---------
    source : str
        The Whisper checkpoint (its tokenizer).
    llm_source : str
        The LLM (its tokenizer and input embeddings).
    text_tokens : int
        Whisper's text vocabulary (the ids below its first special token).
    cache_dir : str or None
        HF cache folder.

    Returns
    -------
    torch.Tensor
        ``(text_tokens, D_llm)``; a token whose string the LLM tokenizes to
        nothing gets zeros.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    whisper_tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
    llm_tokenizer = AutoTokenizer.from_pretrained(llm_source, cache_dir=cache_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_source, cache_dir=cache_dir)
    embeddings = llm.get_input_embeddings().weight.detach().float()
    strings = [whisper_tokenizer.decode([token]) for token in range(text_tokens)]
    encoded = llm_tokenizer(strings, add_special_tokens=False)["input_ids"]
    table = torch.zeros(text_tokens, embeddings.shape[1])
    for token, ids in enumerate(encoded):
        if ids:
            table[token] = embeddings[ids].mean(0)
    return table


ADAPTOR_TYPES = (
    "FrameStackAdaptor",
    "ConvDownsampler",
    "WhisperQueryAdaptor",
    "WhisperTranscriptAdaptor",
    "WhisperBridgeAdaptor",
)


def build_adaptor(adaptor_type, arguments):
    """An adaptor of this module rebuilt by class name from its ``arguments``.

    Arguments
    ---------
    adaptor_type : str
        One of ``ADAPTOR_TYPES``.
    arguments : dict
        Its constructor's arguments (an adaptor's ``arguments`` attribute).

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
    return globals()[adaptor_type](**arguments)


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


def frames_key(frames):
    """A digest of a clip's encoder frames (their shape, dtype and values).

    Arguments
    ---------
    frames : torch.Tensor
        ``(T, D)`` frames.

    Returns
    -------
    str

    Example
    -------
    >>> frames_key(torch.zeros(2, 3)) == frames_key(torch.zeros(2, 3))
    True
    >>> frames_key(torch.zeros(2, 3)) == frames_key(torch.zeros(3, 2))
    False
    """
    values = frames.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(values.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(f"{tuple(values.shape)}{values.dtype}".encode())
    return digest.hexdigest()


def _transcription_prompt(config, source, cache_dir):
    """Whisper's English transcription prompt, its suppressed tokens, and token keys.

    The special tokens are read from the checkpoint's tokenizer (a multilingual
    checkpoint, 51,865 tokens or more as in Whisper's own convention, also gets
    the language and task tokens); the suppressed tokens from its generation
    config. The keys map a token id to its text in lower case without its
    leading space (a randomly initialised decoder: no keys, ids compare as is).
    """
    from transformers import AutoTokenizer, GenerationConfig

    prompt, suppress = [config.decoder_start_token_id], list(config.suppress_tokens or [])
    if source is None:
        return prompt, suppress, {}
    tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
    vocabulary = tokenizer.get_vocab()
    if config.vocab_size >= 51865:  # multilingual (the English-only models have 51,864)
        prompt += [vocabulary["<|en|>"], vocabulary["<|transcribe|>"]]
    prompt.append(vocabulary["<|notimestamps|>"])
    generation = GenerationConfig.from_pretrained(source, cache_dir=cache_dir)
    keys = {index: token.lstrip("\u0120").lower() for token, index in vocabulary.items()}
    return prompt, list(generation.suppress_tokens or suppress), keys


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
