"""A synthetic knowledge base of invented countries, its QA pairs, and spoken versions.

The entities and facts are invented, so a small LM pretrained on the text QA
knows exactly these facts (its "textual competence") and nothing leaks from
real-world knowledge. Every spoken question is real speech synthesised with
eSpeak NG in several voices and speaking rates.

Authors
 * speechbrain-sllm developers 2026
"""

import logging
import os
import random

import soundfile
from tqdm import tqdm

from speechbrain_sllm.data.dataio import write_csv_manifest

logger = logging.getLogger(__name__)

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "tr",
    "kl",
    "st",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "m"]
RELATIONS = {
    "capital": [
        "What is the capital of {entity}?",
        "Which city is the capital of {entity}?",
        "Tell me the capital city of {entity}.",
    ],
    "currency": [
        "What currency is used in {entity}?",
        "What is the money of {entity} called?",
        "Which currency do people pay with in {entity}?",
    ],
    "language": [
        "What language is spoken in {entity}?",
        "Which language do people speak in {entity}?",
        "What is the main language of {entity}?",
    ],
    "ruler": [
        "Who rules {entity}?",
        "Who is the leader of {entity}?",
        "Which person governs {entity}?",
    ],
}
TRAIN_VOICES = [("en-us", 165), ("en-us+f3", 150), ("en-us+m3", 180), ("en-us+f2", 140)]
VALID_VOICES = [("en-us+f4", 160)]
TEST_VOICES = [("en-us+m7", 160)]
FIELDS = ["ID", "wav", "duration", "question", "answer", "relation", "entity", "template"]


def invent_word(rng, syllables):
    """A pronounceable invented word, capitalised.

    Example
    -------
    >>> word = invent_word(random.Random(0), 2)
    >>> word.isalpha() and word[0].isupper()
    True
    """
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables - 1))
    word += rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
    return word.capitalize()


def make_knowledge_base(num_entities, seed=0):
    """Invents ``num_entities`` countries, each with a capital, currency, language and ruler.

    All invented words are distinct.

    Arguments
    ---------
    num_entities : int
        Number of countries.
    seed : int
        Random seed.

    Returns
    -------
    list of dict
        ``{"entity": ..., "capital": ..., "currency": ..., "language": ..., "ruler": ...}``.

    Example
    -------
    >>> kb = make_knowledge_base(3)
    >>> len(kb), sorted(kb[0])
    (3, ['capital', 'currency', 'entity', 'language', 'ruler'])
    """
    rng = random.Random(seed)
    used = set()

    def fresh(syllables):
        """An invented word of ``syllables`` syllables not used before."""
        while True:
            word = invent_word(rng, syllables)
            if word not in used:
                used.add(word)
                return word

    kb = []
    for _ in range(num_entities):
        fact = {"entity": fresh(3)}
        for relation in RELATIONS:
            fact[relation] = fresh(2)
        kb.append(fact)
    return kb


def make_qa_pairs(kb):
    """Every (fact, template) question with its answer.

    Arguments
    ---------
    kb : list of dict
        Output of ``make_knowledge_base``.

    Returns
    -------
    list of dict
        ``question``, ``answer``, ``relation``, ``entity``, ``template``.

    Example
    -------
    >>> pairs = make_qa_pairs(make_knowledge_base(2))
    >>> len(pairs)
    24
    """
    pairs = []
    for fact in kb:
        for relation, templates in RELATIONS.items():
            for index, template in enumerate(templates):
                pairs.append(
                    {
                        "question": template.format(entity=fact["entity"]),
                        "answer": fact[relation],
                        "relation": relation,
                        "entity": fact["entity"],
                        "template": index,
                    }
                )
    return pairs


def speak_pairs(pairs, folder, voices, tts, prefix, rate_jitter=15, seed=0, progress=True):
    """Synthesises each question in every voice; returns manifest rows.

    Arguments
    ---------
    pairs : list of dict
        QA pairs.
    folder : str
        Where the wav files go.
    voices : list of (str, int)
        eSpeak voice names with base speaking rates.
    tts : EspeakTTS
        The synthesiser.
    prefix : str
        Prefix of the utterance ids.
    rate_jitter : int
        Uniform jitter (words per minute) added to each rate.
    seed : int
        Random seed of the jitter.
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of dict
        Manifest rows with ``FIELDS``.
    """
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    jobs = [(pair, voice) for pair in pairs for voice in voices]
    for index, (pair, (voice, rate)) in enumerate(tqdm(jobs, disable=not progress, desc=prefix)):
        utt_id = f"{prefix}_{index:05d}"
        wav = tts.synthesize(
            pair["question"], voice=voice, rate=rate + rng.randint(-rate_jitter, rate_jitter)
        )
        path = os.path.join(folder, utt_id + ".wav")
        soundfile.write(path, wav.numpy(), tts.sample_rate, subtype="PCM_16")
        rows.append(
            {
                "ID": utt_id,
                "wav": path,
                "duration": round(wav.shape[0] / tts.sample_rate, 3),
                **{
                    key: pair[key]
                    for key in ("question", "answer", "relation", "entity", "template")
                },
            }
        )
    return rows


def text_rows(pairs, prefix):
    """Manifest rows for written questions (no audio)."""
    return [
        {"ID": f"{prefix}_{i:05d}", "wav": "", "duration": 0.0, **{k: p[k] for k in FIELDS[3:]}}
        for i, p in enumerate(pairs)
    ]


def write_manifest(rows, path):
    """Writes MiniSpokenQA manifest rows (``FIELDS``) atomically."""
    write_csv_manifest(rows, FIELDS, path)
