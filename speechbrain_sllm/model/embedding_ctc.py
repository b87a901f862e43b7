"""CTC onto an LLM's input embeddings: aligning an adaptor without running the LLM.

A frozen LLM reads text as its input embeddings. An adaptor whose output frames
lie near the embeddings of the spoken words hands the LLM something close to the
written question, so the LLM answers it as it answers text. ``EmbeddingCTCHead``
scores each adaptor frame against every token's input embedding (cosine
similarity, times a fixed scale) plus a learned blank direction, and is trained
with CTC on the transcript's tokens; a norm penalty keeps the frames at the
embeddings' typical length (cosine logits leave the norm free, and a frame far
longer than any token embedding would swamp the LLM's residual stream).

The LLM itself never runs, so a step costs the adaptor and one matrix product
with the embedding table, far less than a frozen-LLM step (timings in
docs/results/webquestions.md).

Authors
 * speechbrain-sllm developers 2026
"""

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_sllm.model.padding import absolute_lengths

BLANK = 0


class EmbeddingCTCHead(nn.Module):
    """CTC log-probabilities of adaptor frames over an LLM's vocabulary plus a blank.

    Index 0 is the blank; token ``t`` of the LLM is index ``t + 1``.

    Arguments
    ---------
    embeddings : torch.Tensor
        The LLM's input embedding table ``(V, D)`` (copied, never trained).
    scale : float
        Multiplies the cosine similarities (a softmax temperature); 30 lets one
        token stand out among tens of thousands.

    Example
    -------
    >>> head = EmbeddingCTCHead(torch.randn(10, 4))
    >>> log_probs = head(torch.randn(2, 6, 4))
    >>> log_probs.shape
    torch.Size([2, 6, 11])
    >>> bool(torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 6)))
    True
    """

    def __init__(self, embeddings, scale=30.0):
        super().__init__()
        table = embeddings.detach().float()
        self.register_buffer("directions", F.normalize(table, dim=1), persistent=False)
        self.radius = table.norm(dim=1).median().item()
        self.scale = scale
        self.blank = nn.Parameter(torch.randn(table.shape[1]) * 0.02)

    def forward(self, frames):
        """Log-probabilities ``(B, T, V + 1)`` of adaptor frames ``(B, T, D)``."""
        directions = torch.cat([F.normalize(self.blank, dim=0)[None], self.directions])
        cosines = F.normalize(frames.float(), dim=-1) @ directions.T
        return (self.scale * cosines).log_softmax(dim=-1)

    def norm_penalty(self, frames, lengths):
        """Mean squared relative distance of the valid frames' norms to the embeddings' median.

        Arguments
        ---------
        frames : torch.Tensor
            Adaptor output ``(B, T, D)``.
        lengths : torch.Tensor
            Relative lengths ``(B,)``.

        Returns
        -------
        torch.Tensor
            A scalar.
        """
        valid = frame_mask(lengths, frames.shape[1]).to(frames.device)
        excess = (frames.float().norm(dim=-1) - self.radius) / self.radius
        return (excess.pow(2) * valid).sum() / valid.sum().clamp(min=1)


def frame_mask(lengths, time):
    """``(B, T)`` boolean mask of the frames within each relative length."""
    counts = absolute_lengths(lengths, time)
    return torch.arange(time)[None] < counts[:, None]


def ctc_loss(log_probs, lengths, token_ids):
    """CTC loss (mean over the batch) of log-probabilities against token ids.

    Index 0 of the log-probabilities is the blank and index ``t + 1`` is token ``t``
    (``EmbeddingCTCHead``'s layout; ``CTCEncoderBrain``'s characters use it too).

    Arguments
    ---------
    log_probs : torch.Tensor
        ``(B, T, V + 1)`` log-probabilities, e.g. from ``EmbeddingCTCHead``.
    lengths : torch.Tensor
        Relative lengths ``(B,)``.
    token_ids : list of list of int
        The token ids of each transcript (the LLM's tokens, or characters).

    Returns
    -------
    torch.Tensor
        A scalar (items whose transcript cannot fit their frames contribute 0).

    Example
    -------
    >>> log_probs = torch.randn(1, 5, 4).log_softmax(-1)
    >>> float(ctc_loss(log_probs, torch.tensor([1.0]), [[0, 2]])) > 0
    True
    """
    targets = torch.tensor([token + 1 for ids in token_ids for token in ids], dtype=torch.long)
    return F.ctc_loss(
        log_probs.transpose(0, 1),
        targets.to(log_probs.device),
        absolute_lengths(lengths, log_probs.shape[1]),
        torch.tensor([len(ids) for ids in token_ids]),
        blank=BLANK,
        zero_infinity=True,
    )


def greedy_ctc_tokens(log_probs, lengths):
    """Best-path decoding: the LLM's token ids of each item (repeats merged, blanks dropped).

    Example
    -------
    >>> log_probs = torch.full((1, 5, 4), -9.0)
    >>> for t, index in enumerate([2, 2, 0, 3, 1]):
    ...     log_probs[0, t, index] = 0.0
    >>> greedy_ctc_tokens(log_probs, torch.tensor([1.0]))
    [[1, 2, 0]]
    """
    best = log_probs.argmax(dim=-1).cpu()
    decoded = []
    for path, count in zip(best, absolute_lengths(lengths, best.shape[1])):
        path = torch.unique_consecutive(path[:count]).tolist()
        decoded.append([index - 1 for index in path if index != BLANK])
    return decoded
