"""Mitigations of text-ability loss added to a strategy's training objective.

Each is an object the yaml builds (``mitigations: [...]``) and ``SpeechLLMBrain``
calls: ``on_fit_start(brain)`` before any checkpoint is recovered (so what it
keeps of the base model is the base model, also when a run resumes) and
``extra_loss(brain)`` at every training step, added to the speech loss.

* ``TextReplay``: a batch of written questions with the base LLM's own answers
  beside every speech batch (cross-entropy, ``weight``); memory: one more
  forward / backward of a text batch per step.
* ``TextDistillation``: the same written batches, but KL between the fine-tuned
  LLM and the base LLM's next-token distributions (top-k bins, computed once
  before training); memory: ``k + 1`` floats and ``k`` ids per answer token
  of the replay set.
* ``ImportanceAnchor``: ``strength * sum_i w_i (theta_i - theta_base_i)^2``
  over the LLM's trained weights, ``w_i`` the base textual importance scaled
  to mean 1 (EWC-style, with |g*w| in place of the Fisher); memory: two more
  copies of the trained LLM weights (base values and weights).

Authors
 * speechbrain-sllm developers 2026
"""

import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataloader import make_dataloader
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from speechbrain_sllm.distillation import TeacherCache, answer_logits, distillation_loss
from speechbrain_sllm.evaluation import qa_forward
from speechbrain_sllm.model.speech_llm import shifted_lm_loss


