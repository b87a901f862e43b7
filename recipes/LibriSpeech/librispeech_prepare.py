"""LibriSpeech data preparation, with upstream SpeechBrain's signature and columns.

Writes ``<save_folder>/<split>.csv`` with ``ID, duration, wav, spk_id, wrd``
for every split, and the merged ``merge_name`` CSV of ``merge_lst``, exactly
the files SpeechBrain's own ``recipes/LibriSpeech/librispeech_prepare.py``
writes, so either file can prepare the data for either recipe. The
speech-LLM recipe builds its question/answer view in its data pipeline.

Preparation is atomic and skipped only when every CSV exists and its completion
record (each transcript file's path, size and modification time, and the
options) matches (``speechbrain_sllm.data.preparation``).

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import glob
import logging
import os

import soundfile

from speechbrain_sllm.data.dataio import write_csv_manifest
from speechbrain_sllm.data.preparation import (
    completion_record,
    is_prepared,
    staged_preparation,
)

logger = logging.getLogger(__name__)
FIELDS = ["ID", "duration", "wav", "spk_id", "wrd"]


def prepare_librispeech(
    data_folder,
    save_folder,
    tr_splits=(),
    dev_splits=(),
    te_splits=(),
    select_n_sentences=None,
    merge_lst=(),
    merge_name=None,
    skip_prep=False,
):
    """Writes one CSV per split (and the merged CSV of ``merge_lst``).

    Arguments
    ---------
    data_folder : str
        The ``LibriSpeech`` folder (containing ``train-clean-100`` etc.).
    save_folder : str
        Where the CSVs go.
    tr_splits : list of str
        Training splits, e.g. ``["train-clean-100", "train-clean-360"]``.
    dev_splits : list of str
        Validation splits.
    te_splits : list of str
        Test splits.
    select_n_sentences : list of int or None
        Keep only the first ``n`` utterances of each split (same order as
        ``tr_splits + dev_splits + te_splits``); None keeps all.
    merge_lst : list of str
        Splits merged into ``merge_name`` (e.g. all training splits).
    merge_name : str or None
        File name of the merged CSV, e.g. ``train.csv``.
    skip_prep : bool
        Do nothing (the CSVs must exist).

    Example
    -------
    >>> import tempfile
    >>> prepare_librispeech(tempfile.mkdtemp(), tempfile.mkdtemp(), skip_prep=True)
    """
    if skip_prep:
        return
    splits = list(tr_splits) + list(dev_splits) + list(te_splits)
    options = {
        "splits": splits,
        "select_n_sentences": select_n_sentences,
        "merge_lst": list(merge_lst),
        "merge_name": merge_name,
    }
    transcripts = [
        path
        for split in splits
        for path in sorted(
            glob.glob(os.path.join(split_folder(data_folder, split), "*", "*", "*.trans.txt"))
        )
    ]
    record = completion_record(transcripts, options)
    outputs = [f"{split}.csv" for split in splits] + ([merge_name] if merge_name else [])
    os.makedirs(save_folder, exist_ok=True)
    if is_prepared(save_folder, record, outputs):
        logger.info(f"LibriSpeech CSVs in {save_folder} are up to date; preparation skipped.")
        return
    with staged_preparation(save_folder, record) as staging:
        for index, split in enumerate(splits):
            rows = split_rows(split_folder(data_folder, split))
            if select_n_sentences is not None:
                rows = rows[: select_n_sentences[index]]
            write_csv_manifest(rows, FIELDS, os.path.join(staging, f"{split}.csv"))
            logger.info(f"{split}: {len(rows)} utterances")
        if merge_lst and merge_name:
            merge_csvs(staging, merge_lst, merge_name)


def split_folder(data_folder, split):
    """The folder of one split, with a clear error when it is missing."""
    folder = os.path.join(data_folder, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"LibriSpeech split folder {folder!r} not found; set `data_folder` to the "
            "folder that contains the split folders (e.g. .../LibriSpeech)."
        )
    return folder


def split_rows(folder):
    """CSV rows of one split folder; unreadable or untranscribed audio is skipped."""
    rows = []
    for trans in sorted(glob.glob(os.path.join(folder, "*", "*", "*.trans.txt"))):
        chapter = os.path.dirname(trans)
        with open(trans, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                utt_id, _, words = line.strip().partition(" ")
                path = os.path.join(chapter, utt_id + ".flac")
                try:
                    info = soundfile.info(path)
                except (OSError, RuntimeError) as error:  # missing or corrupt
                    logger.warning(f"{trans}:{number}: skipping {utt_id} ({error})")
                    continue
                if not words:
                    logger.warning(f"{trans}:{number}: skipping {utt_id} (empty transcript)")
                    continue
                rows.append(
                    {
                        "ID": utt_id,
                        "duration": round(info.frames / info.samplerate, 3),
                        "wav": path,
                        "spk_id": "-".join(utt_id.split("-")[:2]),
                        "wrd": words,
                    }
                )
    if not rows:
        raise ValueError(f"No transcribed flac file found under {folder!r}.")
    return rows


def merge_csvs(save_folder, merge_lst, merge_name):
    """Concatenates the CSVs of ``merge_lst`` into ``merge_name``."""
    rows = []
    for split in merge_lst:
        with open(os.path.join(save_folder, f"{split}.csv"), newline="") as handle:
            rows.extend(csv.DictReader(handle))
    write_csv_manifest(rows, FIELDS, os.path.join(save_folder, merge_name))
    logger.info(f"{merge_name}: {len(rows)} utterances from {list(merge_lst)}")
