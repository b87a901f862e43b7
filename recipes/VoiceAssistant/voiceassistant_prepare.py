"""Spoken-QA data preparation (VoiceAssistant-400K / Spoken-Alpaca style).

Training data: VoiceAssistant-400K as published (a folder of parquet shards, or
one ``.parquet`` file), or a JSON-lines file. Parquet rows hold ``question`` (the
transcript of the spoken question), ``question_audio`` (``{"bytes", "path"}``: the
recording itself), ``answer``, ``split_name``, ``index_in_split`` and ``round``;
the shards are read one batch of rows at a time (memory does not grow with the
number of rows), each question's audio is decoded once to check it and written as
it came (same bytes) under ``<save_folder>/audio/<shard>/``, and a shard is
finished when ``<save_folder>/shards/<shard>.csv`` and its record exist: a
preparation killed half-way resumes at the first unfinished shard. Rows with
undecodable audio or an empty question or answer are skipped, logged with
``shard:row`` and counted; the validation split is a seeded hash of each id.

JSON-lines files, one item per line, with an audio path relative to the
file (or absolute) and text fields:

* training file: ``{"id", "audio", "question", "answer"}`` (question = transcript
  of the spoken query, answer = the response);
* evaluation files (Llama Questions / Web Questions style):
  ``{"id", "audio", "question", "answers": [...]}``.

Output: SpeechBrain CSVs ``train.csv``, ``valid.csv`` and ``test_<name>.csv``
with ``ID, wav, duration, question, answer, alternatives`` (every accepted answer as a
JSON list); from parquet, ``split_name``, ``index_in_split`` and ``round`` too.

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import glob
import hashlib
import io
import json
import logging
import os
import random
import zlib
from collections import Counter

import soundfile
from tqdm import tqdm

from speechbrain_sllm.data.dataio import encode_alternatives, write_csv_manifest
from speechbrain_sllm.data.preparation import (
    completion_record,
    is_prepared,
    same_source,
    source_record,
    staged_preparation,
)

logger = logging.getLogger(__name__)
FIELDS = ["ID", "wav", "duration", "question", "answer", "alternatives"]


def prepare_spoken_qa(
    train_file,
    test_files,
    save_folder,
    valid_fraction=0.02,
    seed=0,
    skip_prep=False,
    on_change="redo",
):
    """Writes train / valid / test manifests, atomically, unless they are up to date.

    The manifests are redone when a source file (path, size, modification time)
    or an option differs from the completion record of the previous
    preparation (``speechbrain_sllm.data.preparation``).

    Arguments
    ---------
    train_file : str
        VoiceAssistant-400K's folder of parquet shards (or one ``.parquet`` file),
        or a JSON-lines training file.
    test_files : dict
        ``{name: JSON-lines test file}``.
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
    parquet = is_parquet(train_file)
    train_sources = parquet_shards(train_file) if parquet else [train_file]
    record = completion_record(
        [*train_sources, *test_files.values()],
        {"valid_fraction": valid_fraction, "seed": seed, "test_sets": sorted(test_files)},
    )
    outputs = ["train.csv", "valid.csv"] + [f"test_{name}.csv" for name in test_files]
    if is_prepared(save_folder, record, outputs, on_change):
        logger.info(f"Spoken-QA manifests in {save_folder} are up to date.")
        return
    evaluation = {
        f"test_{name}.csv": read_items(path, answers_key="answers", split=name)
        for name, path in test_files.items()
    }
    sets = dict(evaluation)
    if not parquet:
        rows = read_items(train_file, answers_key="answer", split="train")
        random.Random(seed).shuffle(rows)
        count = max(1, int(valid_fraction * len(rows)))
        if len(rows) - count < 1:
            raise ValueError(
                f"{train_file}: {len(rows)} usable training item(s) cannot make both a train "
                f"and a valid split (valid_fraction={valid_fraction}); add items."
            )
        sets.update({"train.csv": rows[count:], "valid.csv": rows[:count]})
    with staged_preparation(save_folder, record) as staging:  # every set read and checked
        if parquet:  # shards resume from save_folder; train / valid written into staging
            counts = prepare_parquet_training(
                train_file, save_folder, staging, valid_fraction, seed
            )
            logger.info(f"VoiceAssistant shards of {train_file}: {dict(counts)}")
        for file_name, items in sets.items():
            write_csv_manifest(items, FIELDS, os.path.join(staging, file_name))


def is_parquet(train_file):
    """Whether the training data is VoiceAssistant-400K's parquet (a shard or a folder of them)."""
    return os.path.isdir(train_file) or train_file.endswith(".parquet")


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


