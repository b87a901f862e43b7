"""Adaptors built on a Whisper checkpoint's decoder (a querying transformer, a
soft cascade through its transcripts, and the vocabulary bridge into the LLM).

* :class:`WhisperQueryAdaptor`: DiVA style, a querying transformer initialised
  from Whisper's decoder: learned queries cross-attend to the encoder frames.
* :class:`WhisperTranscriptAdaptor`: the checkpoint's own (frozen) decoder
  transcribes the frames greedily (``speechbrain_sllm.model.whisper_decoding``);
  its states at the transcript's tokens are projected into the LLM's embedding
  space (a soft cascade, trained end to end from the projection on).
* :class:`WhisperBridgeAdaptor`: the transcript adaptor read through a table
  from Whisper's vocabulary to the LLM's input embeddings (``bridge_table``).

Registered in ``speechbrain_sllm.model.adaptors`` (``ADAPTOR_TYPES``).

Authors
 * speechbrain-sllm developers 2026
"""

import functools
import itertools

import torch
from torch import nn

from speechbrain_sllm.model.padding import absolute_lengths
from speechbrain_sllm.model.pretrained import llm_input_embeddings, pretrained_whisper
from speechbrain_sllm.model.tensor_cache import TensorMemo, tensor_key
from speechbrain_sllm.model.whisper_decoding import WhisperGreedyDecoder


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
            model = pretrained_whisper(source, cache_dir)  # read once in a sharing scope
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
            pretrained_whisper(source, cache_dir)  # read once in a sharing scope
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
        self.decoding = WhisperGreedyDecoder(model, source, max_tokens, restart_ngram, cache_dir)
        self.memo = TensorMemo(memo_clips)
        self.upsample = upsample
        self.output_size = output_size
        self.proj = nn.Sequential(
            nn.Linear(model.config.d_model, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, upsample * output_size),
        )

    @property
    def decoder(self):
        """Whisper's frozen decoder (held by ``decoding``, which stays in eval mode)."""
        return self.decoding.decoder

    def requires_grad_(self, requires_grad=True):
        """Sets the projection's ``requires_grad``; the decoder stays frozen.

        Training strategies set a whole adaptor trainable; the decoder only
        transcribes (no gradient reaches it), so it never joins an optimiser
        or a checkpoint of trained tensors.
        """
        self.proj.requires_grad_(requires_grad)
        return self

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
        keys = [tensor_key(clip) for clip in clips]
        found = {index: self.memo.get(key) for index, key in enumerate(keys)}
        unseen = sorted((i for i in found if found[i] is None), key=lambda i: valid[i])
        for _, group in itertools.groupby(unseen, key=lambda index: valid[index]):
            group = list(group)  # clips of one length decode together
            decoded = self.decoding.transcribe(torch.stack([clips[index] for index in group]))[1]
            for index, clip_states in zip(group, decoded):
                found[index] = clip_states.detach()
                self.memo.put(keys[index], found[index])
        states = [found[index].to(feats.device) for index in range(len(keys))]
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
    ``train_table`` is False (trained on synthetic clips, the table drifts from
    the LLM's embeddings: docs/results/webquestions.md). One LLM embedding per
    Whisper token.

    Arguments
    ---------
    output_size : int
        LLM hidden size ``D_llm``.
    source : str
        Local folder or hub id of the Whisper checkpoint (the encoder's).
    table : torch.Tensor or callable
        The bridge table ``(text tokens, D_llm)`` (``bridge_table``), or a
        function that returns it (a yaml's ``!name:`` partial: only the chosen
        adaptor builds its table).
    llm_source : str or None
        The LLM the table comes from, recorded so that an export rebuilds the
        table (``build_adaptor``).
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
    >>> whisper, llm = "openai/whisper-tiny.en", "HuggingFaceTB/SmolLM2-135M-Instruct"
    >>> table = bridge_table(whisper, llm)  # doctest: +SKIP
    >>> adaptor = WhisperBridgeAdaptor(576, whisper, table, llm, train_table=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        output_size,
        source,
        table,
        llm_source=None,
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
        self.text_tokens = min(self.decoding.eos, self.decoder.embed_tokens.num_embeddings)
        table = table() if callable(table) else table
        if table.shape[1] != output_size:
            raise ValueError(
                f"WhisperBridgeAdaptor: the LLM {llm_source!r} has {table.shape[1]}-wide "
                f"embeddings, output_size is {output_size}; set output_size to the LLM's width."
            )
        if table.shape[0] != self.text_tokens:
            raise ValueError(
                f"WhisperBridgeAdaptor: the table has {table.shape[0]} rows, {source!r} has "
                f"{self.text_tokens} text tokens; build it with bridge_table(source, llm_source)."
            )
        self.bridge = nn.Parameter(table)
        nn.init.zeros_(self.proj[2].weight)
        nn.init.zeros_(self.proj[2].bias)

    @staticmethod
    def rebuild_arguments(arguments):
        """An export's recorded ``arguments`` with the table they name (``bridge_table``)."""
        return dict(
            arguments,
            table=functools.partial(bridge_table, arguments["source"], arguments["llm_source"]),
        )

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


def bridge_table(source, llm_source, text_tokens=None, cache_dir=None):
    """Each Whisper text token's string as the mean of the LLM's input embeddings of it.

    A study yaml calls it for ``WhisperBridgeAdaptor``'s ``table``; it reads the
    LLM's input embeddings alone (``pretrained.llm_input_embeddings``).

    Arguments
    ---------
    source : str
        The Whisper checkpoint (its tokenizer).
    llm_source : str
        The LLM (its tokenizer and input embeddings).
    text_tokens : int or None
        Whisper's text vocabulary (the ids below its first special token; None:
        up to the end-of-text token of Whisper's config).
    cache_dir : str or None
        HF cache folder.

    Returns
    -------
    torch.Tensor
        ``(text_tokens, D_llm)``; a token whose string the LLM tokenizes to
        nothing gets zeros.
    """
    from transformers import AutoConfig, AutoTokenizer

    whisper_tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
    llm_tokenizer = AutoTokenizer.from_pretrained(llm_source, cache_dir=cache_dir)
    if text_tokens is None:  # as the adaptor counts them: up to the decoder's end token
        config = AutoConfig.from_pretrained(source, cache_dir=cache_dir)
        text_tokens = min(config.eos_token_id, config.vocab_size)
    embeddings = llm_input_embeddings(llm_source, cache_dir)
    strings = [whisper_tokenizer.decode([token]) for token in range(text_tokens)]
    encoded = llm_tokenizer(strings, add_special_tokens=False)["input_ids"]
    table = torch.zeros(text_tokens, embeddings.shape[1])
    for token, ids in enumerate(encoded):
        if ids:
            table[token] = embeddings[ids].mean(0)
    return table
