"""Manifests, audio loading and the data pipelines of spoken / written QA.

Manifests are SpeechBrain CSV or JSON files with the fields
``ID, wav, duration, question, answer`` and, optionally, ``alternatives``:
every accepted answer as a JSON list (``answer``, the training target, is the
first). ``wav`` may use ``$data_root`` (CSV) or ``{data_root}`` (JSON); only
path fields are substituted, so any text (``$``, ``{``, ``|``, quotes, commas,
newlines) in a question or answer reads back as written.

Bad-item policy (documented in the README):

* At dataset creation, ``check_items=True`` drops items whose audio file is
  missing or unreadable, whose duration is under ``min_duration`` (a 1-sample
  or truncated clip) or over ``max_duration``, or whose question / answer is
  empty; each drop is logged and a summary counts them.
* At load time, audio is downmixed to mono and resampled to ``sample_rate``;
  a file that cannot be read raises :class:`AudioError` naming the file.

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import filecmp
import json
import logging
import os
import re
from collections import Counter

import soundfile
import speechbrain as sb
import torch
import torchaudio

logger = logging.getLogger(__name__)


class AudioError(ValueError):
    """An audio file that cannot be used, with the file and the fix in the message."""


def load_audio(path, sample_rate=16000, max_duration=None):
    """Reads an audio file as a mono float waveform at ``sample_rate``.

    SpeechBrain's ``read_audio`` returns the file as stored (any rate, every
    channel) and its errors name neither the fix nor the limit; speech LLM
    encoders need mono at one rate, so this reader downmixes, resamples and
    says what to change.

    Arguments
    ---------
    path : str
        Audio file (any format soundfile reads: wav, flac, ogg).
    sample_rate : int
        Target rate; other rates are resampled.
    max_duration : float or None
        Longest accepted duration in seconds.

    Returns
    -------
    torch.Tensor
        ``(S,)`` waveform.

    Example
    -------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.wav")
    >>> soundfile.write(path, torch.zeros(8000, 2).numpy(), 8000)
    >>> load_audio(path).shape
    torch.Size([16000])
    """
    if not os.path.isfile(path):
        raise AudioError(f"Audio file {path!r} does not exist; fix the manifest's wav field.")
    try:
        data, file_rate = soundfile.read(path, dtype="float32", always_2d=True)  # (S, C)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise AudioError(f"Audio file {path!r} cannot be read ({error}); re-encode it.") from error
    if data.shape[0] == 0:
        raise AudioError(f"Audio file {path!r} is empty; remove it from the manifest.")
    wav = torch.from_numpy(data).mean(dim=1)  # (S,) mono
    if file_rate != sample_rate:
        wav = torchaudio.functional.resample(wav, file_rate, sample_rate)
    if max_duration is not None and wav.shape[0] > max_duration * sample_rate:
        raise AudioError(
            f"Audio file {path!r} lasts {wav.shape[0] / sample_rate:.1f}s, over "
            f"max_duration={max_duration}s; raise max_duration or filter the manifest."
        )
    return wav


# Shorter clips are dropped at dataset creation: 4 analysis windows (25 ms) of the
# Whisper and wav2vec2 feature extractors, one LLM position of a stack-5 adaptor.
MIN_DURATION = 0.1


def audio_problem(path, max_duration=None, min_duration=None):
    """Why an audio file cannot be used, or None when it can (header check only).

    Arguments
    ---------
    path : str
        Audio file.
    max_duration : float or None
        Longest accepted duration in seconds.
    min_duration : float or None
        Shortest accepted duration in seconds.

    Returns
    -------
    str or None
    """
    if not os.path.isfile(path):
        return "missing audio file"
    try:
        info = soundfile.info(path)
    except (RuntimeError, soundfile.LibsndfileError):
        return "unreadable audio file"
    if info.frames == 0:
        return "empty audio file"
    if max_duration is not None and info.frames / info.samplerate > max_duration:
        return "audio longer than max_duration"
    if min_duration is not None and info.frames / info.samplerate < min_duration:
        return "audio shorter than min_duration"
    return None


PATH_FIELDS = ("wav",)
ALTERNATIVES_FIELD = "alternatives"


def encode_alternatives(answers):
    """The ``alternatives`` field of a manifest: every accepted answer, as JSON.

    Arguments
    ---------
    answers : list of str
        Accepted answers, the training target first.

    Returns
    -------
    str

    Example
    -------
    >>> encode_alternatives(["AC|DC", "$100"])
    '["AC|DC", "$100"]'
    >>> decode_alternatives(encode_alternatives(["a, \\"b\\"\\nc"]))
    ['a, "b"\\nc']
    """
    return json.dumps([str(answer) for answer in answers], ensure_ascii=False)


def decode_alternatives(field):
    """The accepted answers stored by :func:`encode_alternatives`.

    Arguments
    ---------
    field : str
        A JSON list of strings.

    Returns
    -------
    list of str
    """
    try:
        answers = json.loads(field)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"alternatives field {field[:60]!r} is not a JSON list of answers ({error}); "
            "write it with speechbrain_sllm.data.dataio.encode_alternatives."
        ) from error
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"alternatives field {field[:60]!r} must be a JSON list of strings.")
    return answers


def substitute_paths(row, replacements, pattern):
    """Fills ``$key`` / ``{key}`` placeholders in the path fields of one manifest row.

    Arguments
    ---------
    row : dict
        One item; changed in place.
    replacements : dict
        ``{"data_root": folder}``.
    pattern : str
        Regular expression whose group 1 is the key (CSV ``$key``, JSON ``{key}``).
    """
    for field in PATH_FIELDS:
        value = row.get(field)
        if not isinstance(value, str):
            continue
        missing = [key for key in re.findall(pattern, value) if key not in replacements]
        if missing:
            raise KeyError(
                f"{field} {value!r} uses {missing} with no replacement; pass "
                f"replacements={{{missing[0]!r}: <folder>}} or write the path in full."
            )
        row[field] = re.sub(pattern, lambda match: str(replacements[match[1]]), value)


def read_csv_rows(path, replacements):
    """``{ID: row}`` of a SpeechBrain CSV manifest, text fields as written.

    SpeechBrain's ``load_data_csv`` substitutes ``$key`` in every field and
    strips leading spaces, so a question holding ``$100`` fails with a
    ``KeyError`` that names no file; here only path fields are substituted.
    """
    data = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            if "ID" not in row:
                raise ValueError(f"Manifest {path!r} has no ID column; add one (unique per item).")
            data_id = row.pop("ID")
            if data_id in data:
                raise ValueError(f"Manifest {path!r} line {line}: duplicate ID {data_id!r}.")
            substitute_paths(row, replacements, r"\$([\w.]+)")
            if "duration" in row:
                row["duration"] = float(row["duration"])
            data[data_id] = row
    return data


def read_json_rows(path, replacements):
    """``{ID: item}`` of a SpeechBrain JSON manifest, text fields as written."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"Manifest {path!r} must hold an object {{ID: item}}.")
    for item in data.values():
        substitute_paths(item, replacements, r"\{([\w.]+)\}")
    return data


