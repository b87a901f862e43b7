"""Both sides of a speech LLM scored on QA data: decoding, accuracy, WER, perplexity.

Functions of a model, not of a training loop: ``SpeechLLMBrain`` (validation and
test metrics), the importance stage (gradients of the same forward pass), the
studies and inference all call them.

* ``qa_forward`` runs a model on a batch of spoken (``speech``) or written
  (``text``) questions and returns logits and labels;
* ``QAEvaluator`` scores whole datasets: under torchrun each rank takes its
  share (``rank::world``) and the results are gathered exactly, each item once.

Authors
 * speechbrain-sllm developers 2026
"""

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataloader import make_dataloader
from tqdm import tqdm

from speechbrain_sllm.data.batch_filter import without_nonfinite_audio
from speechbrain_sllm.distributed import all_reduce_max, all_reduce_sum, gather_in_order, rank_shard
from speechbrain_sllm.fsdp import is_sharded, root_gathered
from speechbrain_sllm.inference import generated_texts, speech_inputs
from speechbrain_sllm.metrics import QAAccuracyStats, check_answer_match, wer_stats, write_stats
from speechbrain_sllm.model.encoders import AudioTooLongError
from speechbrain_sllm.model.padding import unpad
from speechbrain_sllm.model.speech_llm import ContextLengthError, shifted_lm_loss

logger = logging.getLogger(__name__)
INPUT_MODES = ("speech", "text")
METRICS = ("WER", "S2T", "T2T", "text_ppl")
MAX_METRICS = ("S2T", "T2T")  # higher is better


@dataclass
class EvaluationSettings:
    """How a Brain scores its validation and test sets (the yaml's ``evaluation``).

    Arguments
    ---------
    valid_metrics : list of str
        Metrics of each validation pass (``METRICS``), besides the loss.
    test_metrics : list of str
        Metrics of each test pass.
    batch_size : int
        Batch size of scoring and decoding.
    max_new_tokens : int
        Decoding budget.
    num_beams : int
        Beam size (1: greedy).
    answer_match : str
        ``contains`` or ``exact`` (see ``QAAccuracyStats``).

    Example
    -------
    >>> EvaluationSettings(valid_metrics=["S2T"]).max_new_tokens
    32
    >>> EvaluationSettings(test_metrics=["BLEU"])
    Traceback (most recent call last):
    ...
    ValueError: evaluation: test_metrics has unknown metrics ['BLEU']; use some of ('WER', 'S2T', 'T2T', 'text_ppl').
    """

    valid_metrics: list = field(default_factory=list)
    test_metrics: list = field(default_factory=list)
    batch_size: int = 8
    max_new_tokens: int = 32
    num_beams: int = 1
    answer_match: str = "contains"

    def __post_init__(self):
        """Checks the metric names and the answer matching."""
        for name in ("valid_metrics", "test_metrics"):
            unknown = [m for m in getattr(self, name) if m not in METRICS]
            if unknown:
                raise ValueError(
                    f"evaluation: {name} has unknown metrics {unknown}; use some of {METRICS}."
                )
        check_answer_match(self.answer_match)

    def checkpoint_key(self, key):
        """``key`` if validation computes it (the loss or a ``valid_metrics`` entry).

        Arguments
        ---------
        key : str
            The checkpoint meta key that selects the best checkpoint.

        Returns
        -------
        str
            ``key``.

        Example
        -------
        >>> EvaluationSettings(valid_metrics=["S2T"]).checkpoint_key("S2T")
        'S2T'
        """
        allowed = ["loss", *self.valid_metrics]
        if key not in allowed:
            raise ValueError(
                f"ckpt_key {key!r} is not computed at validation; use one of {allowed} "
                "(add it to the evaluation's valid_metrics)."
            )
        return key


def context_error(error, item_id, mode):
    """A ``ContextLengthError`` that names the dataset item and the fix for its input mode.

    Arguments
    ---------
    error : ContextLengthError
        The model's error (``length``, ``limit``).
    item_id : str
        The item's id.
    mode : str
        ``speech`` or ``text``.

    Returns
    -------
    ValueError
    """
    what = "spoken question + answer" if mode == "speech" else "written question + answer"
    fix = (
        "lower `max_duration`, or downsample speech more (adaptor stack / stride)"
        if mode == "speech"
        else "shorten the question or answer, or remove the item from the manifest"
    )
    return ValueError(
        f"Item {item_id!r}: the {what} takes {error.length} positions, over the LLM "
        f"context of {error.limit}; {fix}."
    )