# ---------------------------------------------------------------------------
# VoiceAssistant-400K as published: parquet shards
# ---------------------------------------------------------------------------
COLUMNS = ["question", "question_audio", "answer", "split_name", "index_in_split", "round"]
PARQUET_FIELDS = [
    "ID", "wav", "duration", "question", "answer", "alternatives",
    "split_name", "index_in_split", "round",
]  # fmt: skip
ROWS_PER_BATCH = 256


def parquet_shards(source):
    """The parquet files of a dataset folder (searched recursively) or one file, sorted.

    Arguments
    ---------
    source : str
        A ``.parquet`` file or a folder holding shards (e.g. ``data/*.parquet``).

    Returns
    -------
    list of str
    """
    if os.path.isfile(source):
        return [source]
    shards = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
    if not shards:
        raise FileNotFoundError(
            f"{source!r} holds no .parquet file; point train_file at VoiceAssistant-400K's "
            "folder of parquet shards (or at a JSON-lines file)."
        )
    return shards


def check_columns(shard, schema_names):
    """Refuses a shard without the columns read here, naming the missing ones."""
    missing = [column for column in COLUMNS[:3] if column not in schema_names]
    if missing:
        raise ValueError(
            f"{shard}: missing columns {missing} (found {list(schema_names)}); "
            "VoiceAssistant-400K's shards have question, question_audio, answer."
        )


def shard_name(shard):
    """A folder-safe name of a shard, unique per path (``train-00000-of-00002-1a2b3c4d``)."""
    stem = os.path.splitext(os.path.basename(shard))[0]
    return f"{stem}-{zlib.crc32(os.path.abspath(shard).encode()):08x}"


def row_id(row, shard, number):
    """``<split_name>_<index_in_split>_<round>``, or the shard and row number without them."""
    parts = [row.get(key) for key in ("split_name", "index_in_split", "round")]
    if all(part is not None and str(part) != "" for part in parts):
        return "_".join(str(part) for part in parts)
    return f"{shard_name(shard)}_{number}"


def decoded_duration(audio_bytes):
    """``(seconds, None)`` of decodable audio bytes, else ``(None, reason)``."""
    if not audio_bytes:
        return None, "no audio bytes"
    try:
        info = soundfile.info(io.BytesIO(audio_bytes))
        soundfile.read(io.BytesIO(audio_bytes), frames=min(info.frames, 16000))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        return None, f"undecodable audio ({str(error).splitlines()[0][:80]})"
    if info.frames == 0:
        return None, "empty audio"
    return round(info.frames / info.samplerate, 3), None


def manifest_row(row, shard, number, audio_folder):
    """``(manifest row, None)`` of one parquet row (its audio written), or ``(None, reason)``."""
    question, answer = (str(row.get(key) or "").strip() for key in ("question", "answer"))
    if not question or not answer:
        return None, "empty question" if not question else "empty answer"
    audio = row.get("question_audio") or {}
    duration, problem = decoded_duration(audio.get("bytes"))
    if problem:
        return None, problem
    item_id = row_id(row, shard, number)
    extension = os.path.splitext(audio.get("path") or "")[1] or ".wav"
    wav = os.path.join(audio_folder, item_id + extension)
    with open(wav + ".tmp", "wb") as handle:
        handle.write(audio["bytes"])
    os.replace(wav + ".tmp", wav)
    extra = {key: row.get(key) for key in ("split_name", "index_in_split", "round")}
    return {
        "ID": item_id, "wav": wav, "duration": duration, "question": row["question"],
        "answer": row["answer"], "alternatives": encode_alternatives([row["answer"]]), **extra,
    }, None  # fmt: skip


def shard_source(shard):
    """The preparation record's entry of one shard (size, time, digest)."""
    return source_record([shard])[os.path.abspath(shard)]


def shard_is_done(rows_file, shard):
    """Whether a shard's rows file and its record (the shard's size and time) exist and match."""
    record = rows_file + ".json"
    if not (os.path.isfile(rows_file) and os.path.isfile(record)):
        return False
    with open(record) as handle:
        return same_source(json.load(handle).get("source"), shard_source(shard))


