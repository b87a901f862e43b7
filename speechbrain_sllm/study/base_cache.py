"""The base stage's outputs kept for a rerun with the same base LLM, text sets and settings.

Scoring the base LLM (accuracy, perplexity, importance, zeroing check) does not
depend on anything a study's later stages change, and on a real model it takes
minutes. ``BaseStage`` writes what it computed beside a record of its inputs
(``<output>/base/base_cache.json``, the scores in ``importance/base/scores.pt``)
and reuses them only when every input is the same: the LLM's weights, the
prompt, each text set's items, the importance and evaluation settings, the
seed and the scored input modes. When one differs, the log names it and the
stage scores again.

Authors
 * speechbrain-sllm developers 2026
"""

import dataclasses
import hashlib
import json
import logging
import os

import torch
from speechbrain.utils.distributed import if_main_process

from speechbrain_sllm.model.tensor_cache import module_key
from speechbrain_sllm.outputs import write_json

logger = logging.getLogger(__name__)
CACHE_FILE = "base_cache.json"
SCORES_FILE = "scores.pt"


def dataset_key(dataset):
    """A digest of a dataset's items (ids, in order, and every field of each).

    Arguments
    ---------
    dataset : DynamicItemDataset
        A QA dataset.

    Returns
    -------
    str

    Example
    -------
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> one = DynamicItemDataset({"a": {"question": "Where?", "answer": "Here"}})
    >>> two = DynamicItemDataset({"a": {"question": "Where?", "answer": "There"}})
    >>> dataset_key(one) == dataset_key(one), dataset_key(one) == dataset_key(two)
    (True, False)
    """
    items = [[item_id, dataset.data[item_id]] for item_id in dataset.data_ids]
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def settings_record(settings):
    """A settings object as plain JSON values (a dataclass's fields; else its ``repr``)."""
    if dataclasses.is_dataclass(settings):
        return json.loads(json.dumps(dataclasses.asdict(settings), default=repr))
    return repr(settings)


def base_inputs(runner, model, modes):
    """What the base stage's outputs depend on, as a record to compare.

    Arguments
    ---------
    runner : StudyRunner
        The study (its data, settings, prompt and seed).
    model : SpeechLLM
        The base model.
    modes : tuple of str
        The input modes the stage scores.

    Returns
    -------
    dict
    """
    data = runner.data
    sets = {"importance_set": data.importance_set, "perplexity_set": data.perplexity_set}
    for prefix, pair in data.test_sets.items():
        sets.update({f"test_sets[{prefix!r}][{mode!r}]": pair[mode] for mode in modes})
    prompt = runner.hparams["prompt"]
    return {
        "llm": module_key(model.llm),
        "prompt": [type(prompt).__name__, getattr(prompt, "instruction", None)],
        "data": {name: dataset_key(dataset) for name, dataset in sets.items()},
        "importance": settings_record(runner.importance_settings),
        "evaluation": settings_record(runner.evaluation),
        "seed": runner.hparams["seed"],
        "modes": list(modes),
    }


def load_base_cache(folder, importance_folder, inputs):
    """The cached ``(results, profile, scores)`` when made from ``inputs``, else None.

    Arguments
    ---------
    folder : str
        The base stage's folder (``base_cache.json``).
    importance_folder : str
        ``importance/base/`` (``profile.json``, ``scores.pt``).
    inputs : dict
        From ``base_inputs``.

    Returns
    -------
    tuple or None
    """
    path = os.path.join(folder, CACHE_FILE)
    scores_path = os.path.join(importance_folder, SCORES_FILE)
    profile_path = os.path.join(importance_folder, "profile.json")
    if not all(os.path.isfile(p) for p in (path, scores_path, profile_path)):
        return None
    with open(path) as handle:
        cached = json.load(handle)
    changed = [key for key in inputs if cached["inputs"].get(key) != inputs[key]]
    if changed:
        logger.warning(
            f"base stage: {path} was made with another {', '.join(changed)}; "
            "scoring the base LLM again."
        )
        return None
    with open(profile_path) as handle:
        profile = json.load(handle)
    scores = torch.load(scores_path, map_location="cpu", weights_only=True)
    logger.info(f"base stage: reused {path} (same base LLM, text sets and settings)")
    return cached["results"], profile, scores


def save_base_cache(folder, importance_folder, inputs, results, scores):
    """Writes the base stage's scores and the record of its inputs (main process).

    Arguments
    ---------
    folder : str
        The base stage's folder.
    importance_folder : str
        ``importance/base/``.
    inputs : dict
        From ``base_inputs``.
    results : dict
        The stage's results.
    scores : dict
        ``{parameter name: score tensor}``.
    """
    if not if_main_process():
        return
    os.makedirs(importance_folder, exist_ok=True)
    torch.save(scores, os.path.join(importance_folder, SCORES_FILE))
    write_json({"inputs": inputs, "results": results}, os.path.join(folder, CACHE_FILE))