def qa_forward(model, batch, mode, prompt, keep=None):
    """Forward pass on spoken (``speech``) or written (``text``) questions.

    Arguments
    ---------
    model : torch.nn.Module
        A ``SpeechLLM`` (or its DDP / FSDP wrapper).
    batch : PaddedBatch
        From ``make_qa_dataset``, on the model's device.
    mode : str
        ``speech`` or ``text``.
    prompt : ChatPrompt
        The prompt builder.
    keep : list of int or None
        Positions of the items to run (None: all).

    Returns
    -------
    logits : torch.Tensor
        ``(B, L, V)``.
    labels : torch.Tensor
        ``(B, L)``, -100 outside the answers.
    """
    if mode not in INPUT_MODES:
        raise ValueError(f"input mode {mode!r} unknown; use one of {INPUT_MODES}.")
    keep = list(range(len(batch.id))) if keep is None else keep
    ids = [batch.id[i] for i in keep]
    answers = [unpad(batch.answer_ids)[i].tolist() for i in keep]
    try:
        if mode == "speech":
            wavs, wav_lens = batch.sig
            prefix, suffix = prompt.speech_prompt()
            count = len(keep)
            return model([prefix] * count, answers, wavs[keep], wav_lens[keep], [suffix] * count)
        prompts = [unpad(batch.prompt_ids)[i].tolist() for i in keep]
        return model(prompts, answers)
    except ContextLengthError as error:
        raise context_error(error, ids[error.item], mode) from error
    except AudioTooLongError as error:
        raise AudioTooLongError(f"Item {ids[error.item]!r}: {error}", error.item) from error


