"""The encoder -> adaptor -> LLM model, with speech embeddings spliced into prompts.

Authors
 * speechbrain-sllm developers 2026
"""

import torch
from torch import nn

from speechbrain_sllm.fsdp import is_sharded
from speechbrain_sllm.model.padding import absolute_lengths

IGNORE_INDEX = -100


def load_causal_lm(
    source=None,
    config=None,
    dtype="float32",
    trust_remote_code=False,
    gradient_checkpointing=False,
    cache_dir=None,
):
    """Loads any HF causal LM from a local folder / hub id, or builds one from a config.

    Arguments
    ---------
    source : str or None
        Local folder or hub id.
    config : transformers.PretrainedConfig or None
        Builds a randomly initialised model instead of loading ``source``.
    dtype : str
        ``float32``, ``bfloat16`` or ``float16``.
    trust_remote_code : bool
        Off unless the yaml asks for it: remote code runs arbitrary Python.
    gradient_checkpointing : bool
        Recompute activations in the backward pass to save memory.
    cache_dir : str or None
        HF cache folder.

    Returns
    -------
    transformers.PreTrainedModel

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> llm = load_causal_lm(config=cfg)
    >>> llm.config.num_hidden_layers
    2
    """
    from transformers import AutoModelForCausalLM

    if (source is None) == (config is None):
        raise ValueError("load_causal_lm: give exactly one of `source` or `config`.")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(
            f"load_causal_lm: dtype {dtype!r} is not a torch dtype; "
            "use float32, bfloat16 or float16."
        )
    if source is not None:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
        )
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


class ContextLengthError(ValueError):
    """A sequence is longer than the LLM's context window.

    Arguments
    ---------
    item : int
        Position of the sequence in its batch.
    length : int
        Its number of positions (prompt + speech + answer).
    limit : int
        The LLM's context.
    """

    def __init__(self, item, length, limit):
        self.item, self.length, self.limit = item, length, limit
        super().__init__(
            f"Batch item {item} has {length} positions (prompt + speech + answer), over "
            f"the LLM context of {limit}; lower `max_duration`, shorten the prompt or "
            "answers, or downsample speech more (adaptor stack / stride)."
        )