def prepare_shard(shard, work_folder, skipped):
    """Writes one shard's audio files and rows file (atomically, record last).

    Arguments
    ---------
    shard : str
        A parquet file.
    work_folder : str
        ``<save_folder>``: ``audio/<shard>/`` and ``shards/<shard>.csv`` go here.
    skipped : collections.Counter
        Counts of skipped rows by reason (updated).

    Returns
    -------
    str
        The rows file.
    """
    import pyarrow
    import pyarrow.parquet as pq

    name = shard_name(shard)
    rows_file = os.path.join(work_folder, "shards", f"{name}.csv")
    if shard_is_done(rows_file, shard):
        with open(rows_file + ".json") as handle:
            skipped.update(json.load(handle)["skipped"])
        return rows_file
    audio_folder = os.path.join(work_folder, "audio", name)
    os.makedirs(audio_folder, exist_ok=True)
    os.makedirs(os.path.dirname(rows_file), exist_ok=True)
    parquet = pq.ParquetFile(shard, buffer_size=2**20)  # read column chunks in 1 MiB pieces
    check_columns(shard, parquet.schema_arrow.names)
    columns = [c for c in COLUMNS if c in parquet.schema_arrow.names]
    local = Counter()
    number = 0
    with open(rows_file + ".tmp", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PARQUET_FIELDS)
        writer.writeheader()
        progress = tqdm(
            total=parquet.metadata.num_rows, desc=f"preparing {os.path.basename(shard)}"
        )
        for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns):
            for row in batch.to_pylist():
                item, problem = manifest_row(row, shard, number, audio_folder)
                if problem:
                    local[problem] += 1
                    logger.warning(f"{shard}:{number}: skipped ({problem})")
                else:
                    writer.writerow(item)
                number += 1
            progress.update(batch.num_rows)
        progress.close()
    os.replace(rows_file + ".tmp", rows_file)
    parquet.close()
    pyarrow.default_memory_pool().release_unused()  # the shard's buffers, back to the system
    with open(rows_file + ".json.tmp", "w") as handle:
        json.dump({"source": shard_source(shard), "skipped": dict(local)}, handle)
    os.replace(rows_file + ".json.tmp", rows_file + ".json")
    skipped.update(local)
    return rows_file


def in_valid_split(item_id, valid_fraction, seed):
    """Whether an item is held out for validation: a seeded hash of its id (no list in memory).

    Example
    -------
    >>> sum(in_valid_split(str(i), 0.1, 0) for i in range(10000)) in range(900, 1100)
    True
    """
    digest = hashlib.blake2b(f"{seed}:{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < valid_fraction


def split_shards(rows_files, train_path, valid_path, valid_fraction, seed):
    """Streams every shard's rows into ``train_path`` and ``valid_path``; returns their counts."""
    counts = Counter()
    with (
        open(train_path, "w", newline="", encoding="utf-8") as train_handle,
        open(valid_path, "w", newline="", encoding="utf-8") as valid_handle,
    ):
        writers = {
            split: csv.DictWriter(handle, fieldnames=PARQUET_FIELDS)
            for split, handle in (("train", train_handle), ("valid", valid_handle))
        }
        for writer in writers.values():
            writer.writeheader()
        for rows_file in rows_files:
            with open(rows_file, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):  # a repeated id: named when the manifest loads
                    split = "valid" if in_valid_split(row["ID"], valid_fraction, seed) else "train"
                    writers[split].writerow(row)
                    counts[split] += 1
    return counts


def prepare_parquet_training(source, save_folder, staging, valid_fraction, seed):
    """``train.csv`` and ``valid.csv`` (in ``staging``) from VoiceAssistant-400K's shards.

    Arguments
    ---------
    source : str
        A parquet file or a folder of shards.
    save_folder : str
        Where ``audio/`` and ``shards/`` (kept across runs, for resuming) go.
    staging : str
        The preparation's staging folder (manifests moved into place by the caller).
    valid_fraction : float
        Fraction of the items held out for validation (by a seeded hash of the id).
    seed : int
        Seed of the validation split.

    Returns
    -------
    collections.Counter
        Items per split, and skipped rows by reason (``skipped: <reason>``).
    """
    skipped = Counter()
    rows_files = [prepare_shard(shard, save_folder, skipped) for shard in parquet_shards(source)]
    counts = split_shards(
        rows_files,
        os.path.join(staging, "train.csv"),
        os.path.join(staging, "valid.csv"),
        valid_fraction,
        seed,
    )
    if skipped:
        logger.warning(f"{source}: skipped {sum(skipped.values())} rows: {dict(skipped)}")
    if counts["train"] == 0 or counts["valid"] == 0:
        raise ValueError(
            f"{source}: {counts['train']} training and {counts['valid']} validation items "
            f"(valid_fraction={valid_fraction}, {sum(skipped.values())} rows skipped: "
            f"{dict(skipped)}); both splits need items."
        )
    counts.update({f"skipped: {reason}": n for reason, n in skipped.items()})
    return counts
