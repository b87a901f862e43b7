"""Spoken-QA data preparation (VoiceAssistant-400K / Spoken-Alpaca style).

Input: JSON-lines files, one item per line, with an audio path relative to the
file (or absolute) and text fields:

* training file: ``{"id", "audio", "question", "answer"}`` (question = transcript
  of the spoken query, answer = the response);
* evaluation files (Llama Questions / Web Questions style):
  ``{"id", "audio", "question", "answers": [...]}``.

Output: SpeechBrain CSVs ``train.csv``, ``valid.csv`` and ``eval_<name>.csv``
with ``ID, wav, duration, question, answer, alternatives`` (every accepted answer as a
JSON list).

Authors
 * speechbrain-sllm developers 2026
"""

import json
import logging
import os
import random
from collections import Counter

import soundfile

from speechbrain_sllm.data.dataio import encode_alternatives, write_csv_manifest
from speechbrain_sllm.data.preparation import (
    completion_record,
    is_prepared,
    staged_preparation,
)

logger = logging.getLogger(__name__)
FIELDS = ["ID", "wav", "duration", "question", "answer", "alternatives"]


def prepare_spoken_qa(
    train_file,
    eval_files,
    save_folder,
    valid_fraction=0.02,
    seed=0,
    skip_prep=False,
    on_change="redo",
):
    """Writes train / valid / eval manifests, atomically, unless they are up to date.

    The manifests are redone when a source file (path, size, modification time)
    or an option differs from the completion record of the previous
    preparation (``speechbrain_sllm.data.preparation``).

    Arguments
    ---------
    train_file : str
        JSON-lines training file.
    eval_files : dict
        ``{name: JSON-lines evaluation file}``.
    save_folder : str
        Output folder.
    valid_fraction : float
        Fraction of the training items held out for validation.
    seed : int
        Seed of the validation draw.
    skip_prep : bool
        Do nothing.
    on_change : str
        ``redo`` or ``stop`` when the sources or options changed since the last run.
    """
    if skip_prep:
        return
    os.makedirs(save_folder, exist_ok=True)
    record = completion_record(
        [train_file, *eval_files.values()],
        {"valid_fraction": valid_fraction, "seed": seed, "eval_sets": sorted(eval_files)},
    )
    outputs = ["train.csv", "valid.csv"] + [f"eval_{name}.csv" for name in eval_files]
    if is_prepared(save_folder, record, outputs, on_change):
        logger.info(f"Spoken-QA manifests in {save_folder} are up to date.")
        return
    rows = read_items(train_file, answers_key="answer", split="train")
    random.Random(seed).shuffle(rows)
    count = max(1, int(valid_fraction * len(rows)))
    if len(rows) - count < 1:
        raise ValueError(
            f"{train_file}: {len(rows)} usable training item(s) cannot make both a train "
            f"and a valid split (valid_fraction={valid_fraction}); add items."
        )
    sets = {"train.csv": rows[count:], "valid.csv": rows[:count]}
    for name, path in eval_files.items():
        sets[f"eval_{name}.csv"] = read_items(path, answers_key="answers", split=name)
    with staged_preparation(save_folder, record) as staging:  # every set read and checked
        for file_name, items in sets.items():
            write_csv_manifest(items, FIELDS, os.path.join(staging, file_name))


def read_items(path, answers_key, split="train"):
    """Manifest rows from a JSON-lines file; items with unusable fields are skipped.

    Lines that are not JSON objects and duplicate ids stop with ``file:line``;
    items without a question, an answer (or with an empty answer among the
    alternatives), or readable audio are skipped and logged with ``file:line``.
    A set left with no item stops with its file and split named.

    Arguments
    ---------
    path : str
        JSON-lines file.
    answers_key : str
        ``answer`` (training: one string) or ``answers`` (evaluation: a list).
    split : str
        The set's name in messages.

    Returns
    -------
    list of dict
        Manifest rows (``FIELDS``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Spoken-QA file {path!r} not found; check the yaml's data paths.")
    base = os.path.dirname(os.path.abspath(path))
    rows, skipped, first_line = [], Counter(), {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            item = parse_line(raw, path, number)
            if item is None:
                continue
            item_id = str(item.get("id", number))
            if item_id in first_line:
                raise ValueError(
                    f"{path}:{number}: duplicate id {item_id!r} (first at line "
                    f"{first_line[item_id]}); give every item its own id."
                )
            first_line[item_id] = number
            row, problem, detail = item_row(item, answers_key, base)
            if problem:
                skipped[problem] += 1
                logger.warning(f"{path}:{number}: skipped ({problem}): {detail}")
                continue
            rows.append(dict(row, ID=item_id))
    if skipped:
        logger.warning(f"{path}: skipped {sum(skipped.values())} items: {dict(skipped)}")
    if not rows:
        raise ValueError(
            f"{path}: the {split} set has no usable item ({sum(skipped.values())} skipped: "
            f"{dict(skipped)}; each is logged with its line). Fix the items or the audio paths."
        )
    return rows


def item_row(item, answers_key, base):
    """``(row without its ID, None, None)`` of one JSON item, or ``(None, reason, detail)``."""
    answers = item.get(answers_key)
    if isinstance(answers, list):
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            return None, f"empty answer in `{answers_key}`", repr(answers)
        answer = answers[0]
    else:
        answer, answers = answers, [answers]
    if not (isinstance(item.get("question"), str) and item["question"].strip()):
        return None, "missing question", repr(item.get("question"))
    if not (isinstance(answer, str) and answer.strip()):
        return None, f"missing `{answers_key}`", repr(answer)
    if not item.get("audio"):
        return None, "no `audio` key", f"keys {sorted(item)}"
    audio = os.path.join(base, item["audio"])
    duration, problem = audio_duration(audio)
    if problem:
        return None, problem, audio
    row = {
        "wav": audio,
        "duration": duration,
        "question": item["question"],
        "answer": answer,
        "alternatives": encode_alternatives(answers),
    }
    return row, None, None


def parse_line(raw, path, number):
    """One JSON-lines item (None for a blank line), errors naming ``path:line``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}:{number} is not valid UTF-8 ({error}); re-encode the file as UTF-8."
        ) from error
    if not line.strip():
        return None
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number} is not valid JSON ({error}).") from error
    if not isinstance(item, dict):
        raise ValueError(
            f"{path}:{number} is a JSON {type(item).__name__}, not an object; write one "
            '{"id": ..., "audio": ..., "question": ..., ...} object per line.'
        )
    return item


def audio_duration(path):
    """``(seconds, None)`` for a readable audio file, else ``(None, reason)``."""
    if not os.path.isfile(path):
        return None, "missing audio"
    try:
        info = soundfile.info(path)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        return None, f"unreadable audio ({error})"
    if info.frames == 0:
        return None, "empty audio"
    return round(info.frames / info.samplerate, 3), None