class SpeechLLM(nn.Module):
    """Speech encoder -> adaptor -> causal LLM, with a text-only path through the same LLM.

    Arguments
    ---------
    llm : transformers.PreTrainedModel
        Any HF causal LM (possibly wrapped by peft later).
    encoder : SpeechEncoder or None
        Speech encoder; None for a text-only model.
    adaptor : torch.nn.Module or None
        Maps ``(B, T, D_enc)`` to ``(B, T', D_llm)``.

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> from speechbrain_sllm.model.adaptors import FrameStackAdaptor
    >>> from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> model = SpeechLLM(load_causal_lm(config=cfg),
    ...     FbankTransformerEncoder(n_mels=20, d_model=8, num_layers=1, nhead=2),
    ...     FrameStackAdaptor(8, 16, stack=2, hidden_size=32))
    >>> speech = model.speech_embeddings(torch.randn(2, 8000), torch.tensor([1.0, 0.5]))
    >>> [s.shape for s in speech]
    [torch.Size([7, 16]), torch.Size([4, 16])]
    >>> batch = model.build_batch([[1, 2]] * 2, speech, [[3]] * 2, [[4, 5], [6]])
    >>> batch["inputs_embeds"].shape, batch["labels"][1].tolist()
    (torch.Size([2, 12, 16]), [-100, -100, -100, -100, -100, -100, -100, 6, -100, -100, -100, -100])
    >>> model.loss(batch).shape
    torch.Size([])
    """

    def __init__(self, llm, encoder=None, adaptor=None):
        super().__init__()
        if (encoder is None) != (adaptor is None):
            raise ValueError("SpeechLLM: give both an encoder and an adaptor, or neither.")
        self.llm = llm
        self.encoder = encoder
        self.adaptor = adaptor

    @property
    def device(self):
        """Device of the LLM's input embeddings."""
        return self.llm.get_input_embeddings().weight.device

    def embed_ids(self, ids):
        """Embeds a list of token ids.

        Arguments
        ---------
        ids : list of int or torch.Tensor
            Token ids ``(L,)``.

        Returns
        -------
        torch.Tensor
            ``(L, D_llm)`` embeddings.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids)

    def speech_embeddings(self, wavs, wav_lens):
        """Encodes and adapts speech, returning the valid frames of each item.

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, S)`` waveforms.
        wav_lens : torch.Tensor
            ``(B,)`` relative lengths.

        Returns
        -------
        list of torch.Tensor
            One ``(T'_b, D_llm)`` tensor per item.
        """
        if self.encoder is None:
            raise RuntimeError("SpeechLLM: this model has no speech encoder.")
        feats, feat_lens = self.encoder(wavs, wav_lens)  # (B, T, D_enc)
        embeds, embed_lens = self.adaptor(feats, feat_lens)  # (B, T', D_llm)
        dtype = self.llm.get_input_embeddings().weight.dtype
        valid = absolute_lengths(embed_lens, embeds.shape[1]).tolist()
        return [embeds[b, :n].to(dtype) for b, n in enumerate(valid)]

    def build_batch(self, prefixes, speech=None, suffixes=None, answers=None, padding_side="right"):
        """Assembles ``prefix [speech] [suffix] [answer]`` sequences into a padded batch.

        Arguments
        ---------
        prefixes : list of list of int
            Prompt ids before the speech (the whole prompt for text input).
        speech : list of torch.Tensor or None
            ``(T'_b, D_llm)`` speech embeddings per item.
        suffixes : list of list of int or None
            Prompt ids after the speech.
        answers : list of list of int or None
            Target ids (with eos); loss is computed on these only.
        padding_side : str
            ``right`` for training / scoring, ``left`` for generation.

        Returns
        -------
        dict
            ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)``,
            ``labels (B, L)`` (-100 on prompt, speech and padding).
        """
        batch_size = len(prefixes)
        rows, label_rows = [], []
        for b in range(batch_size):
            parts = [self.embed_ids(prefixes[b])]
            labels = [IGNORE_INDEX] * len(prefixes[b])
            if speech is not None:
                parts.append(speech[b])
                labels += [IGNORE_INDEX] * speech[b].shape[0]
            if suffixes is not None:
                parts.append(self.embed_ids(suffixes[b]))
                labels += [IGNORE_INDEX] * len(suffixes[b])
            if answers is not None:
                parts.append(self.embed_ids(answers[b]))
                labels += list(answers[b])
            rows.append(torch.cat(parts))  # (L_b, D)
            label_rows.append(torch.tensor(labels, dtype=torch.long))
        self.check_context(rows)
        return pad_rows(rows, label_rows, padding_side)

    def check_context(self, rows):
        """Raises when a sequence is longer than the LLM's context window.

        Arguments
        ---------
        rows : list of torch.Tensor
            ``(L_b, D)`` assembled sequences.
        """
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        longest = max(row.shape[0] for row in rows)
        if limit is not None and longest > limit:
            item = max(range(len(rows)), key=lambda b: rows[b].shape[0])
            raise ContextLengthError(item, longest, limit)

    def forward(self, prefixes, answers, wavs=None, wav_lens=None, suffixes=None):
        """Full training forward: (encode speech,) splice, run the LLM.

        This is the one entry point used in training so that DDP sees every
        trainable parameter in a single ``forward`` call.

        Arguments
        ---------
        prefixes : list of list of int
            Prompt ids (before the speech for spoken input).
        answers : list of list of int
            Target ids with eos.
        wavs : torch.Tensor or None
            ``(B, S)`` waveforms for spoken input; None for text input.
        wav_lens : torch.Tensor or None
            ``(B,)`` relative lengths.
        suffixes : list of list of int or None
            Prompt ids after the speech.

        Returns
        -------
        logits : torch.Tensor
            ``(B, L, V)``.
        labels : torch.Tensor
            ``(B, L)`` with -100 outside the answers.
        """
        speech = None if wavs is None else self.speech_embeddings(wavs, wav_lens)
        batch = self.build_batch(prefixes, speech, suffixes, answers)
        return self.logits(batch), batch["labels"]

    def logits(self, batch):
        """Runs the LLM on an assembled batch.

        Arguments
        ---------
        batch : dict
            Output of ``build_batch``.

        Returns
        -------
        torch.Tensor
            Logits ``(B, L, V)``.
        """
        out = self.llm(
            inputs_embeds=batch["inputs_embeds"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
        )
        return out.logits

    def loss(self, batch, reduction="mean"):
        """Next-token cross-entropy on the answer tokens.

        Arguments
        ---------
        batch : dict
            Output of ``build_batch`` with answers.
        reduction : str
            ``mean`` over answer tokens, ``sum``, or ``none`` (per item sums).

        Returns
        -------
        torch.Tensor
            The loss (scalar, or ``(B,)`` for ``none``).
        """
        logits = self.logits(batch)
        return shifted_lm_loss(logits, batch["labels"], reduction)

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=32, num_beams=1, eos_id=None, pad_id=None):
        """Greedy (``num_beams=1``) or beam-search decoding from left-padded prompts.

        Arguments
        ---------
        batch : dict
            Output of ``build_batch(..., padding_side="left")`` without answers.
        max_new_tokens : int
            Decoding budget.
        num_beams : int
            Beam size.
        eos_id : int or None
            End-of-answer id.
        pad_id : int or None
            Padding id.

        Returns
        -------
        list of list of int
            Generated ids per item, eos and what follows removed.
        """
        out = self.llm.generate(
            # FSDP: ranks keep stepping until every rank's batch is finished
            synced_gpus=is_sharded(self.llm),
            inputs_embeds=batch["inputs_embeds"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id if pad_id is not None else eos_id,
        )
        return [cut_at_eos(row.tolist(), eos_id) for row in out]


def pad_rows(rows, label_rows, padding_side="right"):
    """Pads embedding rows and label rows into a batch.

    Arguments
    ---------
    rows : list of torch.Tensor
        ``(L_b, D)`` embeddings.
    label_rows : list of torch.Tensor
        ``(L_b,)`` labels.
    padding_side : str
        ``right`` or ``left``.

    Returns
    -------
    dict
        ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)``, ``labels (B, L)``.

    Example
    -------
    >>> out = pad_rows([torch.ones(2, 3), torch.ones(1, 3)],
    ...     [torch.tensor([5, 6]), torch.tensor([7])], padding_side="left")
    >>> out["attention_mask"].tolist(), out["labels"].tolist()
    ([[1, 1], [0, 1]], [[5, 6], [-100, 7]])
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    max_len = max(row.shape[0] for row in rows)
    batch = len(rows)
    ref = rows[0]
    embeds = ref.new_zeros(batch, max_len, ref.shape[1])
    mask = torch.zeros(batch, max_len, dtype=torch.long, device=ref.device)
    labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.long, device=ref.device)
    for b, (row, lab) in enumerate(zip(rows, label_rows)):
        n = row.shape[0]
        span = slice(0, n) if padding_side == "right" else slice(max_len - n, max_len)
        embeds[b, span] = row
        mask[b, span] = 1
        labels[b, span] = lab.to(ref.device)
    return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}


