"""Compare the textual importance of any two causal LMs: a base LLM and one tuned from it.

The paper's analysis for a speech LLM that this project did not train: both
models are scored on the same text (``|dL/dw * w|`` by default), each side's
importance is aggregated per decoder layer and module, and the shift between
them is measured as the study measures it (JS / KL divergence, Spearman, EMD
over depth, peak move, top-k IoU), beside each side's zeroing check and the
row / column concentration of its top parameters.

Outputs of ``compare_checkpoints`` (written into a staging folder, then moved
into ``output_folder``, so a failed run leaves the folder as it was):
``shift.json``, ``report.md``, ``base/`` and ``tuned/`` (``profile.json``,
``layers.csv``, ``modules.csv``, ``structure.json``) and ``plots/``.

Authors
 * speechbrain-sllm developers 2026
"""

import gc
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from speechbrain_sllm.data.prompts import ChatPrompt
from speechbrain_sllm.data.tokenizers import HFTokenizer
from speechbrain_sllm.evaluation import EvaluationSettings, QAEvaluator
from speechbrain_sllm.importance.aggregate import ScoreSet, aggregate
from speechbrain_sllm.importance.checkpoints import load_tuned_llm
from speechbrain_sllm.importance.report import (
    plot_concentration,
    plot_module_heatmap,
    save_profile,
    write_importance_plots,
)
from speechbrain_sllm.importance.shift import layer_shift, topk_overlap
from speechbrain_sllm.importance.stage import accumulate_importance, zeroing_check
from speechbrain_sllm.importance.structure import write_structure
from speechbrain_sllm.importance.text_sets import text_set
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.outputs import write_json

logger = logging.getLogger(__name__)
SIDES = ("base", "tuned")
ESTIMATORS = ("taylor", "taylor_batch", "fisher", "second_order")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class CompareSettings:
    """How both sides are scored (the same for both).

    Arguments
    ---------
    estimator : str
        ``taylor`` (``|sum g * w|``, the paper's), ``taylor_batch``, ``fisher``
        or ``second_order``.
    scope : str
        ``llm`` (every parameter) or ``decoder_linear`` (the decoder layers'
        projection matrices: for LLMs with tied embeddings).
    fraction : float
        Fraction of the text items scored, in (0, 1].
    batch_size : int
        Items per forward / backward pass.
    topk_percents : list of float
        Global top-k shares per layer and the IoUs reported.
    zeroing_fraction : float
        Fraction zeroed in the zeroing check (0 skips it).
    device : str
        ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun, each rank its own GPU).
    dtype : str
        The models' dtype: ``float32``, ``bfloat16`` or ``float16``.
    fsdp : bool
        Shard each model with FSDP2 over the torchrun processes.
    seed : int
        Seed of the item subset and of the zeroing check's random draw.
    shared_only : bool
        Compare the shared part of two checkpoints whose tensors differ.
    instruction : str
        The user turn of QA items (``{question}`` is replaced).
    system_prompt : str or None
        The system turn of QA items.

    Example
    -------
    >>> CompareSettings(fraction=0).check()
    Traceback (most recent call last):
     ...
    ValueError: --fraction 0 must be in (0, 1].
    """

    estimator: str = "taylor"
    scope: str = "llm"
    fraction: float = 1.0
    batch_size: int = 8
    topk_percents: list = field(default_factory=lambda: [1.0, 3.0, 5.0])
    zeroing_fraction: float = 0.03
    device: str = "cpu"
    dtype: str = "float32"
    fsdp: bool = False
    seed: int = 0
    shared_only: bool = False
    instruction: str = "{question}"
    system_prompt: str = None

    def check(self):
        """Raises ``ValueError`` naming the option, its value and what is allowed."""
        choices = {"estimator": ESTIMATORS, "scope": ("llm", "decoder_linear"), "dtype": DTYPES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"--{key} {getattr(self, key)!r} unknown; use one of {allowed}.")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction {self.fraction} must be in (0, 1].")
        if not 0 <= self.zeroing_fraction < 1:
            raise ValueError(f"--zeroing_fraction {self.zeroing_fraction} must be in [0, 1).")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"--batch_size {self.batch_size} must be a positive integer.")
        if not self.topk_percents or not all(0 < p < 100 for p in self.topk_percents):
            raise ValueError(f"--topk_percents {self.topk_percents} must lie in (0, 100).")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device {self.device!r}: use cpu, cuda or cuda:N.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"--device {self.device}: torch sees no CUDA device; use --device=cpu."
            )
        if "{question}" not in self.instruction:
            raise ValueError(f"--instruction {self.instruction!r} must contain '{{question}}'.")


