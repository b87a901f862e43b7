"""QA accuracy with normalised answer matching, and WER through SpeechBrain.

Authors
 * speechbrain-sllm developers 2026
"""

import re
import string

from speechbrain.utils.metric_stats import ErrorRateStats, MetricStats

ARTICLES = re.compile(r"\b(a|an|the)\b")
MATCH_MODES = ("contains", "exact")


def normalize_answer(text):
    """Lower-cases, removes punctuation and articles, collapses whitespace (SQuAD style).

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
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_matches(prediction, references, mode="contains"):
    """Whether a prediction matches any reference after normalisation.

    ``contains`` (the Llama Questions / Web Questions convention) accepts a
    prediction that contains a reference as a whole-word span; ``exact`` needs
    equality.

    Arguments
    ---------
    prediction : str
        Model output.
    references : str or list of str
        Accepted answers (``|``-separated in a string).
    mode : str
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
    >>> answer_matches("paris", "Lyon|Paris", mode="exact")
    True
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"answer match mode {mode!r} unknown; use one of {MATCH_MODES}.")
    if isinstance(references, str):
        references = references.split("|")
    pred = normalize_answer(prediction)
    for reference in references:
        ref = normalize_answer(reference)
        if not ref:
            continue
        if mode == "exact" and pred == ref:
            return True
        if mode == "contains" and f" {ref} " in f" {pred} ":
            return True
    return False


class QAAccuracyStats(MetricStats):
    """Accumulates QA predictions and reports accuracy (%) with normalised matching.

    Arguments
    ---------
    mode : str
        ``contains`` or ``exact``.

    Example
    -------
    >>> stats = QAAccuracyStats()
    >>> stats.append(["q1", "q2"], ["paris", "no idea"], ["Paris", "Rome"])
    >>> stats.summarize("accuracy")
    50.0
    """

    def __init__(self, mode="contains"):
        if mode not in MATCH_MODES:
            raise ValueError(f"answer match mode {mode!r} unknown; use one of {MATCH_MODES}.")
        self.mode = mode
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
        references : list of str
            Reference answers.
        """
        for pred, ref in zip(predictions, references):
            self.scores.append(float(answer_matches(pred, ref, self.mode)))
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
        """Writes one line per item: id, match, prediction, reference (see ``tsv_field``)."""
        for item_id, score, prediction, reference in zip(
            self.ids, self.scores, self.predictions, self.references
        ):
            fields = (
                tsv_field(item_id),
                f"{score:.0f}",
                tsv_field(prediction),
                tsv_field(reference),
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
