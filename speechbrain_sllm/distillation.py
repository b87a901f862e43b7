"""Alignment by distillation: the LLM given speech should answer as it does given text.

The LLM is frozen; the adaptor is trained so that the LLM's next-token
distributions over the response positions given the *spoken* question match
those the same LLM gives for the *written* question (KL(teacher || student),
teacher = text input, student = speech input; DiVA and Ultravox align this way).
The responses are the base LLM's own answers (the study's ``base_answers``
targets), so the teacher is on its own distribution.

With the LLM frozen the teacher never changes: its distributions are computed
once per item and cached as the top-k log-probabilities plus the mass of the
rest of the vocabulary (one extra bin), so a later step costs one student pass.
The binned KL is exact when ``k`` covers the vocabulary, zero when student and
teacher coincide for any ``k``, and still penalises student mass outside the
teacher's top k.

Authors
 * speechbrain-sllm developers 2026
"""

import speechbrain as sb
import torch

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.evaluation import qa_forward
from speechbrain_sllm.model.speech_llm import IGNORE_INDEX


def answer_logits(logits, labels):
    """The logits that predict each item's answer tokens, one ``(n_i, V)`` tensor per item.

    Arguments
    ---------
    logits : torch.Tensor
        ``(B, L, V)``; position ``t`` predicts token ``t + 1``.
    labels : torch.Tensor
        ``(B, L)``, ``-100`` outside the answers.

    Returns
    -------
    list of torch.Tensor

    Example
    -------
    >>> logits = torch.arange(12.0).view(1, 3, 4)
    >>> answer_logits(logits, torch.tensor([[-100, -100, 2]]))[0].tolist()
    [[4.0, 5.0, 6.0, 7.0]]
    """
    predicting = labels[:, 1:] != IGNORE_INDEX
    shifted = logits[:, :-1]
    return [shifted[item][predicting[item]] for item in range(logits.shape[0])]


def binned_log_probs(logits, indices):
    """Log-probabilities of the ``indices`` tokens and of the rest of the vocabulary.

    Arguments
    ---------
    logits : torch.Tensor
        ``(n, V)``.
    indices : torch.Tensor
        ``(n, k)`` token ids.

    Returns
    -------
    torch.Tensor
        ``(n, k + 1)`` in fp32: the k tokens, then the rest (no rest bin when
        ``k == V``).

    Example
    -------
    >>> logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> binned_log_probs(logits, torch.tensor([[1]])).exp()
    tensor([[0.3000, 0.7000]])
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(-1, indices)
    if indices.shape[-1] >= logits.shape[-1]:
        return chosen
    rest = log_probs.scatter(-1, indices, float("-inf")).logsumexp(dim=-1, keepdim=True)
    return torch.cat([chosen, rest], dim=-1)


def teacher_bins(logits, k):
    """A teacher's top-k tokens and binned log-probabilities (see ``binned_log_probs``).

    Arguments
    ---------
    logits : torch.Tensor
        ``(n, V)`` teacher logits.
    k : int
        Tokens kept (capped at ``V``).

    Returns
    -------
    indices : torch.Tensor
        ``(n, k)``.
    log_probs : torch.Tensor
        ``(n, k + 1)`` (``(n, V)`` when ``k >= V``).
    """
    k = min(k, logits.shape[-1])
    indices = logits.float().topk(k, dim=-1).indices
    return indices, binned_log_probs(logits, indices)


def binned_kl(student_logits, indices, teacher_log_probs):
    """Summed KL(teacher || student) over positions, on the teacher's bins.

    Arguments
    ---------
    student_logits : torch.Tensor
        ``(n, V)``.
    indices : torch.Tensor
        ``(n, k)`` the teacher's top-k tokens.
    teacher_log_probs : torch.Tensor
        ``(n, k + 1)`` or ``(n, V)`` from ``teacher_bins``.

    Returns
    -------
    torch.Tensor
        A scalar.

    Example
    -------
    >>> logits = torch.randn(3, 10)
    >>> indices, teacher = teacher_bins(logits, 4)
    >>> binned_kl(logits, indices, teacher).abs().item() < 1e-6
    True
    """
    student = binned_log_probs(student_logits, indices)
    teacher_probs = teacher_log_probs.exp()
    present = teacher_probs > 0
    gap = torch.where(present, teacher_log_probs, 0.0) - torch.where(present, student, 0.0)
    return (teacher_probs * gap).sum()


class TeacherCache:
    """Teacher bins per item id, computed once (the LLM is frozen, so they never change).

    Arguments
    ---------
    k : int
        Top-k tokens kept per position.

    Example
    -------
    >>> cache = TeacherCache(k=2)
    >>> cache.missing(["a", "b"])
    ['a', 'b']
    >>> cache.store(["a"], [torch.randn(3, 5)])
    >>> cache.missing(["a", "b"]), cache["a"][0].shape, cache["a"][1].shape
    (['b'], torch.Size([3, 2]), torch.Size([3, 3]))
    """

    def __init__(self, k=64):
        self.k = k
        self.bins = {}

    def missing(self, ids):
        """The ids without cached bins."""
        return [item for item in ids if item not in self.bins]

    def store(self, ids, logits):
        """Caches the bins of each item's answer logits (``(n_i, V)`` each)."""
        for item, item_logits in zip(ids, logits):
            indices, log_probs = teacher_bins(item_logits.detach(), self.k)
            self.bins[item] = (indices.cpu(), log_probs.cpu())

    def __getitem__(self, item):
        return self.bins[item]

    def __len__(self):
        return len(self.bins)