def rank_device(device):
    """``device``, or under torchrun with ``cuda`` this rank's own GPU."""
    if device == "cuda" and torch.distributed.is_initialized():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def score_model(llm, dataset, prompt, tokenizer, settings, excluded=()):
    """Scores one side: importance accumulated on ``dataset``, aggregated, zeroing check.

    Arguments
    ---------
    llm : transformers.PreTrainedModel
        The side's causal LM.
    dataset : DynamicItemDataset
        The text set (``text_sets.text_set``).
    prompt : ChatPrompt
        The prompt builder.
    tokenizer : HFTokenizer
        The tokenizer.
    settings : CompareSettings
        Scoring settings.
    excluded : iterable of str
        LLM parameter names left out of the comparison (``--shared_only``).

    Returns
    -------
    profile : dict
        Per-layer / per-module aggregate with metadata and ``zeroing``.
    scores : dict
        ``{name: fp32 scores}`` (this rank's shards under FSDP).
    sharded : bool
        Whether the scores are shards (FSDP).
    """
    device = rank_device(settings.device)
    model = SpeechLLM(llm).to(device)
    if settings.fsdp:
        from speechbrain_sllm.fsdp import shard_speech_llm

        shard_speech_llm(model)
    evaluator = QAEvaluator(
        model,
        prompt,
        tokenizer,
        device,
        settings=EvaluationSettings(batch_size=settings.batch_size),
    )
    accumulator = accumulate_importance(
        evaluator,
        dataset,
        estimator=settings.estimator,
        mode="text",
        scope=settings.scope,
        fraction=settings.fraction,
        batch_size=settings.batch_size,
        seed=settings.seed,
        progress=if_main_process(),
    )
    skipped = {f"llm.{name}" for name in excluded}
    accumulator.check_finite()
    scores = {
        name: accumulator.score(name).cpu() for name in accumulator.params if name not in skipped
    }
    score_set = ScoreSet(scores, scores.__getitem__, accumulator.sharded)  # each computed once
    profile = aggregate(score_set, tuple(settings.topk_percents))
    profile.update(
        estimator=settings.estimator, mode="text", scope=settings.scope,
        num_batches=accumulator.num_backward, excluded=sorted(excluded),
    )  # fmt: skip
    if settings.zeroing_fraction:
        profile["zeroing"] = zeroing_check(
            evaluator, dataset, accumulator, settings.zeroing_fraction, "text",
            settings.seed, settings.batch_size,
        )  # fmt: skip
    return profile, scores, accumulator.sharded


def side_summary(profile):
    """A few headline numbers of one side for ``shift.json`` and the report."""
    values = [layer["sum"] for layer in profile["layers"]]
    return {
        "peak_layer": max(range(len(values)), key=values.__getitem__),
        "numel": profile["numel"],
        "zeroing": profile.get("zeroing"),
        "excluded": profile.get("excluded", []),
    }


def shift_metrics(profiles, scores, sharded, topk_percents):
    """Every shift metric of the study between the two sides.

    Returns
    -------
    dict
        ``layer_shift``'s keys (``js``, ``kl``, ``spearman``, ``emd_layers``,
        ``peak_before``, ``peak_after``, ...), ``top3_iou`` and ``topk_iou``
        (``{percent: IoU}``).
    """
    sums = [[layer["sum"] for layer in profiles[side]["layers"]] for side in SIDES]
    shift = layer_shift(*sums)
    sets = [ScoreSet(scores[side].keys(), scores[side].__getitem__, sharded) for side in SIDES]
    shift["topk_iou"] = {str(p): topk_overlap(*sets, p / 100) for p in topk_percents}
    shift["top3_iou"] = topk_overlap(*sets, 0.03)
    return shift


