"""Data preparation of the real-model study: spoken WebQuestions and LLaMA Questions.

Inputs (obtain them from their sources; the recipe only reads them):

* ``data_folder``: WebQuestions (Berant et al. 2013) as in
  github.com/brmson/dataset-factoid-webquestions ``main/``: ``trainmodel.json``,
  ``val.json`` and ``test.json``, lists of ``{qId, qText, answers: [...]}``.
* ``llama_questions_folder``: LLaMA Questions (github.com/google-research-datasets/
  LLAMA1-Test-Set): ``llama_questions_300.tsv`` (``Questions``, ``Answer``,
  ``Wav Filename``) and the real recordings ``1.wav`` .. ``300.wav``.

Outputs (``save_folder``), SpeechBrain CSVs with ``ID, wav, duration, question, answer,
alternatives`` (``answer`` the first accepted answer, ``alternatives`` all of them as a
JSON list):

* ``train.csv``: ``num_train`` WebQ training questions, each synthesised with
  eSpeak NG in one of the training voices (in turn);
* ``align.csv``: the rows of ``train.csv`` plus ``varied_renderings`` more renderings
  of each question, each in a voice drawn at random from many eSpeak NG accents and
  voice variants, at a random rate and pitch (acoustic variety for the adaptor's
  alignment; the WebQ test voice's variant is never drawn);
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
import speechbrain as sb
from tqdm import tqdm

from speechbrain_sllm.data.augmentation import RenderingAugmenter
from speechbrain_sllm.data.dataio import encode_alternatives, write_csv_manifest
from speechbrain_sllm.data.preparation import completion_record, is_prepared, staged_preparation
from speechbrain_sllm.data.synthetic import TEST_VOICES, TRAIN_VOICES
from speechbrain_sllm.data.tts import FliteTTS, Synthesisers
from speechbrain_sllm.study.alignment import read_rows

logger = logging.getLogger(__name__)
FIELDS = ["ID", "wav", "duration", "question", "answer", "alternatives"]
WEBQ_FILES = {"train": "trainmodel.json", "valid": "val.json", "webq_test": "test.json"}
LLAMAQ_TSV = "llama_questions_300.tsv"
# Varied renderings: eSpeak NG English accents x voice variants, rates (wpm), pitches
VARIED_ACCENTS = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc", "en-029"]
VARIED_VARIANTS = [
    "m1", "m2", "m4", "m5", "m6", "m8", "f1", "f5", "klatt", "klatt2", "klatt3", "Alex",
    "Andy", "Annie", "david", "linda", "steph", "john", "ian", "paul", "robert", "benjamin",
    "edward", "grandpa", "aunty", "max", "rob", "travis", "zac", "shelby", "belinda",
    "anika", "quincy", "victor", "norbert",
]  # fmt: skip
VARIED_RATES = (130, 200)
VARIED_PITCHES = (30, 70)
# Flite's CMU voices (apt-get install flite): clustergen slt / rms / awb, diphone kal16
FLITE_TRAIN_VOICES = [
    ("flite:slt", 175),
    ("flite:rms", 160),
    ("flite:awb", 175),
    ("flite:kal16", 185),
]
VOICE_SETS = ("espeak", "flite", "espeak+flite")


def source_files(data_folder, llama_questions_folder):
    """The WebQuestions JSON files and the LLaMA Questions TSV, each checked to exist.

    Arguments
    ---------
    data_folder : str
        WebQuestions' ``main/`` folder.
    llama_questions_folder : str
        The LLaMA Questions folder.

    Returns
    -------
    list of str
    """
    sources = [os.path.join(data_folder, name) for name in WEBQ_FILES.values()]
    sources.append(os.path.join(llama_questions_folder, LLAMAQ_TSV))
    for path in sources:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: set `data_folder` to WebQuestions' main/ folder and "
                "`llama_questions_folder` to the LLaMA Questions folder (see the recipe README)."
            )
    return sources


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
    varied_renderings=0,
    voice_set="espeak",
    augment_renderings=False,
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
    varied_renderings : int
        Extra renderings of each training question in ``align.csv``, in no test voice (0: none).
    voice_set : str
        Voices of train / valid / renderings: ``espeak``, ``flite`` or ``espeak+flite``.
    augment_renderings : bool
        Speed perturbation, reverberation and noise on each varied rendering (seeded).
    seed : int
        Seed of the question and voice draws.
    skip_prep : bool
        Do nothing.
    on_change : str
        ``redo`` or ``stop`` when a source or an option changed.

    Returns
    -------
    dict
        ``{split: manifest path}`` (``train``, ``valid``, ``webq_test``, ``llamaq_test``, ``align``).
    """
    splits = (*WEBQ_FILES, "llamaq_test", "align")
    paths = {split: os.path.join(save_folder, f"{split}.csv") for split in splits}
    if skip_prep:
        return paths
    train_voices, test_voices = checked_voices(voice_set, train_voices, test_voices)
    counts = {"train": num_train, "valid": num_valid, "webq_test": num_test}
    options = dict(counts=counts, num_llamaq=num_llamaq, seed=seed, voice_set=voice_set)
    options.update(train_voices=train_voices, test_voices=test_voices)
    options.update(varied_renderings=varied_renderings, augment_renderings=augment_renderings)
    record = preparation_record(data_folder, llama_questions_folder, options)
    if is_prepared(save_folder, record, [f"{split}.csv" for split in splits], on_change):
        logger.info(f"WebQuestions / LLaMA Questions manifests in {save_folder} are up to date.")
        return paths
    variety = dict(renderings=varied_renderings, unseen_voices=test_voices, voice_set=voice_set)
    variety.update(augment=augment_renderings, seed=seed)
    with staged_preparation(save_folder, record) as staging:
        speak_webquestions(
            data_folder, save_folder, counts, train_voices, test_voices, variety, staging
        )
        rows = read_llama_questions(llama_questions_folder, num_llamaq)
        write_csv_manifest(rows, FIELDS, os.path.join(staging, "llamaq_test.csv"))
    return paths


