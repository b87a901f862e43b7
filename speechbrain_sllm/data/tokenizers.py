"""A small tokenizer interface over HF tokenizers and raw sentencepiece models.

The SpeechLLM only needs ``encode``, ``decode``, the special ids and, when the
LLM has one, its chat template. Both adapters expose exactly that.

Authors
 * speechbrain-sllm developers 2026
"""

import os


class HFTokenizer:
    """Adapter over a ``transformers`` tokenizer.

    Arguments
    ---------
    source : str or transformers.PreTrainedTokenizerBase
        Local folder / hub id, or an already built tokenizer.
    trust_remote_code : bool
        Passed to ``AutoTokenizer``; False unless the yaml asks for it.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_sllm.data.tokenizers import train_sentencepiece
    >>> folder = tempfile.mkdtemp()
    >>> text = ["the cat sat on the mat", "a dog ate the bone"] * 50
    >>> spm = train_sentencepiece(text, folder, vocab_size=40)
    >>> hf = HFTokenizer(spm.to_hf(folder))
    >>> hf.decode(hf.encode("the cat"))
    'the cat'
    """

    def __init__(self, source, trust_remote_code=False):
        if isinstance(source, (str, os.PathLike)):
            from transformers import AutoTokenizer

            source = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        self.tokenizer = source
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"Tokenizer {self.tokenizer.name_or_path!r} has no eos token; set one "
                "(tokenizer.eos_token) so answers can be terminated."
            )

    @property
    def eos_id(self):
        """Id that ends an answer."""
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self):
        """Padding id (eos when the tokenizer has none)."""
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad

    @property
    def bos_id(self):
        """Beginning-of-sequence id or None."""
        return self.tokenizer.bos_token_id

    @property
    def has_chat_template(self):
        """Whether the tokenizer carries a chat template."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text):
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids):
        """Text of ``ids`` with special tokens removed."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def render_chat(self, messages):
        """Renders chat ``messages`` with the generation prompt appended."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


class SentencePieceTokenizer:
    """Adapter over a trained sentencepiece model (no chat template).

    Arguments
    ---------
    model_path : str
        Path of the ``.model`` file.

    Example
    -------
    >>> import tempfile
    >>> tok = train_sentencepiece(["hello world"] * 100 + ["good bye"] * 100,
    ...     tempfile.mkdtemp(), vocab_size=30)
    >>> tok.decode(tok.encode("hello world"))
    'hello world'
    """

    def __init__(self, model_path):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePiece model {model_path!r} not found; train one with "
                "speechbrain_sllm.data.tokenizers.train_sentencepiece."
            )
        self.model_path = model_path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.has_chat_template = False

    def __len__(self):
        return self.sp.get_piece_size()

    def encode(self, text):
        """Token ids of ``text``."""
        return self.sp.encode(text)

    def decode(self, ids):
        """Text of ``ids`` (special ids dropped)."""
        specials = {self.eos_id, self.bos_id, self.pad_id}
        return self.sp.decode([i for i in ids if i not in specials]).strip()

    def to_hf(self, folder):
        """Saves an HF ``LlamaTokenizer`` built from this model into ``folder``.

        Arguments
        ---------
        folder : str
            Output folder (created).

        Returns
        -------
        str
            ``folder``, loadable with ``AutoTokenizer.from_pretrained``.
        """
        import json
        import shutil

        from transformers import AutoTokenizer

        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(self.model_path, os.path.join(folder, "tokenizer.model"))
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": False,
        }
        for role, piece_id in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            config[f"{role}_token"] = self.sp.id_to_piece(piece_id)
        config["unk_token"] = self.sp.id_to_piece(self.sp.unk_id())
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
            json.dump(config, handle, indent=2)
        AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
        return folder


def train_sentencepiece(texts, output_folder, vocab_size=512, model_type="unigram"):
    """Trains a sentencepiece model on ``texts`` with pad/unk/bos/eos ids 0..3.

    Arguments
    ---------
    texts : list of str
        Training sentences.
    output_folder : str
        Where ``spm.model`` and ``spm.vocab`` are written.
    vocab_size : int
        Vocabulary size.
    model_type : str
        ``unigram`` or ``bpe``.

    Returns
    -------
    SentencePieceTokenizer
        The trained tokenizer.

    Example
    -------
    >>> import tempfile
    >>> tok = train_sentencepiece(["a b c"] * 20, tempfile.mkdtemp(), vocab_size=10)
    >>> tok.eos_id, tok.pad_id
    (3, 0)
    """
    import sentencepiece

    os.makedirs(output_folder, exist_ok=True)
    corpus = os.path.join(output_folder, "spm_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as handle:
        handle.write("\n".join(texts) + "\n")
    prefix = os.path.join(output_folder, "spm")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return SentencePieceTokenizer(prefix + ".model")