def shifted_lm_loss(logits, labels, reduction="mean"):
    """Cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` (at least fp32).

    Arguments
    ---------
    logits : torch.Tensor
        ``(B, L, V)``.
    labels : torch.Tensor
        ``(B, L)`` with -100 where no loss is taken.
    reduction : str
        ``mean`` (over counted tokens), ``sum``, or ``none`` (per-item sums).

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> logits = torch.zeros(1, 3, 4)
    >>> loss = shifted_lm_loss(logits, torch.tensor([[-100, 1, 2]]))
    >>> round(loss.item(), 4) == round(torch.log(torch.tensor(4.0)).item(), 4)
    True
    """
    logits = logits[:, :-1]  # (B, L-1, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = labels[:, 1:]  # (B, L-1)
    token_loss = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, L-1)
    if reduction == "none":
        return token_loss.sum(dim=1)
    if reduction == "sum":
        return token_loss.sum()
    if reduction == "mean":
        return token_loss.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}.")


def cut_at_eos(ids, eos_id):
    """Truncates ``ids`` at the first ``eos_id``.

    Arguments
    ---------
    ids : list of int
        Generated ids.
    eos_id : int or None
        End id.

    Returns
    -------
    list of int

    Example
    -------
    >>> cut_at_eos([5, 6, 2, 7], 2)
    [5, 6]
    """
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id)]
    return ids
