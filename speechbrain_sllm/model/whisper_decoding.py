"""Whisper's own decoder, frozen, transcribing encoder frames greedily.

The transcript adaptors (``speechbrain_sllm.model.adaptors``) read Whisper's
decoder states at the tokens it transcribes. This module holds the decoding
itself: the transcription prompt of a checkpoint, greedy steps with the
decoder's key-value cache, and the rule that ends a transcript (end of text,
a transcript that starts over, a loop).

Authors
 * speechbrain-sllm developers 2026
"""

import inspect

import torch
from torch import nn


class WhisperGreedyDecoder(nn.Module):
    """A frozen Whisper decoder that transcribes clips greedily and keeps its token states.

    The prompt is the start of transcript, then for a multilingual checkpoint
    English and transcribe, then no timestamps; the checkpoint's
    ``suppress_tokens`` are masked. A clip's transcript ends at the end-of-text
    token, where it starts over or loops (``transcript_end``), or after
    ``max_tokens``.

    Arguments
    ---------
    whisper : transformers.WhisperModel
        The checkpoint (its decoder and config are kept, frozen).
    source : str or None
        Its folder or hub id (tokenizer and generation config); None: a
        randomly initialised model, token ids compared as they are.
    max_tokens : int
        Greedy decoding budget per clip.
    restart_ngram : int
        A transcript whose last ``restart_ngram`` tokens repeat its first ones
        ends there.
    cache_dir : str or None
        HF cache folder.

    Example
    -------
    >>> from transformers import WhisperConfig, WhisperModel
    >>> cfg = WhisperConfig(vocab_size=60, d_model=16, encoder_layers=1,
    ...     encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
    ...     decoder_attention_heads=2, decoder_ffn_dim=32, max_target_positions=20,
    ...     decoder_start_token_id=1, eos_token_id=2, pad_token_id=2)
    >>> decoding = WhisperGreedyDecoder(WhisperModel(cfg), max_tokens=5)
    >>> tokens, states = decoding.transcribe(torch.randn(2, 10, 16))
    >>> len(tokens), states[0].shape[1]
    (2, 16)
    """

    LOOP_PERIOD = 4  # longest run of tokens whose third repeat ends a transcript

    def __init__(self, whisper, source=None, max_tokens=64, restart_ngram=3, cache_dir=None):
        super().__init__()
        self.decoder = whisper.decoder.eval().requires_grad_(False)
        # the decoder's key-value cache argument: ``cache`` from transformers 5, before it
        # ``past_key_values``
        parameters = inspect.signature(self.decoder.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.prompt, self.suppress, self.token_keys = transcription_prompt(
            whisper.config, source, cache_dir
        )
        self.eos = whisper.config.eos_token_id
        self.max_tokens = min(max_tokens, whisper.config.max_target_positions - len(self.prompt))
        self.restart_ngram = restart_ngram

    def train(self, mode=True):
        """Stays in eval mode: the decoder only transcribes."""
        return super().train(False)

    def requires_grad_(self, requires_grad=True):
        """Stays frozen: no gradient reaches the decoder, it joins no optimizer."""
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


def transcription_prompt(config, source, cache_dir=None):
    """Whisper's English transcription prompt, its suppressed tokens, and token keys.

    The special tokens are read from the checkpoint's tokenizer (a multilingual
    checkpoint, 51,865 tokens or more as in Whisper's own convention, also gets
    the language and task tokens); the suppressed tokens from its generation
    config. The keys map a token id to its text in lower case without its
    leading space (a randomly initialised decoder: no keys, ids compare as is).

    Arguments
    ---------
    config : transformers.WhisperConfig
        The checkpoint's config.
    source : str or None
        Its folder or hub id (None: a randomly initialised model).
    cache_dir : str or None
        HF cache folder.

    Returns
    -------
    prompt : list of int
    suppress : list of int
    keys : dict
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