def load_manifest(path, replacements=None):
    """Loads a SpeechBrain CSV or JSON manifest into a ``DynamicItemDataset``.

    Arguments
    ---------
    path : str
        ``.csv`` or ``.json`` manifest.
    replacements : dict or None
        ``{"data_root": folder}`` style substitutions (path fields only).

    Returns
    -------
    speechbrain.dataio.dataset.DynamicItemDataset
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Manifest {path!r} not found; run the recipe's data preparation.")
    replacements = replacements or {}
    if path.endswith(".csv"):
        data = read_csv_rows(path, replacements)
    elif path.endswith(".json"):
        data = read_json_rows(path, replacements)
    else:
        raise ValueError(f"Manifest {path!r} must end in .csv or .json.")
    if not data:
        raise ValueError(
            f"Manifest {path!r} holds no item (header only or empty): this set is "
            "empty. Check the preparation's log for skipped items and the data paths."
        )
    return sb.dataio.dataset.DynamicItemDataset(data)


def write_csv_manifest(rows, fields, path):
    """Writes manifest rows as CSV atomically (temporary file + rename).

    Arguments
    ---------
    rows : list of dict
        Rows with (at least) the ``fields`` keys.
    fields : list of str
        Column names, ``ID`` first by SpeechBrain convention.
    path : str
        Output CSV path; a reader never sees a half-written file. A file that
        already holds the same bytes is left as it is (its modification time
        too, which later stages' completion records compare).
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    if os.path.isfile(path) and filecmp.cmp(tmp, path, shallow=False):
        os.remove(tmp)
        return
    os.replace(tmp, path)


def drop_bad_items(dataset, fields, max_duration=None, name="dataset", min_duration=None):
    """Drops items with unusable audio or empty text, logging each and a summary.

    Arguments
    ---------
    dataset : DynamicItemDataset
        Dataset to filter.
    fields : list of str
        Text fields that must be non-empty; ``wav`` is checked as audio.
    max_duration : float or None
        Longest accepted duration in seconds.
    name : str
        Name used in the log.
    min_duration : float or None
        Shortest accepted duration in seconds.

    Returns
    -------
    dataset : DynamicItemDataset
        The filtered dataset.
    skipped : collections.Counter
        Reasons and counts of dropped items.
    """
    skipped = Counter()
    keep = []
    for data_id in dataset.data_ids:
        item = dataset.data[data_id]
        problem = None
        for field in fields:
            if field == "wav":
                problem = audio_problem(item["wav"], max_duration, min_duration)
            elif not str(item.get(field, "")).strip():
                problem = f"empty {field}"
            if problem:
                break
        if problem:
            skipped[problem] += 1
            logger.warning(f"{name}: skipping {data_id} ({problem}): {item.get('wav', '')}")
        else:
            keep.append(data_id)
    if skipped:
        logger.warning(f"{name}: skipped {sum(skipped.values())} items: {dict(skipped)}")
    return dataset.filtered_sorted(
        select_n=None, key_test={"id": lambda i: i in set(keep)}
    ), skipped


def with_alternatives(dataset):
    """``dataset``, or a copy of its items in which each has ``alternatives`` (``[answer]``).

    Arguments
    ---------
    dataset : DynamicItemDataset
        Items with ``answer``; those without ``alternatives`` accept their answer alone.

    Returns
    -------
    DynamicItemDataset
    """
    if all(ALTERNATIVES_FIELD in item for item in dataset.data.values()):
        return dataset
    items = {}
    for data_id in dataset.data_ids:
        item = dict(dataset.data[data_id])
        item.setdefault(ALTERNATIVES_FIELD, encode_alternatives([str(item.get("answer", ""))]))
        items[data_id] = item
    return sb.dataio.dataset.DynamicItemDataset(items)


def make_qa_dataset(
    manifest,
    prompt,
    with_audio=True,
    sample_rate=16000,
    max_duration=30.0,
    replacements=None,
    check_items=True,
    sort_key=None,
    name=None,
    min_duration=MIN_DURATION,
):
    """Builds a spoken (or written) QA dataset with token ids ready for the SpeechLLM.

    Output keys: ``id``, ``question``, ``answer`` (the training target),
    ``references`` (every accepted answer: the manifest's ``alternatives``, or
    ``[answer]`` where it has none), ``prompt_ids`` (text prompt),
    ``answer_ids`` (with eos) and, when ``with_audio``, ``sig``.

    Arguments
    ---------
    manifest : str or DynamicItemDataset
        CSV/JSON manifest with ``question`` and ``answer`` (and ``wav``), or a
        dataset already loaded with those fields (a recipe's own view of its
        data, e.g. LibriSpeech's ``wrd`` as both).
    prompt : ChatPrompt
        Prompt builder of the LLM.
    with_audio : bool
        Load the ``wav`` field.
    sample_rate : int
        Audio rate expected by the encoder.
    max_duration : float
        Longest audio in seconds.
    replacements : dict or None
        Manifest substitutions such as ``{"data_root": ...}``.
    check_items : bool
        Drop unusable items at creation (see the module's policy).
    sort_key : str or None
        Sort by this field (e.g. ``duration``) for efficient batching.
    name : str or None
        The set's name in messages (default: the manifest's path).
    min_duration : float
        Shortest audio in seconds (``MIN_DURATION``: 1-sample and truncated clips).

    Returns
    -------
    DynamicItemDataset
    """
    if isinstance(manifest, sb.dataio.dataset.DynamicItemDataset):
        dataset, name = manifest, name or "dataset"
    else:
        dataset, name = load_manifest(manifest, replacements), name or manifest
    dataset = with_alternatives(dataset)
    if check_items:
        fields = ["question", "answer"] + (["wav"] if with_audio else [])
        dataset, _ = drop_bad_items(dataset, fields, max_duration, name, min_duration)
    if sort_key:
        dataset = dataset.filtered_sorted(sort_key=sort_key)
    if len(dataset) == 0:
        raise ValueError(
            f"{name}: no usable item left (the log names each skipped item and why); "
            "fix or replace the items, or raise max_duration if they were too long."
        )

    @sb.utils.data_pipeline.takes("question", "answer", ALTERNATIVES_FIELD)
    @sb.utils.data_pipeline.provides("prompt_ids", "answer_ids", "references")
    def text_pipeline(question, answer, alternatives):
        """Prompt ids of the written question, answer ids (with eos), accepted answers."""
        yield torch.tensor(prompt.text_prompt(question), dtype=torch.long)
        yield torch.tensor(prompt.answer_ids(answer), dtype=torch.long)
        yield decode_alternatives(alternatives)

    dataset.add_dynamic_item(text_pipeline)
    keys = ["id", "question", "answer", "references", "prompt_ids", "answer_ids"]
    if with_audio:

        @sb.utils.data_pipeline.takes("wav")
        @sb.utils.data_pipeline.provides("sig")
        def audio_pipeline(wav):
            """The mono waveform at ``sample_rate``."""
            return load_audio(wav, sample_rate, max_duration)

        dataset.add_dynamic_item(audio_pipeline)
        keys.append("sig")
    dataset.set_output_keys(keys)
    return dataset