class QAEvaluator:
    """Scores a ``SpeechLLM`` on QA datasets (T2T / S2T accuracy, WER, perplexity).

    Arguments
    ---------
    model : SpeechLLM
        The model (not wrapped in DDP; FSDP-sharded is fine).
    prompt : ChatPrompt
        Prompt builder.
    tokenizer : HFTokenizer or SentencePieceTokenizer
        Decodes generated ids.
    device : str or torch.device
        Where batches go.
    autocast : context manager or None
        The reusable context each forward runs in (a Brain's
        ``evaluation_ctx``, or ``training_ctx`` for gradients); None: none.
    settings : EvaluationSettings or None
        Batch size, decoding budget, beam size and answer matching (None:
        the defaults).

    Example
    -------
    >>> evaluator = QAEvaluator(torch.nn.Linear(1, 1), prompt=None, tokenizer=None)
    >>> evaluator.settings.batch_size, evaluator.settings.answer_match
    (8, 'contains')
    """

    def __init__(self, model, prompt, tokenizer, device="cpu", autocast=None, settings=None):
        self.model = model
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.device = device
        self.autocast = autocast or contextlib.nullcontext()
        self.settings = settings or EvaluationSettings()
        self.nonfinite_ids = []  # items left out of spoken scores: non-finite audio

    def forward(self, batch, mode):
        """``qa_forward`` of the model on ``batch`` (moved to the device), in ``autocast``."""
        with self.autocast:
            return qa_forward(self.model, batch.to(self.device), mode, self.prompt)

    def rank_batches(self, dataset, batch_size=None):
        """Yields ``(batch, counted)`` over this rank's share of ``dataset``.

        A sharded (FSDP) model gathers its parameters in every forward, so all
        ranks must run the same number of batches: a rank with fewer batches
        runs copies of the first item with ``counted=False``, whose results
        the caller drops.

        Arguments
        ---------
        dataset : DynamicItemDataset
            The data.
        batch_size : int or None
            Batch size (None: the evaluator's).

        Yields
        ------
        batch : PaddedBatch
            The next batch.
        counted : bool
            False for a lockstep filler batch.
        """
        subset = torch.utils.data.Subset(dataset, rank_shard(range(len(dataset))))
        loader = make_dataloader(
            subset,
            batch_size=batch_size or self.settings.batch_size,
            shuffle=False,
            collate_fn=PaddedBatch,
        )
        missing = 0
        if is_sharded(self.model):  # agreed before any forward: a collective of its own
            missing = all_reduce_max(len(loader), self.device) - len(loader)
        yield from ((batch, True) for batch in loader)
        for _ in range(missing):
            yield PaddedBatch([dataset[0]]), False

    @torch.no_grad()
    def perplexity(self, dataset, mode="text", batch_size=None):
        """Perplexity of the answers given the questions (token-weighted, all ranks).

        Arguments
        ---------
        dataset : DynamicItemDataset
            QA dataset.
        mode : str
            ``text`` or ``speech`` questions.
        batch_size : int or None
            Batch size (None: the evaluator's).

        Returns
        -------
        float
        """
        self.model.eval()
        total, count = 0.0, 0
        for batch, counted in self.rank_batches(dataset, batch_size):
            batch, counted = self.finite_part(batch, counted, mode)
            batch_total, batch_count = answer_loss_sum(*self.forward(batch, mode))
            if counted:  # a lockstep filler batch runs, but counts nothing
                total, count = total + batch_total, count + batch_count
        total, count = all_reduce_sum([total, count], self.device)
        return perplexity_of(total, count)

    @torch.no_grad()
    def decode_batch(self, batch, mode="speech"):
        """The generated answer of each item of one batch.

        Arguments
        ---------
        batch : PaddedBatch
            From ``make_qa_dataset``.
        mode : str
            ``speech`` (S2T) or ``text`` (T2T) questions.

        Returns
        -------
        list of str
        """
        self.model.eval()
        batch = batch.to(self.device)
        with self.autocast, root_gathered(self.model):
            if mode == "speech":
                inputs = speech_inputs(self.model, self.prompt, *batch.sig)
            else:
                prompts = [p.tolist() for p in unpad(batch.prompt_ids)]
                inputs = self.model.build_batch(prompts, padding_side="left")
            return generated_texts(
                self.model,
                self.tokenizer,
                inputs,
                self.settings.max_new_tokens,
                self.settings.num_beams,
            )

    def decode(self, dataset, mode="speech", batch_size=None, progress=False):
        """Generates answers for every item of ``dataset``.

        Arguments
        ---------
        dataset : DynamicItemDataset
            QA dataset.
        mode : str
            ``speech`` (S2T) or ``text`` (T2T) questions.
        batch_size : int or None
            Batch size (None: the evaluator's).
        progress : bool
            Show a progress bar.

        Returns
        -------
        ids, predictions : list of str
        references : list of list of str
            Each item's accepted answers. In dataset order; under torchrun each rank decodes its share and
            every rank returns the whole, each item once.
        """
        items = []
        batches = self.rank_batches(dataset, batch_size)
        for batch, counted in tqdm(batches, disable=not progress, desc=f"decode {mode}"):
            batch, counted = self.finite_part(batch, counted, mode)
            texts = self.decode_batch(batch, mode)
            if counted:
                items.extend(zip(batch.id, texts, batch.references))
        items = gather_in_order(items, rank_shard(range(len(dataset))))
        if not items:
            return [], [], []
        ids, predictions, references = (list(column) for column in zip(*items))
        return ids, predictions, references

    def finite_part(self, batch, counted, mode):
        """The batch's items with finite audio (spoken input), the others named in
        ``nonfinite_ids``; a batch with none left runs whole, uncounted (lockstep).

        Arguments
        ---------
        batch : PaddedBatch
            The next batch.
        counted : bool
            Whether its results count.
        mode : str
            ``speech`` or ``text`` (written questions need no audio).

        Returns
        -------
        batch : PaddedBatch
        counted : bool
        """
        if mode != "speech":
            return batch, counted
        finite, dropped = without_nonfinite_audio(batch, "QAEvaluator")
        if counted:
            self.nonfinite_ids.extend(dropped)
        return (finite, counted) if finite is not None else (batch, False)

    def qa_accuracy(self, dataset, mode="speech", output_file=None, **kwargs):
        """QA accuracy (%) with normalised answer matching (T2T or S2T).

        Arguments
        ---------
        dataset : DynamicItemDataset
            QA dataset.
        mode : str
            ``speech`` or ``text``.
        output_file : str or None
            Where per-item predictions are written (tab separated).
        **kwargs : dict
            Passed to ``decode`` (``batch_size``, ``progress``).

        Returns
        -------
        float
        """
        stats = QAAccuracyStats(answer_match=self.settings.answer_match)
        stats.append(*self.decode(dataset, mode=mode, **kwargs))
        write_stats(stats, output_file)
        return stats.summarize("accuracy")

    def word_error_rate(self, dataset, output_file=None, **kwargs):
        """Word error rate (%) of generated transcripts against the ``answer`` field.

        Arguments
        ---------
        dataset : DynamicItemDataset
            ASR dataset whose answers are transcripts.
        output_file : str or None
            Where SpeechBrain's WER alignment report is written.
        **kwargs : dict
            Passed to ``decode`` (``batch_size``, ``progress``).

        Returns
        -------
        float
        """
        stats = wer_stats()
        ids, predictions, references = self.decode(dataset, mode="speech", **kwargs)
        transcripts = [answers[0] for answers in references]
        stats.append(ids, [p.split() for p in predictions], [r.split() for r in transcripts])
        write_stats(stats, output_file)
        return stats.summarize("error_rate")


def answer_loss_sum(logits, labels):
    """The summed next-token loss over a batch's answer tokens, and their number.

    Arguments
    ---------
    logits : torch.Tensor
        ``(B, L, V)``.
    labels : torch.Tensor
        ``(B, L)``, -100 outside the answers.

    Returns
    -------
    total : float
    count : int
    """
    total = shifted_lm_loss(logits.float(), labels, "sum").item()
    return total, int((labels[:, 1:] != -100).sum())


def perplexity_of(total, count):
    """Token-weighted perplexity of a summed loss, capped at ``exp(50)``.

    Example
    -------
    >>> round(perplexity_of(0.0, 10), 3), perplexity_of(0.0, 0)
    (1.0, 1.0)
    """
    return math.exp(min(total / max(count, 1), 50.0))
