"""Text on which a comparison scores both models: QA files or plain passages.

Formats, chosen by the file's ending:

* ``.txt``: plain text, one passage per line (empty lines skipped), tokenized
  as ``tokenizer(line).input_ids`` (the tokenizer's own special tokens), every
  next token predicted: the LM loss.
* ``.tsv``: LLaMA Questions (``Questions``, ``Answer``).
* ``.json``: WebQuestions (a list of ``{qText, answers}``) or a SpeechBrain
  JSON manifest (``{ID: {question, answer}}``).
* ``.jsonl``: one ``{question, answer}`` (or ``answers: [...]``) per line.
* ``.csv``: ``question`` and ``answer`` columns (a SpeechBrain manifest).

QA items are scored as the study scores them: the written question in the
LLM's chat prompt, the loss summed over the answer's tokens (first answer).

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import json
import os

import speechbrain as sb
import torch

from speechbrain_sllm.data.dataio import make_qa_dataset

QA_COLUMNS = {"question": ("question", "questions", "qtext"), "answer": ("answer", "answers")}
FORMATS = (".txt", ".tsv", ".json", ".jsonl", ".csv")


class TextSetError(ValueError):
    """A text file that gives no item to score, with the file and the fix."""


def first_answer(value):
    """The first non-empty answer of a string or a list of them ('' if none)."""
    answers = value if isinstance(value, list) else [value]
    return next((str(a).strip() for a in answers if a is not None and str(a).strip()), "")


def qa_row(item, number):
    """``{"ID", "question", "answer"}`` of one record with any casing of the QA columns."""
    lowered = {str(key).lower().replace(" ", ""): value for key, value in item.items()}
    fields = {}
    for field, names in QA_COLUMNS.items():
        value = next((lowered[name] for name in names if name in lowered), "")
        fields[field] = first_answer(value) if field == "answer" else str(value or "").strip()
    item_id = str(lowered.get("id", lowered.get("qid", number)))
    return {"ID": item_id, **fields}


def read_records(path):
    """The records of a QA file, as dicts (``.tsv``, ``.csv``, ``.json``, ``.jsonl``)."""
    with open(path, encoding="utf-8", newline="") as handle:
        if path.endswith((".tsv", ".csv")):
            return list(csv.DictReader(handle, delimiter="\t" if path.endswith(".tsv") else ","))
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        data = json.load(handle)
    if isinstance(data, dict):  # a SpeechBrain manifest {ID: item}
        return [dict(item, id=key) for key, item in data.items() if isinstance(item, dict)]
    return [item for item in data if isinstance(item, dict)]


def read_qa_rows(path):
    """Usable QA rows of a file, and how many records were skipped."""
    try:
        records = read_records(path)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise TextSetError(f"Text file {path!r} cannot be read ({error}).") from error
    rows = [qa_row(record, number) for number, record in enumerate(records)]
    usable = [row for row in rows if row["question"] and row["answer"]]
    return usable, len(rows) - len(usable)


def read_passages(path):
    """Non-empty lines of a plain-text file."""
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def passage_dataset(passages, tokenizer):
    """Plain passages as items whose every next token is predicted.

    Each passage is ``tokenizer(line).input_ids``; its first token is the
    prompt and the rest are the targets, so the summed loss is the LM loss of
    every next token. Passages of fewer than 2 tokens predict nothing and are
    left out.

    Arguments
    ---------
    passages : list of str
        Lines of text.
    tokenizer : transformers.PreTrainedTokenizerBase
        The LLM's HF tokenizer.

    Returns
    -------
    DynamicItemDataset
    """
    items = {}
    for number, line in enumerate(passages):
        ids = tokenizer(line).input_ids
        if len(ids) >= 2:
            items[f"line{number + 1}"] = {"ids": json.dumps(ids)}
    dataset = sb.dataio.dataset.DynamicItemDataset(items)

    @sb.utils.data_pipeline.takes("ids")
    @sb.utils.data_pipeline.provides("prompt_ids", "answer_ids")
    def split_ids(ids):
        """The first token as the prompt, the rest as targets."""
        ids = json.loads(ids)
        yield torch.tensor(ids[:1], dtype=torch.long)
        yield torch.tensor(ids[1:], dtype=torch.long)

    dataset.add_dynamic_item(split_ids)
    dataset.set_output_keys(["id", "prompt_ids", "answer_ids"])
    return dataset


def text_set(path, prompt, hf_tokenizer):
    """The scored dataset of a text file and a description of it.

    Arguments
    ---------
    path : str
        A file in one of ``FORMATS``.
    prompt : ChatPrompt
        The LLM's prompt builder (QA files).
    hf_tokenizer : transformers.PreTrainedTokenizerBase
        The LLM's tokenizer (plain text).

    Returns
    -------
    dataset : DynamicItemDataset
    description : dict
        ``file``, ``format`` (``qa`` or ``text``), ``items``, ``skipped``.
    """
    if not os.path.isfile(path):
        raise TextSetError(f"Text file {path!r} not found; pass --text with a file of {FORMATS}.")
    if not path.endswith(FORMATS):
        raise TextSetError(f"Text file {path!r}: unknown format; use a file ending in {FORMATS}.")
    if path.endswith(".txt"):
        passages = read_passages(path)
        dataset = passage_dataset(passages, hf_tokenizer)
        kind, skipped = "text", len(passages) - len(dataset)
    else:
        rows, skipped = read_qa_rows(path)
        kind = "qa"
        data = {row["ID"]: row for row in rows}
        dataset = (
            make_qa_dataset(
                sb.dataio.dataset.DynamicItemDataset(data), prompt, with_audio=False, name=path
            )
            if data
            else []
        )
    if len(dataset) == 0:
        expected = (
            "lines of at least 2 tokens"
            if kind == "text"
            else "records with a question (question / Questions / qText) and an answer "
            "(answer / Answer / answers)"
        )
        raise TextSetError(
            f"Text file {path!r} has no usable item ({skipped} skipped); it needs {expected}."
        )
    return dataset, {"file": path, "format": kind, "items": len(dataset), "skipped": skipped}