def write_plots(profiles, structures, folder):
    """The study's plots for the two sides (layer shares, top-3% shares, heatmaps, rows / columns)."""
    write_importance_plots({"base": profiles["base"], "tuned": profiles["tuned"]}, folder)
    plot_module_heatmap(profiles["tuned"], os.path.join(folder, "tuned_module_heatmap.png"))
    if all(structures.values()):
        summaries = {side: {"modules": structures[side]["summary"]["modules"]} for side in SIDES}
        plot_concentration(summaries, os.path.join(folder, "row_column_concentration.png"))


def markdown_report(result):
    """``report.md``: what was compared, on what text, and every metric, as a reader wants it."""
    shift, sides = result["shift"], result["sides"]
    lines = [
        "# Textual importance: base against tuned",
        "",
        f"- base: `{result['base']}`",
        f"- tuned: `{result['tuned']}`" + (f" (tensors under `{result['tuned_prefix']}`)" if result["tuned_prefix"] else ""),
        f"- text: `{result['text']['file']}` ({result['text']['format']}, {result['text']['items']} items, "
        f"{result['text']['skipped']} skipped; {100 * result['settings']['fraction']:g}% of them scored)",
        f"- estimator `{result['settings']['estimator']}`, scope `{result['settings']['scope']}`, "
        f"dtype `{result['settings']['dtype']}`, seed {result['settings']['seed']}",
        "",
        "## Shift of the layer-wise distribution (base -> tuned)",
        "",
        "| JS (bits) | KL (bits) | Spearman | EMD (layers) | peak layer | total ratio | "
        + " | ".join(f"top-{p}% IoU" for p in shift["topk_iou"]) + " |",
        "|---" * (6 + len(shift["topk_iou"])) + "|",
        f"| {shift['js']:.3g} | {shift['kl']:.3g} | {shift['spearman']:.4f} | {shift['emd_layers']:.3f} "
        f"| {shift['peak_before']} -> {shift['peak_after']} | {shift['total_ratio']:.3f} | "
        + " | ".join(f"{v:.3f}" for v in shift["topk_iou"].values()) + " |",
        "",
        "## Each side",
        "",
        "| side | parameters scored | peak layer | PPL | PPL, top zeroed | random zeroed "
        "| bottom zeroed | top rows share | top columns share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for side in SIDES:
        summary, zeroing = sides[side], sides[side]["zeroing"] or {}
        conc = sides[side].get("concentration") or {}
        cells = [
            f"{zeroing[k]:.4g}" if k in zeroing else "-"
            for k in ("none", "top", "random", "bottom")
        ]
        shares = [conc_share(conc, key) for key in ("rows", "cols")]
        lines.append(
            f"| {side} | {summary['numel']:,} | {summary['peak_layer']} | " + " | ".join(cells + shares) + " |"
        )  # fmt: skip
    lines += [
        "",
        "Importance is `|dL/dw * w|` summed over the scored items (estimator above); the layer",
        "profiles are normalised before JS / KL / EMD. Rows / columns: the share of the top-3%",
        "parameters held by the fullest 5% of rows / columns (against a per-matrix permutation",
        "in `*/structure.json`). Plots in `plots/`.",
    ]
    if any(sides[side]["excluded"] for side in SIDES):
        excluded = sides["tuned"]["excluded"]
        lines.append(
            f"\nLeft out (--shared_only): {len(excluded)} tensor(s): {', '.join(excluded[:8])}"
        )
    return "\n".join(lines) + "\n"


def conc_share(concentration, key, quantile=0.05):
    """``observed% (permuted%)``: the top parameters' share in the fullest rows or columns.

    Example
    -------
    >>> conc_share({"rows": {0.05: 0.2}, "rows_baseline": {0.05: 0.05}}, "rows")
    '20.0% (5.0%)'
    """
    observed = concentration.get(key, {}).get(quantile)
    if observed is None:
        return "-"
    baseline = concentration.get(f"{key}_baseline", {}).get(quantile)
    return f"{100 * observed:.1f}%" + (f" ({100 * baseline:.1f}%)" if baseline is not None else "")


def publish(staging, output_folder):
    """Moves every entry of ``staging`` into ``output_folder`` (replacing same names), then removes it."""
    for name in sorted(os.listdir(staging)):
        target = os.path.join(output_folder, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def load_side(side, base, tuned, tuned_prefix, settings, trust_remote_code):
    """The side's LLM and the base parameters it leaves out."""
    kwargs = {"dtype": settings.dtype, "trust_remote_code": trust_remote_code}
    if side == "base":
        return load_causal_lm(base, **kwargs), []
    return load_tuned_llm(base, tuned, tuned_prefix, settings.shared_only, **kwargs)


def compare_checkpoints(
    base, tuned, text_file, output_folder, tuned_prefix=None, settings=None, trust_remote_code=False
):
    """Scores both models on ``text_file`` and writes the comparison into ``output_folder``.

    The tuned side is loaded (and checked against the base) before anything
    is scored, so a refused pair costs seconds; the models are scored one
    after the other, each freed before the next loads.

    Arguments
    ---------
    base : str
        The base LLM: a local HF folder or hub id.
    tuned : str
        The tuned LLM: HF folder / hub id, peft adapter folder, or a composite
        checkpoint file or folder (with ``tuned_prefix``).
    text_file : str
        The text both sides are scored on (``text_sets`` formats).
    output_folder : str
        Where the outputs go.
    tuned_prefix : str or None
        Prefix of the LLM's tensors in a composite checkpoint.
    settings : CompareSettings or None
        Scoring settings.
    trust_remote_code : bool
        Let transformers run the checkpoints' own code (off by default).

    Returns
    -------
    dict
        The content of ``shift.json``.
    """
    settings = settings or CompareSettings()
    settings.check()
    torch.manual_seed(settings.seed)
    hf_tokenizer = HFTokenizer(base, trust_remote_code=trust_remote_code)
    prompt = ChatPrompt(hf_tokenizer, settings.instruction, settings.system_prompt)
    dataset, description = text_set(text_file, prompt, hf_tokenizer.tokenizer)
    # the tuned side first: a pair that cannot be compared is refused before any scoring
    llm, excluded = load_side("tuned", base, tuned, tuned_prefix, settings, trust_remote_code)
    profiles, scores, sharded = {}, {}, False
    for side in ("tuned", "base"):
        if llm is None:
            llm, _ = load_side(side, base, tuned, tuned_prefix, settings, trust_remote_code)
        profiles[side], scores[side], sharded = score_model(
            llm, dataset, prompt, hf_tokenizer, settings, excluded
        )
        llm = None  # freed before the next side loads
        gc.collect()
    result = {
        "base": base, "tuned": tuned, "tuned_prefix": tuned_prefix, "text": description,
        "settings": asdict(settings),
    }  # fmt: skip
    shift = shift_metrics(profiles, scores, sharded, settings.topk_percents)
    staging = os.path.join(output_folder, f".staging-compare-{os.getpid()}")
    if if_main_process():
        os.makedirs(staging, exist_ok=True)
        try:
            write_outputs(result, profiles, scores, shift, sharded, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # the folder stays as it was
            raise
        publish(staging, output_folder)
    ddp_barrier()
    return shift


def write_outputs(result, profiles, scores, shift, sharded, staging):
    """Writes every output file of a comparison into ``staging``."""
    structures = {}
    for side in SIDES:
        save_profile(profiles[side], os.path.join(staging, side))
        structures[side] = None
        if not sharded:  # per-matrix rows / columns need whole tensors
            structures[side] = write_structure(scores[side], os.path.join(staging, side))
    result["sides"] = {side: side_summary(profiles[side]) for side in SIDES}
    for side in SIDES:
        summary = structures[side] and structures[side]["summary"]
        result["sides"][side]["concentration"] = summary and summary.get("all")
    result["shift"] = shift
    write_plots(profiles, structures, os.path.join(staging, "plots"))
    write_json(
        {**shift, **{k: v for k, v in result.items() if k != "shift"}},
        os.path.join(staging, "shift.json"),
    )
    with open(os.path.join(staging, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown_report(result))
