"""Data preparation of MiniSpokenQA: a synthetic knowledge base, text QA and spoken QA.

Splits (``<manifest_folder>/``):

* ``text_train.csv``: every (fact, template) written question; the LM is pretrained on it.
* ``text_test.csv``: the same questions, scored as T2T accuracy (the facts the
  LM knows: its textual competence, which speech fine-tuning may erode).
* ``speech_train.csv``: templates 0 and 1 of every fact, in four training voices.
* ``speech_valid.csv``: every 8th of those questions, in a voice not used in training.
* ``speech_test.csv``: all of them in another unseen voice (S2T): spoken questions
  from a new speaker. (Template 2 stays text-only.)

Authors
 * speechbrain-sllm developers 2026
"""

import json
import logging
import os

from speechbrain_sllm.data.synthetic import (
    TEST_VOICES,
    TRAIN_VOICES,
    VALID_VOICES,
    make_knowledge_base,
    make_qa_pairs,
    speak_pairs,
    text_rows,
    write_manifest,
)
from speechbrain_sllm.data.tts import EspeakTTS

logger = logging.getLogger(__name__)
SPLITS = ("text_train", "text_test", "speech_train", "speech_valid", "speech_test")
# Bump when the data written changes: a folder prepared by another version is redone.
DATA_VERSION = 5  # 5: eSpeak NG re-seeded per utterance (deterministic audio)


def prepare_minispokenqa(manifest_folder, num_entities=40, seed=1234, skip_prep=False):
    """Writes the knowledge base, audio and CSV manifests (skipped if already there).

    Arguments
    ---------
    manifest_folder : str
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
    paths = {split: os.path.join(manifest_folder, f"{split}.csv") for split in SPLITS}
    kb_path = os.path.join(manifest_folder, "knowledge_base.json")
    if skip_prep or (
        all(map(os.path.isfile, paths.values())) and prepared_with(kb_path, num_entities, seed)
    ):
        logger.info(f"MiniSpokenQA already prepared in {manifest_folder}")
        return paths
    if os.path.isfile(kb_path):
        os.remove(kb_path)  # the completion marker: written again only once all is done
    kb = make_knowledge_base(num_entities, seed)
    pairs = make_qa_pairs(kb)
    tts = EspeakTTS(sample_rate=16000)
    write_manifest(text_rows(pairs, "text"), paths["text_train"])
    write_manifest(text_rows(pairs, "text"), paths["text_test"])
    spoken = [p for p in pairs if p["template"] in (0, 1)]
    audio = os.path.join(manifest_folder, "wav")
    rows = {
        "speech_train": speak_pairs(spoken, audio, TRAIN_VOICES, tts, "train", seed=seed),
        "speech_valid": speak_pairs(spoken[::8], audio, VALID_VOICES, tts, "valid", seed=seed + 1),
        "speech_test": speak_pairs(spoken, audio, TEST_VOICES, tts, "test", seed=seed + 2),
    }
    for split, split_rows in rows.items():
        write_manifest(split_rows, paths[split])
    with open(kb_path, "w") as handle:
        json.dump(
            {"num_entities": num_entities, "seed": seed, "version": DATA_VERSION, "facts": kb},
            handle,
            indent=1,
        )
    logger.info(
        f"MiniSpokenQA: {len(pairs)} text QA pairs, {sum(map(len, rows.values()))} utterances"
    )
    return paths


def prepared_with(kb_path, num_entities, seed):
    """Whether ``kb_path`` was written with the same settings."""
    if not os.path.isfile(kb_path):
        return False
    with open(kb_path) as handle:
        meta = json.load(handle)
    return (meta.get("num_entities"), meta.get("seed"), meta.get("version")) == (
        num_entities,
        seed,
        DATA_VERSION,
    )
