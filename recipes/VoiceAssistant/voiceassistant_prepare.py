"""Spoken-QA data preparation (VoiceAssistant-400K / Spoken-Alpaca style).

Input: JSON-lines files, one item per line, with an audio path relative to the
file (or absolute) and text fields:

* training file: ``{"id", "audio", "question", "answer"}`` (question = transcript
  of the spoken query, answer = the response);
* evaluation files (Llama Questions / Web Questions style):
  ``{"id", "audio", "question", "answers": [...]}``.

Output: SpeechBrain CSVs ``train.csv``, ``valid.csv`` and ``eval_<name>.csv``
with ``ID, wav, duration, question, answer`` (evaluation answers joined by ``|``).

Authors
 * speechbrain-sllm developers 2026
"""

import json
import logging
import os
import random
from collections import Counter

import soundfile

from speechbrain_sllm.data.dataio import write_csv_manifest
from speechbrain_sllm.data.preparation import (
    completion_record,
    is_prepared,
    staged_preparation,
)

logger = logging.getLogger(__name__)
FIELDS = ["ID", "wav", "duration", "question", "answer"]


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
    with staged_preparation(save_folder, record) as staging:
        rows = read_items(train_file, answers_key="answer")
        random.Random(seed).shuffle(rows)
        count = max(1, int(valid_fraction * len(rows)))
        write_csv_manifest(rows[count:], FIELDS, os.path.join(staging, "train.csv"))
        write_csv_manifest(rows[:count], FIELDS, os.path.join(staging, "valid.csv"))
        for name, path in eval_files.items():
            items = read_items(path, answers_key="answers")
            write_csv_manifest(items, FIELDS, os.path.join(staging, f"eval_{name}.csv"))


def read_items(path, answers_key):
    """Manifest rows from a JSON-lines file; items with missing fields are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Spoken-QA file {path!r} not found; check the yaml's data paths.")
    base = os.path.dirname(os.path.abspath(path))
    rows, skipped = [], Counter()
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            item = parse_line(raw, path, number)
            if item is None:
                continue
            answers = item.get(answers_key)
            answer = "|".join(answers) if isinstance(answers, list) else answers
            audio = os.path.join(base, item.get("audio", ""))
            problem = None if item.get("question") and answer else "missing question or answer"
            duration = None
            if problem is None:
                duration, problem = audio_duration(audio)
            if problem:
                skipped[problem] += 1
                logger.warning(f"{path}:{number}: skipped ({problem}): {audio}")
                continue
            rows.append(
                {
                    "ID": str(item.get("id", number)),
                    "wav": audio,
                    "duration": duration,
                    "question": item["question"],
                    "answer": answer,
                }
            )
    if skipped:
        logger.warning(f"{path}: skipped {sum(skipped.values())} items: {dict(skipped)}")
    return rows


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
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number} is not valid JSON ({error}).") from error


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
