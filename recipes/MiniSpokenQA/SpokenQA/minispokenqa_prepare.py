"""Data preparation of MiniSpokenQA: a synthetic knowledge base, text QA and spoken QA.

Splits (``<data_folder>/``):

* ``text_train.csv``: every (fact, template) written question; the LM is pretrained on it.
* ``text_test.csv``: the same questions, scored as T2T accuracy (the facts the
  LM knows: its textual competence, which speech fine-tuning may erode).
* ``speech_train.csv``: 3 of every 4 facts, every template, in the training voices.
* ``speech_valid.csv``: 1 in 12 facts (held out of speech training), one training voice.
* ``speech_test.csv``: the other held-out facts (1 in 6), every template, in a voice
  never heard in training (S2T). Their entities and phrasings were heard in other
  questions, but these questions were never spoken in training: the answer has to
  come from the LLM's text knowledge, reached through speech.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import logging
import os

from speechbrain_sllm.data.synthetic import (
    TEST_VOICES,
    TRAIN_VOICES,
    make_knowledge_base,
    make_qa_pairs,
    speak_pairs,
    text_rows,
    write_manifest,
)
from speechbrain_sllm.data.tts import EspeakTTS

logger = logging.getLogger(__name__)
SPLITS = ("text_train", "text_test", "speech_train", "speech_valid", "speech_test")


def prepare_minispokenqa(data_folder, num_entities=40, seed=1234, skip_prep=False):
    """Writes the knowledge base, audio and CSV manifests (skipped if already there).

    Arguments
    ---------
    data_folder : str
        Output folder.
    num_entities : int
        Invented countries (4 facts each, 3 question templates per fact).
    seed : int
        Seed of the knowledge base and the speaking-rate jitter.
    skip_prep : bool
        Skip entirely (manifests must exist).

    Returns
    -------
    dict
        ``{split: manifest path}``.
    """
    paths = {split: os.path.join(data_folder, f"{split}.csv") for split in SPLITS}
    kb_path = os.path.join(data_folder, "knowledge_base.json")
    if skip_prep or (all(map(os.path.isfile, paths.values())) and prepared_with(kb_path, num_entities, seed)):
        logger.info(f"MiniSpokenQA already prepared in {data_folder}")
        return paths
    kb = make_knowledge_base(num_entities, seed)
    pairs = make_qa_pairs(kb)
    tts = EspeakTTS(sample_rate=16000)
    write_manifest(text_rows(pairs, "text"), paths["text_train"])
    write_manifest(text_rows(pairs, "text"), paths["text_test"])
    split_of = {key: fact_split(i) for i, key in enumerate(dict.fromkeys(fact_keys(pairs)))}
    by_split = {name: [p for p in pairs if split_of[fact_key(p)] == name] for name in ("train", "valid", "test")}
    valid = [p for p in by_split["valid"] if p["template"] == 0]
    audio = os.path.join(data_folder, "wav")
    rows = {
        "speech_train": speak_pairs(by_split["train"], audio, TRAIN_VOICES, tts, "train", seed=seed),
        "speech_valid": speak_pairs(valid, audio, TRAIN_VOICES[:1], tts, "valid", seed=seed + 1),
        "speech_test": speak_pairs(by_split["test"], audio, TEST_VOICES, tts, "test", seed=seed + 2),
    }
    for split, split_rows in rows.items():
        write_manifest(split_rows, paths[split])
    with open(kb_path, "w") as handle:
        json.dump({"num_entities": num_entities, "seed": seed, "version": 2, "facts": kb}, handle, indent=1)
    logger.info(f"MiniSpokenQA: {len(pairs)} text QA pairs, {sum(map(len, rows.values()))} utterances")
    return paths


def fact_key(pair):
    """The (entity, relation) fact a QA pair asks about."""
    return pair["entity"], pair["relation"]


def fact_keys(pairs):
    """Fact keys of ``pairs`` in order."""
    return [fact_key(p) for p in pairs]


def fact_split(index):
    """Speech split of the ``index``-th fact: 3 in 4 train, 1 in 12 valid, 1 in 6 test.

    Example
    -------
    >>> [fact_split(i) for i in range(12)].count("test")
    2
    """
    if index % 4 != 3:
        return "train"
    return "valid" if index % 12 == 3 else "test"


def prepared_with(kb_path, num_entities, seed):
    """Whether ``kb_path`` was written with the same settings."""
    if not os.path.isfile(kb_path):
        return False
    with open(kb_path) as handle:
        meta = json.load(handle)
    return (meta.get("num_entities"), meta.get("seed"), meta.get("version")) == (num_entities, seed, 2)
