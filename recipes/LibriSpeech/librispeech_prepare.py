"""LibriSpeech data preparation for speech-LLM recipes.

Reads the standard layout ``<data_folder>/<split>/<speaker>/<chapter>/`` with
``<speaker>-<chapter>-<utt>.flac`` files and ``<speaker>-<chapter>.trans.txt``
transcripts, and writes one SpeechBrain CSV per split with the fields
``ID, duration, wav, spk_id, question, answer`` (question = answer = the
transcript, so the same manifest serves ASR and text-perplexity checks).
A ``<split>_text.csv`` holds the transcripts as written continuation pairs
(first half -> second half) for the text perplexity of the LLM.

Authors
 * speechbrain-sllm developers 2026
"""

import glob
import logging
import os

import soundfile

from speechbrain_sllm.data.dataio import write_csv_manifest

logger = logging.getLogger(__name__)
FIELDS = ["ID", "duration", "wav", "spk_id", "question", "answer"]


def prepare_librispeech(data_folder, save_folder, splits, skip_prep=False):
    """Writes ``<save_folder>/<split>.csv`` and ``<split>_text.csv`` for each split.

    Arguments
    ---------
    data_folder : str
        The ``LibriSpeech`` folder (containing ``train-clean-100`` etc.).
    save_folder : str
        Where the manifests go.
    splits : list of str
        Split folders to prepare, e.g. ``["train-clean-100", "dev-clean"]``.
    skip_prep : bool
        Do nothing (manifests must exist).
    """
    if skip_prep:
        return
    os.makedirs(save_folder, exist_ok=True)
    for split in splits:
        target = os.path.join(save_folder, f"{split}.csv")
        if os.path.isfile(target):
            logger.info(f"{target} exists, skipping preparation of {split}")
            continue
        split_dir = os.path.join(data_folder, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(
                f"LibriSpeech split folder {split_dir!r} not found; set `data_folder` to "
                "the folder that contains the split folders (e.g. .../LibriSpeech)."
            )
        rows = split_rows(split_dir)
        if not rows:
            raise ValueError(f"No transcribed flac file found under {split_dir!r}.")
        write_csv_manifest(rows, FIELDS, target)
        write_csv_manifest(text_pairs(rows), FIELDS, os.path.join(save_folder, f"{split}_text.csv"))
        logger.info(f"{split}: {len(rows)} utterances -> {target}")


def split_rows(split_dir):
    """Manifest rows of one split folder."""
    rows = []
    for trans in sorted(glob.glob(os.path.join(split_dir, "*", "*", "*.trans.txt"))):
        folder = os.path.dirname(trans)
        with open(trans) as handle:
            for line in handle:
                utt_id, _, words = line.strip().partition(" ")
                path = os.path.join(folder, utt_id + ".flac")
                if not words or not os.path.isfile(path):
                    logger.warning(f"skipping {utt_id}: missing audio or empty transcript")
                    continue
                info = soundfile.info(path)
                rows.append(
                    {
                        "ID": utt_id,
                        "duration": round(info.frames / info.samplerate, 3),
                        "wav": path,
                        "spk_id": utt_id.split("-")[0],
                        "question": words.lower(),
                        "answer": words.lower(),
                    }
                )
    return rows


def text_pairs(rows):
    """Written continuation pairs (first half -> second half) of transcripts."""
    pairs = []
    for row in rows:
        words = row["answer"].split()
        if len(words) < 2:
            continue
        half = len(words) // 2
        pairs.append(
            {
                "ID": row["ID"],
                "duration": 0.0,
                "wav": "",
                "spk_id": row["spk_id"],
                "question": " ".join(words[:half]),
                "answer": " ".join(words[half:]),
            }
        )
    return pairs
