"""QA accuracy with normalised answer matching, and WER through SpeechBrain.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import math
import os
import re
import string

import speechbrain as sb
from speechbrain.utils.metric_stats import ErrorRateStats, MetricStats

ARTICLES = re.compile(r"\b(a|an|the)\b")
ANSWER_MATCHES = ("contains", "exact")
SMALL_NUMBERS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
TENS = {
    word: 10 * (value + 2)
    for value, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())
}
TENS["fourty"] = 40  # a misspelling found in LLaMA Questions' references
SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
SCALES.update({f"{word}s": value for word, value in list(SCALES.items())})
NUMBER_WORDS = {**SMALL_NUMBERS, **TENS, **SCALES}
TOKEN = re.compile(r"[a-z]+|\d[\d,]*|[^a-z\d]+")


def number_value(words):
    """The value of a run of English number words ("two hundred forty eight" -> 248).

    Arguments
    ---------
    words : list of str
        Lower-case number words (``NUMBER_WORDS``), ``and`` allowed between them.

    Returns
    -------
    int

    Example
    -------
    >>> number_value(["one", "hundred", "and", "five"])
    105
    >>> number_value(["sixty", "thousands"])
    60000
    """
    total, current = 0, 0
    for word in words:
        if word == "and":
            continue
        if word in SCALES:
            scale = SCALES[word]
            if scale == 100:
                current = max(current, 1) * 100
            else:
                total += max(current, 1) * scale
                current = 0
        else:
            current += NUMBER_WORDS[word]
    return total + current


def numbers_to_digits(text):
    """Writes English number words as digits and drops thousands separators.

    Runs of number words (joined by spaces, hyphens or ``and``; ``a hundred``
    counts as one hundred) become one integer, so "Twenty-four", "twenty four"
    and "24" normalise alike.

    Arguments
    ---------
    text : str
        Lower-case text.

    Returns
    -------
    str

    Example
    -------
    >>> numbers_to_digits("it has twenty-four legs and 1,000 eyes")
    'it has 24 legs and 1000 eyes'
    >>> numbers_to_digits("a hundred and one dalmatians")
    '101 dalmatians'
    """
    tokens = TOKEN.findall(text)
    out, index = [], 0
    while index < len(tokens):
        run, end = number_run(tokens, index)
        if run:
            out.append(str(number_value(run)))
            index = end
        else:
            out.append(
                tokens[index].replace(",", "") if tokens[index][0].isdigit() else tokens[index]
            )
            index += 1
    return "".join(out)


def number_run(tokens, start):
    """The number words of the run starting at ``tokens[start]`` and the index after it.

    Returns ``([], start)`` when no number starts there.
    """
    words, index, end = [], start, start
    following = tokens[start + 1 : start + 3]
    if (
        tokens[start] == "a"
        and len(following) == 2
        and following[0] == " "
        and following[1] in SCALES
    ):
        words, index = ["one"], start + 2
    while index < len(tokens):
        token = tokens[index]
        if token in NUMBER_WORDS:
            words.append(token)
            index += 1
            end = index
        elif token == "and" and words and words[-1] in SCALES:
            words.append(token)
            index += 1
        elif words and token.strip() in ("", "-"):
            index += 1
        else:
            break
    if end == start:
        return [], start
    while words[-1] == "and":
        words.pop()
    return words, end


def normalize_answer(text):
    """Lower-cases, writes numbers as digits, removes punctuation and articles (SQuAD style).

    Arguments
    ---------
    text : str
        Answer or prediction.

    Returns
    -------
    str

    Example
    -------
    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    >>> normalize_answer("Two hundred fourty eight")
    '248'
    """
    text = numbers_to_digits(text.lower())
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def check_answer_match(answer_match):
    """Raises a clear error for an unknown ``answer_match`` (``contains`` or ``exact``)."""
    if answer_match not in ANSWER_MATCHES:
        raise ValueError(f"answer_match {answer_match!r} unknown; use one of {ANSWER_MATCHES}.")


def answer_matches(prediction, references, answer_match="contains"):
    """Whether a prediction matches any reference after normalisation.

    ``contains`` (the Llama Questions / Web Questions convention) accepts a
    prediction that contains a reference as a whole-word span; ``exact`` needs
    equality.

    Arguments
    ---------
    prediction : str
        Model output.
    references : str or list of str
        One accepted answer, or the list of them.
    answer_match : str
        ``contains`` or ``exact``.

    Returns
    -------
    bool

    Example
    -------
    >>> answer_matches("It is Paris, I think.", "paris")
    True
    >>> answer_matches("Parisian", "paris")
    False
    >>> answer_matches("paris", ["Lyon", "Paris"], answer_match="exact")
    True
    >>> answer_matches("AC", "AC|DC")  # one answer: "|" is a character like any other
    False
    """
    check_answer_match(answer_match)
    if isinstance(references, str):
        references = [references]
    pred = normalize_answer(prediction)
    for reference in references:
        ref = normalize_answer(reference)
        if not ref:
            continue
        if answer_match == "exact" and pred == ref:
            return True
        if answer_match == "contains" and f" {ref} " in f" {pred} ":
            return True
    return False


class QAAccuracyStats(MetricStats):
    """Accumulates QA predictions and reports accuracy (%) with normalised matching.

    Arguments
    ---------
    answer_match : str
        ``contains`` or ``exact``.

    Example
    -------
    >>> stats = QAAccuracyStats()
    >>> stats.append(["q1", "q2"], ["paris", "no idea"], ["Paris", "Rome"])
    >>> stats.summarize("accuracy")
    50.0
    """

    def __init__(self, answer_match="contains"):
        check_answer_match(answer_match)
        self.answer_match = answer_match
        self.clear()

    def clear(self):
        """Forgets all items."""
        self.ids, self.predictions, self.references, self.scores = [], [], [], []
        self.summary = {}

    def append(self, ids, predictions, references):
        """Adds a batch of predictions.

        Arguments
        ---------
        ids : list of str
            Item ids.
        predictions : list of str
            Decoded model outputs.
        references : list of (str or list of str)
            Each item's accepted answer, or the list of them.
        """
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        for pred, ref in zip(predictions, references):
            self.scores.append(float(answer_matches(pred, ref, self.answer_match)))
        self.ids.extend(ids)
        self.predictions.extend(predictions)
        self.references.extend(references)

    def summarize(self, field=None):
        """Accuracy in percent (``field='accuracy'``) or the dict with the count."""
        count = len(self.scores)
        accuracy = 100.0 * sum(self.scores) / count if count else 0.0
        self.summary = {"accuracy": accuracy, "count": count}
        return self.summary[field] if field else self.summary

    def write_stats(self, filestream):
        """Writes one line per item: id, match, prediction, accepted answers.

        Fields are escaped by ``tsv_field``; the accepted answers are one JSON
        list, so an answer holding ``|`` or ``,`` reads back as written.
        """
        for item_id, score, prediction, reference in zip(
            self.ids, self.scores, self.predictions, self.references
        ):
            fields = (
                tsv_field(item_id),
                f"{score:.0f}",
                tsv_field(prediction),
                tsv_field(json.dumps(reference, ensure_ascii=False)),
            )
            filestream.write("\t".join(fields) + "\n")


def tsv_field(text):
    r"""Escapes backslashes, tabs and newlines so a field stays on its line and column.

    Arguments
    ---------
    text : str
        A prediction, reference or id.

    Returns
    -------
    str

    Example
    -------
    >>> print(tsv_field("two\nlines\tand a tab"))
    two\nlines\tand a tab
    """
    return str(text).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def wer_stats():
    """SpeechBrain's ``ErrorRateStats`` for word error rate.

    Returns
    -------
    speechbrain.utils.metric_stats.ErrorRateStats

    Example
    -------
    >>> stats = wer_stats()
    >>> stats.append(["u1"], [["a", "b"]], [["a", "c"]])
    >>> stats.summarize("error_rate")
    50.0
    """
    return ErrorRateStats()


def paired_test(before, after):
    """Exact McNemar test of two systems scored on the same items.

    Arguments
    ---------
    before : list of bool
        Per-item correctness of the first system.
    after : list of bool
        Per-item correctness of the second, same items in the same order.

    Returns
    -------
    dict
        ``lost`` (right before, wrong after), ``gained`` (the reverse) and the
        two-sided ``p`` value of the exact binomial test on the discordant items.

    Example
    -------
    >>> paired_test([1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0])
    {'lost': 6, 'gained': 0, 'p': 0.03125}
    """
    if len(before) != len(after):
        raise ValueError(f"paired_test: {len(before)} items before, {len(after)} after.")
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    gained = sum(1 for a, b in zip(before, after) if b and not a)
    n, k = lost + gained, min(lost, gained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"lost": lost, "gained": gained, "p": min(1.0, 2 * tail)}


def read_item_scores(path):
    """``{id: correct}`` from a file written by ``QAAccuracyStats.write_stats``.

    Arguments
    ---------
    path : str
        The per-item TSV.

    Returns
    -------
    dict
    """
    with open(path, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    return {row[0]: row[1] == "1" for row in rows}


def write_stats(stats, output_file):
    """Writes a SpeechBrain stats object's per-item report (main process; None: nothing).

    Arguments
    ---------
    stats : MetricStats
        ``QAAccuracyStats`` or ``ErrorRateStats``.
    output_file : str or None
        The report's path.
    """
    if output_file and sb.utils.distributed.if_main_process():
        os.makedirs(os.path.dirname(output_file) or ".", exist_ok=True)
        with open(output_file, "w") as handle:
            stats.write_stats(handle)
