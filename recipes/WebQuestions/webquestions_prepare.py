"""Data preparation of the real-model study: spoken WebQuestions and LLaMA Questions.

Inputs (obtain them from their sources; the recipe only reads them):

* ``data_folder``: WebQuestions (Berant et al. 2013) as in
  github.com/brmson/dataset-factoid-webquestions ``main/``: ``trainmodel.json``,
  ``val.json`` and ``test.json``, lists of ``{qId, qText, answers: [...]}``.
* ``llama_questions_folder``: LLaMA Questions (github.com/google-research-datasets/
  LLAMA1-Test-Set): ``llama_questions_300.tsv`` (``Questions``, ``Answer``,
  ``Wav Filename``) and the real recordings ``1.wav`` .. ``300.wav``.

Outputs (``save_folder``), SpeechBrain CSVs with ``ID, wav, duration, question, answer``
(alternative answers joined by ``|``):

* ``train.csv``: ``num_train`` WebQ training questions, each synthesised with
  eSpeak NG in one of the training voices (in turn);
* ``valid.csv``: ``num_valid`` WebQ validation questions, in the same voices;
* ``webq_test.csv``: ``num_test`` WebQ test questions in a voice unseen in training;
* ``llamaq_test.csv``: the first ``num_llamaq`` LLaMA Questions with their real recordings.

Questions are drawn with a fixed seed. The manifests are redone when a source
file or an option changed since the last preparation.

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import json
import logging
import os
import random

import soundfile
from tqdm import tqdm

from speechbrain_sllm.data.dataio import write_csv_manifest
from speechbrain_sllm.data.preparation import completion_record, is_prepared, staged_preparation
from speechbrain_sllm.data.synthetic import TEST_VOICES, TRAIN_VOICES
from speechbrain_sllm.data.tts import EspeakTTS

logger = logging.getLogger(__name__)
FIELDS = ["ID", "wav", "duration", "question", "answer"]
WEBQ_FILES = {"train": "trainmodel.json", "valid": "val.json", "webq_test": "test.json"}
LLAMAQ_TSV = "llama_questions_300.tsv"


def prepare_webquestions(
    data_folder,
    save_folder,
    llama_questions_folder,
    num_train=1500,
    num_valid=100,
    num_test=300,
    num_llamaq=300,
    train_voices=TRAIN_VOICES,
    test_voices=TEST_VOICES,
    seed=1234,
    skip_prep=False,
    on_change="redo",
):
    """Writes the four manifests and the synthesised audio, unless up to date.

    Arguments
    ---------
    data_folder : str
        WebQuestions ``main/`` folder.
    save_folder : str
        Output folder (manifests, ``wav/``).
    llama_questions_folder : str
        LLaMA Questions folder (TSV and recordings).
    num_train : int
        WebQ training questions used (seeded draw; all if larger).
    num_valid : int
        WebQ validation questions.
    num_test : int
        WebQ test questions.
    num_llamaq : int
        LLaMA Questions used (the first ones, in file order).
    train_voices : list of (str, int)
        eSpeak voices and speaking rates of train and valid.
    test_voices : list of (str, int)
        Voices of the WebQ test set (none of them in ``train_voices``).
    seed : int
        Seed of the question draws.
    skip_prep : bool
        Do nothing.
    on_change : str
        ``redo`` or ``stop`` when a source or an option changed.

    Returns
    -------
    dict
        ``{split: manifest path}`` for ``train``, ``valid``, ``webq_test``, ``llamaq_test``.
    """
    paths = {
        split: os.path.join(save_folder, f"{split}.csv") for split in (*WEBQ_FILES, "llamaq_test")
    }
    if skip_prep:
        return paths
    train_voices, test_voices = [tuple(v) for v in train_voices], [tuple(v) for v in test_voices]
    if set(train_voices) & set(test_voices):
        raise ValueError(
            f"prepare_webquestions: test voices {test_voices} overlap the training voices; "
            "the WebQ test set must be spoken by an unseen voice."
        )
    sources = [os.path.join(data_folder, name) for name in WEBQ_FILES.values()]
    sources.append(os.path.join(llama_questions_folder, LLAMAQ_TSV))
    for path in sources:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: set `data_folder` to WebQuestions' main/ folder and "
                "`llama_questions_folder` to the LLaMA Questions folder (see the recipe README)."
            )
    counts = {"train": num_train, "valid": num_valid, "webq_test": num_test}
    options = {"counts": counts, "num_llamaq": num_llamaq, "seed": seed}
    options.update({"train_voices": train_voices, "test_voices": test_voices})
    record = completion_record(sources, json.loads(json.dumps(options)))
    outputs = [os.path.basename(path) for path in paths.values()]
    if is_prepared(save_folder, record, outputs, on_change):
        logger.info(f"WebQuestions / LLaMA Questions manifests in {save_folder} are up to date.")
        return paths
    tts = EspeakTTS(sample_rate=16000)
    with staged_preparation(save_folder, record) as staging:
        for split, file_name in WEBQ_FILES.items():
            items = read_webquestions(os.path.join(data_folder, file_name))
            items = draw(items, counts[split], seed)
            voices = test_voices if split == "webq_test" else train_voices
            folder = os.path.join(save_folder, "wav", split)
            rows = speak_items(items, voices, tts, folder, split)
            write_csv_manifest(rows, FIELDS, os.path.join(staging, f"{split}.csv"))
        rows = read_llama_questions(llama_questions_folder, num_llamaq)
        write_csv_manifest(rows, FIELDS, os.path.join(staging, "llamaq_test.csv"))
    return paths


def read_webquestions(path):
    """WebQuestions items as ``{"ID", "question", "answer"}`` (answers joined by ``|``).

    Arguments
    ---------
    path : str
        A WebQuestions JSON file (a list of ``{qId, qText, answers}``).

    Returns
    -------
    list of dict
    """
    try:
        with open(path, encoding="utf-8") as handle:
            items = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    rows = []
    for number, item in enumerate(items):
        answers = [a.strip() for a in item.get("answers", []) if a and a.strip()]
        question = (item.get("qText") or "").strip()
        if not question or not answers:
            logger.warning(f"{path}: item {number} has no question or answer; skipped")
            continue
        rows.append(
            {"ID": str(item.get("qId", number)), "question": question, "answer": "|".join(answers)}
        )
    return rows


def draw(items, count, seed):
    """``count`` items drawn with ``seed``, kept in file order (all when ``count`` is larger).

    Example
    -------
    >>> draw(list(range(10)), 3, seed=0) == sorted(draw(list(range(10)), 3, seed=0))
    True
    """
    if count >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[index] for index in chosen]


def speak_items(items, voices, tts, folder, split):
    """Synthesises each question in one voice (voices taken in turn); returns manifest rows.

    Arguments
    ---------
    items : list of dict
        ``{"ID", "question", "answer"}``.
    voices : list of (str, int)
        eSpeak voice names and speaking rates.
    tts : EspeakTTS
        The synthesiser.
    folder : str
        Where the wav files go.
    split : str
        Prefix of the utterance ids.

    Returns
    -------
    list of dict
    """
    os.makedirs(folder, exist_ok=True)
    rows = []
    for index, item in enumerate(tqdm(items, desc=f"eSpeak {split}")):
        voice, rate = voices[index % len(voices)]
        wav = tts.synthesize(item["question"], voice=voice, rate=rate)
        utt_id = f"{split}_{item['ID']}"
        path = os.path.join(folder, f"{utt_id}.wav")
        soundfile.write(path, wav.numpy(), tts.sample_rate, subtype="PCM_16")
        duration = round(wav.shape[0] / tts.sample_rate, 3)
        rows.append({**item, "ID": utt_id, "wav": path, "duration": duration})
    return rows


def read_llama_questions(folder, count):
    """The first ``count`` LLaMA Questions with their recordings, as manifest rows.

    Arguments
    ---------
    folder : str
        Holds ``llama_questions_300.tsv`` and the wav files it names.
    count : int
        Questions used.

    Returns
    -------
    list of dict
    """
    path = os.path.join(folder, LLAMAQ_TSV)
    with open(path, encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    missing = {"Questions", "Answer", "Wav Filename"} - set(table[0] if table else {})
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}.")
    rows = []
    for row in table[:count]:
        wav = os.path.join(folder, row["Wav Filename"])
        if not os.path.isfile(wav):
            raise FileNotFoundError(f"{path}: recording {wav} not found.")
        duration = round(soundfile.info(wav).duration, 3)
        utt_id = "llamaq_" + os.path.splitext(row["Wav Filename"])[0]
        question, answer = row["Questions"].strip(), row["Answer"].strip()
        rows.append(
            {"ID": utt_id, "wav": wav, "duration": duration, "question": question, "answer": answer}
        )
    return rows