def preparation_record(data_folder, llama_questions_folder, options):
    """The completion record of the sources and the preparation's options."""
    sources = source_files(data_folder, llama_questions_folder)
    return completion_record(sources, json.loads(json.dumps(options)))


def checked_voices(voice_set, train_voices, test_voices):
    """The training voices of ``voice_set`` and the test voices, as tuples; the test
    voices must not be training voices (the WebQ test set is heard in an unseen voice)."""
    train_voices = voices_of_set(voice_set, [tuple(v) for v in train_voices])
    test_voices = [tuple(v) for v in test_voices]
    if set(train_voices) & set(test_voices):
        raise ValueError(
            f"prepare_webquestions: test voices {test_voices} overlap the training voices; "
            "the WebQ test set must be spoken by an unseen voice."
        )
    return train_voices, test_voices


def speak_webquestions(
    data_folder, save_folder, counts, train_voices, test_voices, variety, staging
):
    """Draws and synthesises each WebQ split (train / valid in ``train_voices``, test in
    ``test_voices``): audio under ``save_folder``, manifests in ``staging`` (one
    synthesiser per engine, splits in a fixed order)."""
    tts = Synthesisers(sample_rate=16000)
    for split, file_name in WEBQ_FILES.items():
        items = draw(
            read_webquestions(os.path.join(data_folder, file_name)),
            counts[split],
            variety["seed"],
        )
        split_voices = test_voices if split == "webq_test" else train_voices
        speak_split(items, split, split_voices, tts, save_folder, staging, variety)


