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

import soundfile

from speechbrain_sllm.data.dataio import write_csv_manifest

logger = logging.getLogger(__name__)
FIELDS = ["ID", "wav", "duration", "question", "answer"]


def prepare_spoken_qa(
    train_file, eval_files, save_folder, valid_fraction=0.02, seed=0, skip_prep=False
):
    """Writes train / valid / eval manifests (skipped when they exist).

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
    """
    if skip_prep:
        return
    os.makedirs(save_folder, exist_ok=True)
    train_csv = os.path.join(save_folder, "train.csv")
    if not os.path.isfile(train_csv):
        rows = read_items(train_file, answers_key="answer")
        random.Random(seed).shuffle(rows)
        count = max(1, int(valid_fraction * len(rows)))
        write_csv_manifest(rows[count:], FIELDS, train_csv)
        write_csv_manifest(rows[:count], FIELDS, os.path.join(save_folder, "valid.csv"))
    for name, path in eval_files.items():
        target = os.path.join(save_folder, f"eval_{name}.csv")
        if not os.path.isfile(target):
            write_csv_manifest(read_items(path, answers_key="answers"), FIELDS, target)


def read_items(path, answers_key):
    """Manifest rows from a JSON-lines file; items with missing fields are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Spoken-QA file {path!r} not found; check the yaml's data paths.")
    base = os.path.dirname(os.path.abspath(path))
    rows, skipped = [], 0
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error}).") from error
            answers = item.get(answers_key)
            answer = "|".join(answers) if isinstance(answers, list) else answers
            audio = os.path.join(base, item.get("audio", ""))
            if not (item.get("question") and answer and os.path.isfile(audio)):
                skipped += 1
                logger.warning(f"{path}:{number}: skipped (missing audio, question or answer)")
                continue
            info = soundfile.info(audio)
            rows.append(
                {
                    "ID": str(item.get("id", number)),
                    "wav": audio,
                    "duration": round(info.frames / info.samplerate, 3),
                    "question": item["question"],
                    "answer": answer,
                }
            )
    if skipped:
        logger.warning(f"{path}: skipped {skipped} items")
    return rows