@register_checkpoint_hooks
class TextReplay:
    """Written questions with the base LLM's answers trained beside the speech batches.

    The replay order is a seeded permutation per pass; how many batches were
    drawn is saved in the Brain's checkpoints, so a resumed run replays what the
    uninterrupted run would have.

    Arguments
    ---------
    dataset : DynamicItemDataset or None
        Written QA (``prompt_ids``, ``answer_ids``); the study sets it when None.
    batch_size : int
        Replay items per training step.
    weight : float
        Factor of the replay loss.
    seed : int
        Order of the replay items (offset by the process rank).

    Example
    -------
    >>> TextReplay(batch_size=2).weight
    1.0
    """

    def __init__(self, dataset=None, batch_size=2, weight=1.0, seed=0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.weight = weight
        self.seed = seed
        self.batches = None
        self.drawn = 0  # batches taken so far (checkpointed)
        self.device, self.rank = "cpu", 0

    def on_fit_start(self, brain):
        """Starts the endless replay iterator (text only: no audio is loaded) and
        registers its position with the Brain's checkpointer (before recovery)."""
        if self.dataset is None:
            raise ValueError(
                f"{type(self).__name__}: no replay set; give `dataset` in the yaml or let "
                "the study set it (its written training questions)."
            )
        self.device, self.rank = brain.device, getattr(brain, "rank", 0) or 0
        self.drawn = 0
        self.batches = self.endless_batches()
        chosen = brain.mitigations()
        if brain.checkpointer is not None and self in chosen:
            name = f"mitigation_{chosen.index(self)}_{type(self).__name__}"
            if name not in brain.checkpointer.recoverables:
                brain.checkpointer.add_recoverable(name, self)

    def endless_batches(self):
        """Replay batches on the Brain's device, a new seeded permutation every pass,
        starting after the first ``drawn`` batches (skipped without loading them).

        The dataset gives its written keys only while a batch is read, never across
        a ``yield``: it may be the spoken training set itself, whose speech batches
        need their audio between replay batches."""
        generator = torch.Generator().manual_seed(self.seed + self.rank)
        size = len(self.dataset)
        skip = self.drawn
        while True:
            order = torch.randperm(size, generator=generator).tolist()
            for start in range(0, size, self.batch_size):
                if skip > 0:
                    skip -= 1
                    continue
                with self.dataset.output_keys_as(["id", "prompt_ids", "answer_ids"]):
                    items = [self.dataset[i] for i in order[start : start + self.batch_size]]
                yield PaddedBatch(items).to(self.device)

    @mark_as_saver
    def _save(self, path):
        """Writes how many replay batches were drawn."""
        with open(path, "w") as handle:
            handle.write(str(self.drawn))

    @mark_as_loader
    def _recover(self, path, end_of_epoch=True):
        """Continues the replay after the checkpoint's drawn batches."""
        with open(path) as handle:
            self.drawn = int(handle.read())
        self.batches = self.endless_batches()

    def next_batch(self):
        """The next written batch."""
        self.drawn += 1
        return next(self.batches)

    def extra_loss(self, brain):
        """``weight`` x the answer cross-entropy of the next written batch."""
        batch = self.next_batch()
        logits, labels = qa_forward(brain.modules.model, batch, "text", brain.hparams.prompt)
        return self.weight * shifted_lm_loss(logits, labels, "mean")


class TextDistillation(TextReplay):
    """The fine-tuned LLM kept close to the base LLM's distributions on written questions.

    Arguments
    ---------
    dataset : DynamicItemDataset or None
        Written QA; the study sets it when None.
    batch_size : int
        Written items per training step.
    weight : float
        Factor of the KL term.
    topk : int
        Base-LLM tokens kept per answer position (plus one bin for the rest).
    seed : int
        Order of the items.

    Example
    -------
    >>> TextDistillation(topk=8).cache.k
    8
    """

    def __init__(self, dataset=None, batch_size=2, weight=1.0, topk=64, seed=0):
        super().__init__(dataset, batch_size, weight, seed)
        self.cache = TeacherCache(k=topk)

    @torch.no_grad()
    def on_fit_start(self, brain):
        """Caches the base LLM's bins for every written item, then starts the replay."""
        super().on_fit_start(brain)
        model = brain.modules.model
        with self.dataset.output_keys_as(["id", "prompt_ids", "answer_ids"]):
            loader = make_dataloader(self.dataset, batch_size=8, collate_fn=PaddedBatch)
            for batch in loader:
                batch = batch.to(brain.device)
                logits, labels = qa_forward(model, batch, "text", brain.hparams.prompt)
                self.cache.store(list(batch.id), answer_logits(logits, labels))

    def extra_loss(self, brain):
        """``weight`` x KL(base || fine-tuned) per answer token of the next written batch."""
        batch = self.next_batch()
        logits, labels = qa_forward(brain.modules.model, batch, "text", brain.hparams.prompt)
        return self.weight * distillation_loss(logits, labels, list(batch.id), self.cache)


class ImportanceAnchor:
    """Importance-weighted pull of the trained LLM weights towards the base weights.

    Arguments
    ---------
    strength : float
        Factor of the penalty.
    scores : dict or None
        Base textual importance per parameter (``{"llm.<name>": tensor}``, as
        the importance stage names them); the study sets it when None.

    Example
    -------
    >>> ImportanceAnchor(strength=0.5).strength
    0.5
    """

    def __init__(self, strength=1.0, scores=None):
        self.strength = strength
        self.scores = scores
        self.anchors = {}

    def on_fit_start(self, brain):
        """Keeps each trained, scored LLM weight's base value and its importance weight."""
        if self.scores is None:
            raise ValueError(
                "ImportanceAnchor: no importance scores; give `scores` or let the study set "
                "them (the base LLM's textual importance)."
            )
        params = dict(brain.model.named_parameters())
        anchored = [n for n in self.scores if n in params and params[n].requires_grad]
        if not anchored:
            raise ValueError(
                "ImportanceAnchor: no trained parameter has a base importance score (a LoRA "
                "or frozen LLM trains none of the scored weights); use it with full_ft or "
                "layerwise_lr."
            )
        total = sum(float(self.scores[n].sum()) for n in anchored)
        count = sum(self.scores[n].numel() for n in anchored)
        mean = total / count if total > 0 else 1.0
        self.anchors = {
            name: (
                params[name].detach().clone(),
                (self.scores[name] / mean).to(params[name].device, params[name].dtype),
            )
            for name in anchored
        }

    def penalty(self, model):
        """``strength * sum_i w_i (theta_i - theta_base_i)^2`` over the anchored weights.

        Arguments
        ---------
        model : SpeechLLM
            The model being trained (not wrapped).

        Returns
        -------
        torch.Tensor
        """
        params = dict(model.named_parameters())
        total = 0.0
        for name, (base, weight) in self.anchors.items():
            total = total + (weight * (params[name] - base).pow(2)).sum()
        return self.strength * total

    def extra_loss(self, brain):
        """The penalty on the Brain's model."""
        return self.penalty(brain.model)
