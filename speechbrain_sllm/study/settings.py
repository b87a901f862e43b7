"""What a study trains and measures, as objects its yaml builds.

A study yaml keeps its settings as top-level keys (overridable on the command
line: ``--strategies=[full_ft,lora] --ft_epochs=2``) and gathers them into
these objects, which its script hands to ``StudyRunner``:

* ``FinetuneSettings``: the strategy loop (strategies, epochs, rates, optimizer,
  LoRA and layer-wise LR settings, mitigations, weight interpolation);
* ``ImportanceSettings``: the importance stage and the zeroing check;
* ``AlignmentSettings``: stage 1 of the real-model study (adaptor alignment).

Decoding and scoring settings are ``speechbrain_sllm.evaluation.EvaluationSettings``.

Authors
 * speechbrain-sllm developers 2026
"""

from dataclasses import dataclass, field

ALIGN_OBJECTIVES = ("ctc_embeddings", "lm_loss", "distill")
ALIGN_TARGETS = ("answer", "transcript")


@dataclass
class FinetuneSettings:
    """The strategy loop of a study (stage 2: speech fine-tuning).

    Arguments
    ---------
    strategies : list of str
        Strategy names run in order; ``<strategy>+<choice>`` adds entries of
        ``mitigation_choices`` (e.g. ``full_ft+replay``).
    epochs : int
        Training epochs per strategy.
    batch_size : int
        Training and validation batch size.
    lr : float or dict
        Base learning rate, or ``{strategy: rate}`` (a full name such as
        ``full_ft+replay`` first, then its strategy).
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
        Rate of the adaptor (and a trained encoder) in every strategy; None:
        the strategy's own rate.
    mitigation_choices : dict
        ``{name: mitigation}`` a strategy name can add (``TextReplay``,
        ``TextDistillation``, ``ImportanceAnchor``, or a ``LayerwiseLR`` that
        replaces the layer-wise rule).
    interpolation_alphas : list of float
        After each strategy, the LLM at ``base + alpha (fine-tuned - base)``
        is scored for each alpha (empty: none).

    Example
    -------
    >>> settings = FinetuneSettings(["full_ft"], 1, 8, {"full_ft": 1e-4}, None)
    >>> settings.lr_of("full_ft+replay")
    0.0001
    >>> FinetuneSettings(["full_ft"], 1, 8, {"lora": 1e-4}, None).lr_of("full_ft")
    Traceback (most recent call last):
    ...
    ValueError: ft_lr has no rate for 'full_ft' (nor 'full_ft'); it has ['lora'].
    >>> FinetuneSettings(["lora"], 1, 8, {"lora": 2e-4}, None, adaptor_lr=2e-5).adaptor_lr_scale("lora")
    0.1
    >>> FinetuneSettings(["lora"], 1, 8, 2e-4, None, adaptor_lr=-1)
    Traceback (most recent call last):
    ...
    ValueError: ft_adaptor_lr is -1; give a rate >= 0, or null for each strategy's own rate.
    """

    strategies: list
    epochs: int
    batch_size: int
    lr: object
    opt_class: object
    warmup_fraction: float = 0.1
    lora: object = None
    layerwise_lr: object = None
    train_encoder: bool = False
    adaptor_lr: object = None
    mitigation_choices: dict = field(default_factory=dict)
    interpolation_alphas: list = field(default_factory=list)

    def __post_init__(self):
        """Empty choices and alphas from the yaml (``null``) become empty containers; checks ``adaptor_lr``."""
        self.mitigation_choices = dict(self.mitigation_choices or {})
        self.interpolation_alphas = [float(alpha) for alpha in self.interpolation_alphas or []]
        if self.adaptor_lr is not None and float(self.adaptor_lr) < 0:
            raise ValueError(
                f"ft_adaptor_lr is {self.adaptor_lr}; give a rate >= 0, or null for each "
                "strategy's own rate."
            )

    def lr_of(self, name):
        """The base learning rate of a strategy name.

        Arguments
        ---------
        name : str
            A strategy name, optionally with ``+<choice>`` parts.

        Returns
        -------
        float
        """
        if not isinstance(self.lr, dict):
            return float(self.lr)
        strategy = name.split("+")[0]
        for key in (name, strategy):
            if key in self.lr:
                return float(self.lr[key])
        raise ValueError(
            f"ft_lr has no rate for {name!r} (nor {strategy!r}); it has {sorted(self.lr)}."
        )

    def adaptor_lr_scale(self, name):
        """The adaptor's rate relative to a strategy's (``adaptor_lr / lr_of(name)``).

        Arguments
        ---------
        name : str
            A strategy name, optionally with ``+<choice>`` parts.

        Returns
        -------
        float
            1.0 when ``adaptor_lr`` is None.
        """
        if self.adaptor_lr is None:
            return 1.0
        return float(self.adaptor_lr) / self.lr_of(name)


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
        ``distill`` (KL to the LLM's distributions given the written question).
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
    distill_topk : int
        Teacher tokens cached per answer position (``distill``).

    Example
    -------
    >>> AlignmentSettings(objectives=["lm_loss", "distill"]).objectives
    ['lm_loss', 'distill']
    >>> AlignmentSettings(objectives=["ctc"])
    Traceback (most recent call last):
    ...
    ValueError: align_objectives: unknown ['ctc']; use some of ('ctc_embeddings', 'lm_loss', 'distill').
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
    distill_topk: int = 64

    def __post_init__(self):
        """Checks the objectives and the targets."""
        self.objectives = list(self.objectives or ["ctc_embeddings", "lm_loss"])
        unknown = [name for name in self.objectives if name not in ALIGN_OBJECTIVES]
        if unknown:
            raise ValueError(
                f"align_objectives: unknown {unknown}; use some of {ALIGN_OBJECTIVES}."
            )
        if self.targets not in ALIGN_TARGETS:
            raise ValueError(f"align_targets {self.targets!r} unknown; use one of {ALIGN_TARGETS}.")
