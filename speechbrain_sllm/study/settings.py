"""What a study's stages share, as objects its yaml builds.

A study yaml declares its stages (``speechbrain_sllm.study.stages``) and the
settings they share, each under one nested key that the command line
overrides in part (``--finetune="{epochs: 2}"``, ``--align="{epochs: 3}"``,
``--importance="{fraction: 0.1}"``):

* ``FinetuneSettings`` (``finetune``): what every fine-tuning stage shares
  (epochs, batch size, optimizer, warmup, LoRA and layer-wise LR settings,
  the adaptor's rate, weight interpolation);
* ``ImportanceSettings`` (``importance``): the importance stage and the zeroing check;
* ``AlignmentSettings`` (``align``): stage 1, the adaptor aligned with the LLM frozen.

and what a study's script hands its runner: ``StudyModels`` (how its models
load), ``StudyData`` (its datasets); ``StageTraining`` is how one stage trains.

Decoding and scoring settings are ``speechbrain_sllm.evaluation.EvaluationSettings``.

Authors
 * speechbrain-sllm developers 2026
"""

import functools
from dataclasses import dataclass, field

import torch

from speechbrain_sllm.overrides import RENAMED_VALUES

ALIGN_OBJECTIVES = ("ctc_embeddings", "lm_loss", "text_teacher")
ALIGN_TARGETS = ("answer", "transcript")


@dataclass
class FinetuneSettings:
    """What every speech fine-tuning stage of a study shares (``FinetuneStage`` adds its own).

    Arguments
    ---------
    epochs : int
        Training epochs per stage.
    batch_size : int
        Training and validation batch size.
    opt_class : callable
        Builds the optimizer from the strategy's parameter groups.
    warmup_fraction : float
        Share of the steps with a linear warmup (then cosine decay).
    lora : LoRASettings or None
        Settings of the LoRA strategies.
    layerwise_lr : LayerwiseLR or None
        Rule of the layer-wise strategies.
    train_encoder : bool
        Whether the speech encoder trains too.
    adaptor_lr : float or None
        Rate of the adaptor (and a trained encoder) in every stage; None:
        the stage's own rate.
    interpolation_alphas : list of float
        After each stage, the LLM at ``base + alpha (fine-tuned - base)``
        is scored for each alpha (empty: none).

    Example
    -------
    >>> FinetuneSettings(epochs=1, adaptor_lr=2e-5).adaptor_lr_scale(2e-4)
    0.1
    >>> FinetuneSettings(adaptor_lr=-1)
    Traceback (most recent call last):
    ...
    ValueError: finetune: adaptor_lr is -1; give a rate >= 0, or null for each stage's own rate.
    """

    epochs: int = 1
    batch_size: int = 8
    opt_class: object = None
    warmup_fraction: float = 0.1
    lora: object = None
    layerwise_lr: object = None
    train_encoder: bool = False
    adaptor_lr: object = None
    interpolation_alphas: list = field(default_factory=list)

    def __post_init__(self):
        """Alphas from the yaml (``null``: none) as floats; checks ``adaptor_lr``."""
        self.interpolation_alphas = [float(alpha) for alpha in self.interpolation_alphas or []]
        if self.adaptor_lr is not None and float(self.adaptor_lr) < 0:
            raise ValueError(
                f"finetune: adaptor_lr is {self.adaptor_lr}; give a rate >= 0, or null for "
                "each stage's own rate."
            )

    def adaptor_lr_scale(self, lr):
        """The adaptor's rate relative to a stage's (``adaptor_lr / lr``; 1.0 when None).

        Arguments
        ---------
        lr : float
            The stage's base learning rate.

        Returns
        -------
        float
        """
        if self.adaptor_lr is None:
            return 1.0
        return float(self.adaptor_lr) / float(lr)


@dataclass
class ImportanceSettings:
    """The importance stage of a study and its zeroing check.

    Arguments
    ---------
    estimator : str
        ``taylor`` (the paper's ``|g * w|``) or another of the package's estimators.
    fraction : float
        Share of the importance set scored.
    topk : list of float
        Top-k percents reported per layer.
    zeroing_fraction : float
        Share of the most important parameters zeroed in the zeroing check.
    batch_size : int
        Batch size of the scoring passes.
    scope : str
        Which parameters are scored (``llm`` or ``decoder_linear``).

    Example
    -------
    >>> ImportanceSettings(topk=[1.0, 3.0]).topk
    (1.0, 3.0)
    """

    estimator: str = "taylor"
    fraction: float = 1.0
    topk: tuple = (1.0, 3.0, 5.0)
    zeroing_fraction: float = 0.03
    batch_size: int = 8
    scope: str = "llm"

    def __post_init__(self):
        """Top-k percents as a tuple (the yaml gives a list)."""
        self.topk = tuple(float(percent) for percent in self.topk)


