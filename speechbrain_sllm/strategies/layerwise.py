"""Layer-wise learning rates: depth rules and the importance-guided rule.

The importance rule (Wang et al., ICASSP 2026): ``lr_i = base * (1 - lam * (I_i - min I) / (max I - min I))``
with ``I`` the textual importance of decoder layer ``i`` in the ORIGINAL LLM, so the
most text-important layer trains at ``(1 - lam)`` times the base rate.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import os
from dataclasses import dataclass

RULES = ("constant", "depth", "importance")
GRANULARITIES = ("layer", "module")


@dataclass
class LayerwiseLR:
    """Configuration of layer-wise learning rates for the LLM's decoder layers.

    Arguments
    ---------
    rule : str
        ``constant`` (every layer at the base rate), ``depth``
        (``decay ** (L - d)`` for a layer at depth ``d = i + 1``; embeddings are
        depth 0) or ``importance`` (the paper's rule, from ``profile``).
    decay : float
        Per-layer decay of the ``depth`` rule, in ``(0, 1]``.
    lam : float
        Lambda of the ``importance`` rule, in ``[0, 1]``.
    profile : str or None
        Importance profile JSON written by the importance stage (``importance`` rule).
    aggregate : str
        Which per-layer aggregate of the profile to use (``sum``, ``mean``, or
        ``top3`` style shares such as ``top1``, ``top5``).
    non_layer_scale : float
        LR scale of LLM parameters outside decoder layers (embeddings, final
        norm, LM head) for the ``constant`` and ``importance`` rules.
    granularity : str
        ``layer`` (the paper: one rate per decoder layer) or ``module``: the
        ``importance`` rule applied per (layer, module type), each module type's
        rates from its own per-layer importance sums (the profile's
        ``layer_module_sum``); a layer's other parameters (norms) keep the
        layer's rate.

    Example
    -------
    >>> LayerwiseLR(rule="depth", decay=0.5).scales(3)
    [0.25, 0.5, 1.0]
    >>> LayerwiseLR(rule="wrong")
    Traceback (most recent call last):
    ...
    ValueError: LayerwiseLR: rule 'wrong' is unknown; choose one of ('constant', 'depth', 'importance').
    """

    rule: str = "importance"
    decay: float = 0.9
    lam: float = 0.4
    profile: str = None
    aggregate: str = "sum"
    non_layer_scale: float = 1.0
    granularity: str = "layer"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"LayerwiseLR: granularity {self.granularity!r} is unknown; choose one of "
                f"{GRANULARITIES}."
            )
        if self.granularity == "module" and self.rule != "importance":
            raise ValueError("LayerwiseLR: granularity 'module' needs rule 'importance'.")
        if self.rule not in RULES:
            raise ValueError(f"LayerwiseLR: rule {self.rule!r} is unknown; choose one of {RULES}.")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"LayerwiseLR: decay must be in (0, 1], got {self.decay}.")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"LayerwiseLR: lam must be in [0, 1], got {self.lam}.")
        if self.rule == "importance" and not self.profile:
            raise ValueError(
                "LayerwiseLR: rule 'importance' needs `profile`, the JSON written by the "
                "importance stage on the original LLM (e.g. importance/base/profile.json)."
            )

    def scales(self, num_layers):
        """LR multipliers of decoder layers ``0 .. num_layers - 1``.

        Arguments
        ---------
        num_layers : int
            Decoder layers of the LLM.

        Returns
        -------
        list of float
        """
        if self.rule == "constant":
            return [1.0] * num_layers
        if self.rule == "depth":
            return [self.decay ** (num_layers - (i + 1)) for i in range(num_layers)]
        importance = load_layer_importance(self.profile, num_layers, self.aggregate)
        return importance_scales(importance, self.lam)

    def module_scales(self, num_layers):
        """LR multipliers per module type and layer (``granularity: module``).

        Arguments
        ---------
        num_layers : int
            How many decoder layers the LLM has (checked against the profile).

        Returns
        -------
        dict
            ``{module type: [scale per layer]}`` (empty for ``granularity: layer``).
        """
        if self.granularity != "module":
            return {}
        self.scales(num_layers)  # checks the profile's layer count
        with open(self.profile) as handle:
            sums = json.load(handle).get("layer_module_sum")
        if not sums:
            raise ValueError(
                f"Importance profile {self.profile!r} has no 'layer_module_sum'; granularity "
                "'module' needs a profile written by this package's importance stage."
            )
        return {module: importance_scales(values, self.lam) for module, values in sums.items()}

    def non_layer(self, num_layers):
        """LR multiplier of LLM parameters outside the decoder layers."""
        if self.rule == "depth":
            return self.decay**num_layers
        return self.non_layer_scale


def importance_scales(importance, lam):
    """The paper's rule: ``1 - lam * (I_i - min) / (max - min)``.

    Arguments
    ---------
    importance : list of float
        Per-layer importance ``I_i``.
    lam : float
        Strength; the most important layer gets ``1 - lam``.

    Returns
    -------
    list of float

    Example
    -------
    >>> importance_scales([1.0, 3.0, 2.0], 0.4)
    [1.0, 0.6, 0.8]
    """
    low, high = min(importance), max(importance)
    if high == low:
        return [1.0] * len(importance)
    return [round(1.0 - lam * (value - low) / (high - low), 12) for value in importance]


def load_layer_importance(path, num_layers, aggregate="sum"):
    """Reads the per-layer importance of a profile JSON and checks its layer count.

    Arguments
    ---------
    path : str
        Profile written by the importance stage.
    num_layers : int
        Decoder layers of the LLM being trained.
    aggregate : str
        ``sum``, ``mean`` or a ``topK`` share key present in the profile.

    Returns
    -------
    list of float
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Importance profile {path!r} not found; run the importance stage on the "
            "original LLM first or fix `layerwise_lr.profile` in the yaml."
        )
    with open(path) as handle:
        profile = json.load(handle)
    layers = profile.get("layers")
    if not layers:
        raise ValueError(f"Importance profile {path!r} has no 'layers' entry.")
    if len(layers) != num_layers:
        raise ValueError(
            f"Importance profile {path!r} has {len(layers)} layers but the LLM has "
            f"{num_layers}; compute the profile on the same LLM you fine-tune."
        )
    if aggregate not in layers[0]:
        raise ValueError(
            f"Importance profile {path!r} has no per-layer aggregate {aggregate!r}; "
            f"available: {sorted(k for k in layers[0] if k != 'layer')}."
        )
    return [float(layer[aggregate]) for layer in layers]