def speak_split(items, split, voices, tts, save_folder, staging, variety):
    """Speaks one WebQuestions split and writes its manifest (training: ``align.csv`` too).

    Arguments
    ---------
    items : list of dict
        The drawn questions.
    split : str
        ``train``, ``valid`` or ``webq_test``.
    voices : list of tuple
        eSpeak voices of the split.
    tts : Synthesisers
        The synthesiser (one for the whole preparation: eSpeak's output depends on
        what the process spoke before).
    save_folder : str
        The preparation folder (audio under ``wav/<split>``).
    staging : str
        Where the manifests are staged.
    variety : dict
        The training split's extra renderings: ``renderings``, ``unseen_voices``,
        ``voice_set``, ``augment``, ``seed`` (see ``speak_varied``).
    """
    folder = os.path.join(save_folder, "wav", split)
    rows = speak_items(items, voices, tts, folder, split)
    write_csv_manifest(rows, FIELDS, os.path.join(staging, f"{split}.csv"))
    if split == "train":
        varied = speak_varied(rows, tts=tts, folder=folder, **variety)
        write_csv_manifest(rows + varied, FIELDS, os.path.join(staging, "align.csv"))


def read_webquestions(path):
    """WebQuestions items as ``{"ID", "question", "answer", "alternatives"}``.

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
            {
                "ID": str(item.get("qId", number)),
                "question": question,
                "answer": answers[0],
                "alternatives": encode_alternatives(answers),
            }
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


def varied_voices(count, unseen_voices, rng, voice_set="espeak"):
    """``count`` random voices as ``(voice, rate, pitch)``.

    eSpeak: accents and variants from ``VARIED_ACCENTS`` x ``VARIED_VARIANTS``,
    the variants of ``unseen_voices`` (the test voices) left out; Flite: its
    voices at a random rate. ``espeak+flite`` draws the engine per voice.

    Arguments
    ---------
    count : int
        Voices drawn.
    unseen_voices : list of (str, int)
        Voices that must stay unheard in training.
    rng : random.Random
        The draw's generator.
    voice_set : str
        One of ``VOICE_SETS``.

    Returns
    -------
    list of (str, int, int)

    Example
    -------
    >>> voices = varied_voices(200, [("en-us+m7", 160), ("en-us+f4", 160)], random.Random(0))
    >>> any(voice.endswith(("+m7", "+f4")) for voice, _, _ in voices)
    False
    >>> len({voice for voice, _, _ in voices}) > 100
    True
    >>> mixed = varied_voices(100, [], random.Random(0), "espeak+flite")
    >>> 20 < sum(voice.startswith("flite:") for voice, _, _ in mixed) < 80
    True
    """
    check_voice_set(voice_set)
    unseen = {voice.partition("+")[2] for voice, _ in unseen_voices}
    variants = [variant for variant in VARIED_VARIANTS if variant not in unseen]
    voices = []
    for _ in range(count):
        flite = voice_set == "flite" or (voice_set == "espeak+flite" and rng.random() < 0.5)
        if flite:
            name = f"flite:{rng.choice(FliteTTS.VOICES)}"
        else:
            name = f"{rng.choice(VARIED_ACCENTS)}+{rng.choice(variants)}"
        voices.append((name, rng.randint(*VARIED_RATES), rng.randint(*VARIED_PITCHES)))
    return voices


def check_voice_set(voice_set):
    """Raises a clear error for an unknown ``voice_set`` or a missing Flite."""
    if voice_set not in VOICE_SETS:
        raise ValueError(f"voice_set {voice_set!r} unknown; use one of {VOICE_SETS}.")
    if "flite" in voice_set and not FliteTTS.available():
        raise FileNotFoundError(
            f"voice_set {voice_set!r} needs the flite program (apt-get install flite); "
            "or use --voice_set=espeak."
        )


def voices_of_set(voice_set, espeak_voices):
    """The train / valid voices of a voice set (eSpeak's, Flite's, or both in turn).

    Example
    -------
    >>> voices_of_set("espeak", [("en-us", 165)])
    [('en-us', 165)]
    """
    check_voice_set(voice_set)
    if voice_set == "espeak":
        return espeak_voices
    if voice_set == "flite":
        return list(FLITE_TRAIN_VOICES)
    return [voice for pair in zip(espeak_voices, FLITE_TRAIN_VOICES) for voice in pair]


def speak_varied(
    rows, renderings, unseen_voices, tts, folder, seed, voice_set="espeak", augment=False
):
    """``renderings`` more recordings of each row's question, each in a random voice.

    Arguments
    ---------
    rows : list of dict
        Manifest rows (``ID``, ``question``, ``answer``...).
    renderings : int
        Recordings added per row.
    unseen_voices : list of (str, int)
        Voices never drawn (the test voices).
    tts : Synthesisers
        The synthesisers.
    folder : str
        Where the wav files go.
    seed : int
        Seed of the voice draw (and of the augmentation).
    voice_set : str
        ``espeak``, ``flite`` or ``espeak+flite`` (each rendering's engine drawn).
    augment : bool
        Pass each rendering through ``RenderingAugmenter``.

    Returns
    -------
    list of dict
        The new rows, with ids ``<ID>_v<k>``.
    """
    rng = random.Random(seed)
    augmenter = RenderingAugmenter(seed=seed) if augment else None
    varied = []
    for k in range(1, renderings + 1):
        voices = varied_voices(len(rows), unseen_voices, rng, voice_set)
        items = [{**row, "ID": f"{row['ID']}_v{k}"} for row in rows]
        varied += speak_items(items, voices, tts, folder, f"varied {k}", "", augmenter)
    return varied


def speak_items(items, voices, tts, folder, split, prefix=None, augmenter=None):
    """Synthesises each question in one voice (voices taken in turn); returns manifest rows.

    Arguments
    ---------
    items : list of dict
        ``{"ID", "question", "answer"}``.
    voices : list of tuple
        eSpeak voice names and speaking rates ``(voice, rate)``, optionally with a
        pitch ``(voice, rate, pitch)``.
    tts : Synthesisers
        The synthesiser.
    folder : str
        Where the wav files go.
    split : str
        Name of the split (the progress bar's label).
    prefix : str or None
        Prefix of the utterance ids (default: ``<split>_``).
    augmenter : RenderingAugmenter or None
        Applied to each clip (seeded by its position) before it is written.

    Returns
    -------
    list of dict
    """
    os.makedirs(folder, exist_ok=True)
    prefix = f"{split}_" if prefix is None else prefix
    rows = []
    for index, item in enumerate(tqdm(items, desc=f"speaking {split}")):
        voice, rate, *pitch = voices[index % len(voices)]
        wav = tts.synthesize(item["question"], voice=voice, rate=rate, pitch=(pitch or [50])[0])
        if augmenter is not None:
            wav = augmenter(wav, index)
        utt_id = f"{prefix}{item['ID']}"
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
            {
                "ID": utt_id,
                "wav": wav,
                "duration": duration,
                "question": question,
                "answer": answer,
                "alternatives": encode_alternatives([answer]),
            }
        )
    return rows


def prepare_study_manifests(
    data_folder, save_folder, llama_questions_folder, num_finetune, **options
):
    """The study's manifests (prepared on the main process), ``train`` cut to ``num_finetune``.

    Stage 1a (CTC) reads ``align`` (every spoken training question, with its
    varied renderings); answer targets, stage 1b, stage 2 and importance read
    the first ``num_finetune``.

    Arguments
    ---------
    data_folder : str
        Passed to ``prepare_webquestions`` (so are the next two).
    save_folder : str
        Where the manifests and audio go (the study's ``manifest_folder``).
    llama_questions_folder : str
        The TSV and recordings of LLaMA Questions.
    num_finetune : int
        Training questions kept in ``train``.
    **options : dict
        ``prepare_webquestions``'s options (``num_train``, ``voice_set``, ...).

    Returns
    -------
    dict
        ``{split: manifest}`` as ``prepare_webquestions`` returns it.
    """
    folders = (data_folder, save_folder, llama_questions_folder)
    sb.utils.distributed.run_on_main(prepare_webquestions, args=folders, kwargs=options)
    paths = prepare_webquestions(*folders, skip_prep=True)
    rows = read_rows(paths["train"])
    if num_finetune < len(rows):
        subset = os.path.join(save_folder, "train_finetune.csv")
        sb.utils.distributed.run_on_main(
            write_csv_manifest, args=[rows[:num_finetune], FIELDS, subset]
        )
        paths = dict(paths, train=subset)
    return paths