def distillation_loss(student_logits, labels, ids, cache):
    """Mean KL(teacher || student) per answer token of a batch.

    Arguments
    ---------
    student_logits : torch.Tensor
        ``(B, L, V)`` of the spoken questions.
    labels : torch.Tensor
        ``(B, L)`` (the answers, as in the teacher's pass).
    ids : list of str
        The items' ids (every one cached).
    cache : TeacherCache
        The teacher's bins.

    Returns
    -------
    torch.Tensor
    """
    total, count = student_logits.new_zeros((), dtype=torch.float32), 0
    for item, logits in zip(ids, answer_logits(student_logits, labels)):
        indices, teacher = cache[item]
        if indices.shape[0] != logits.shape[0]:
            raise ValueError(
                f"Item {item!r}: {logits.shape[0]} answer positions given speech but "
                f"{indices.shape[0]} in the cached teacher; the answers changed since the "
                "teacher was cached (use a new TeacherCache)."
            )
        total = total + binned_kl(logits, indices.to(logits.device), teacher.to(logits.device))
        count += logits.shape[0]
    return total / max(count, 1)


class DistillationBrain(SpeechLLMBrain):
    """Trains the adaptor so that the frozen LLM answers speech as it answers text.

    Hparams beyond ``SpeechLLMBrain``'s: ``teacher_cache`` (a ``TeacherCache``;
    missing items are computed on the fly, in text mode, without gradients).
    The model's strategy must freeze the LLM: the cached teacher is the LLM as
    it was when first seen.
    """

    def compute_forward(self, batch, stage):
        """Student logits on the spoken questions; fills the teacher cache first."""
        batch = batch.to(self.device)
        keep = list(range(len(batch.id)))
        if stage == sb.Stage.TRAIN:
            keep = self.items_with_finite_audio(batch.sig.data, list(batch.id))
        ids = [batch.id[index] for index in keep]
        cache = self.hparams.teacher_cache
        if cache.missing(ids):
            with torch.no_grad(), self.evaluation_ctx:
                logits, labels = qa_forward(
                    self.modules.model, batch, "text", self.hparams.prompt, keep
                )
            cache.store(ids, answer_logits(logits, labels))
        logits, labels = qa_forward(self.modules.model, batch, "speech", self.hparams.prompt, keep)
        return logits, labels, ids

    def compute_objectives(self, predictions, batch, stage):
        """The distillation loss; off training, also the batch's metrics."""
        logits, labels, ids = predictions
        if stage != sb.Stage.TRAIN:
            self.stage_metrics.append(self.evaluator(), batch)
        return distillation_loss(logits, labels, ids, self.hparams.teacher_cache)