@dataclass
class AlignmentSettings:
    """Stage 1 of the real-model study: the adaptor aligned with the LLM frozen.

    Arguments
    ---------
    objectives : list of str
        Run in order, each from the adaptor the previous one left:
        ``ctc_embeddings`` (CTC onto the LLM's input embeddings, stage 1a),
        ``lm_loss`` (the frozen LLM's loss on the targets, stage 1b),
        ``text_teacher`` (KL to the LLM's distributions given the written question).
    ctc_epochs, ctc_lr, ctc_scale, ctc_norm_weight
        Stage 1a: epochs (0 skips it), rate, logit scale of the cosine
        similarities, weight of the norm penalty.
    targets : str
        Stage 1b's targets: ``answer`` or ``transcript`` (the question itself,
        with ``transcript_prompt``).
    transcript_prompt : ChatPrompt or None
        The prompt of ``targets: transcript``.
    epochs, lr
        Stages 1b and distillation: epochs and rate.
    teacher_topk : int
        Teacher tokens cached per answer position (``text_teacher``).
    batch_size : int
        Training and validation batch size of every objective.
    opt_class : callable or None
        Builds the optimizer (None: AdamW without weight decay).
    warmup_fraction : float
        Share of each objective's steps with a linear warmup (then cosine decay).

    Example
    -------
    >>> AlignmentSettings(objectives=["lm_loss", "text_teacher"]).objectives
    ['lm_loss', 'text_teacher']
    >>> AlignmentSettings(objectives=["ctc"])
    Traceback (most recent call last):
    ...
    ValueError: align: objectives: unknown ['ctc']; use some of ('ctc_embeddings', 'lm_loss', 'text_teacher').
    >>> AlignmentSettings(objectives=["distill"])
    Traceback (most recent call last):
    ...
    ValueError: align: objectives: {'distill': 'text_teacher'} (old name: new name, one per concept).
    """

    objectives: list = field(default_factory=lambda: ["ctc_embeddings", "lm_loss"])
    ctc_epochs: int = 4
    ctc_lr: float = 1e-3
    ctc_scale: float = 30.0
    ctc_norm_weight: float = 1.0
    targets: str = "answer"
    transcript_prompt: object = None
    epochs: int = 3
    lr: float = 1e-3
    teacher_topk: int = 64
    batch_size: int = 8
    opt_class: object = None
    warmup_fraction: float = 0.1

    def __post_init__(self):
        """Checks the objectives and the targets; AdamW without weight decay by default."""
        if self.opt_class is None:
            self.opt_class = functools.partial(torch.optim.AdamW, weight_decay=0.0)
        self.objectives = list(self.objectives or ["ctc_embeddings", "lm_loss"])
        renamed = {old: RENAMED_VALUES[old] for old in self.objectives if old in RENAMED_VALUES}
        if renamed:
            raise ValueError(f"align: objectives: {renamed} (old name: new name, one per concept).")
        unknown = [name for name in self.objectives if name not in ALIGN_OBJECTIVES]
        if unknown:
            raise ValueError(
                f"align: objectives: unknown {unknown}; use some of {ALIGN_OBJECTIVES}."
            )
        if self.targets not in ALIGN_TARGETS:
            raise ValueError(
                f"align: targets {self.targets!r} unknown; use one of {ALIGN_TARGETS}."
            )


@dataclass
class StudyModels:
    """How a study loads its models (each call a fresh copy).

    Arguments
    ---------
    llm : callable
        ``llm()`` returns the pretrained LLM.
    speech_model : callable
        ``speech_model()`` returns a ``SpeechLLM`` (pretrained LLM, frozen
        encoder, adaptor) for a fine-tuning stage, no strategy applied.
    """

    llm: object
    speech_model: object = None


@dataclass
class StudyData:
    """The datasets and manifests the stages share.

    Arguments
    ---------
    test_sets : dict
        ``{column prefix: {"text": dataset, "speech": dataset}}``: accuracy
        columns are ``<prefix>_t2t`` / ``<prefix>_s2t`` (``t2t`` / ``s2t`` for
        the prefix ``""``); per-item answers go to ``<column>.tsv``.
    importance_set : DynamicItemDataset
        Written QA whose answers' loss scores the parameters.
    perplexity_set : DynamicItemDataset
        Written QA for text perplexity and the zeroing check.
    train_set, valid_set : DynamicItemDataset or None
        Spoken training / validation QA of the fine-tuning and alignment stages.
    speech_importance_set : DynamicItemDataset or None
        Spoken QA for speech importance after fine-tuning (None: not scored).
    replay_set : DynamicItemDataset or None
        Written training QA that text-side mitigations train on.
    datasets : dict
        Every prepared dataset by split (the alignment's ``align`` split).
    manifests : dict
        Every prepared manifest by split (the cascade reads the test sets').
    test_manifests : dict
        ``{column prefix: spoken test manifest}`` for the cascade reference.
    """

    test_sets: dict
    importance_set: object
    perplexity_set: object
    train_set: object = None
    valid_set: object = None
    speech_importance_set: object = None
    replay_set: object = None
    datasets: dict = None
    manifests: dict = None
    test_manifests: dict = None


@dataclass
class StageTraining:
    """How a stage trains: what ``StudyRunner.stage_brain`` builds its Brain with.

    Arguments
    ---------
    lr : float
        Base learning rate.
    epochs : int
        Training epochs (0: scoring only).
    opt_class : callable or None
        Builds the optimizer from the strategy's parameter groups.
    warmup_fraction : float
        Share of the steps with a linear warmup (then cosine decay).
    brain_class : type or None
        A ``SpeechLLMBrain`` subclass (None: ``SpeechLLMBrain``).
    epoch_counter, lr_schedule, train_logger, checkpointer : object or None
        The stage's own objects from its yaml (None: built for the stage's
        folder from the fields above).
    """

    lr: float
    epochs: int
    opt_class: object = None
    warmup_fraction: float = 0.1
    brain_class: object = None
    epoch_counter: object = None
    lr_schedule: object = None
    train_logger: object = None
    checkpointer: object = None
