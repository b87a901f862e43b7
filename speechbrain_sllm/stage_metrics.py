"""A Brain's validation and test metrics, accumulated batch by batch.

Authors
 * speechbrain-sllm developers 2026
"""

import os

from speechbrain_sllm.evaluation import MAX_METRICS, METRICS, answer_loss_sum, perplexity_of
from speechbrain_sllm.metrics import QAAccuracyStats, wer_stats, write_stats


class StageMetrics:
    """Validation or test metrics of a Brain, accumulated batch by batch.

    ``WER`` (generated transcript vs ``answer``), ``S2T`` / ``T2T`` (spoken /
    written QA accuracy), ``text_ppl`` (perplexity of ``text_set`` when given,
    else of the batches' written questions). Each batch is decoded once per
    input mode the metrics need. Every rank scores every batch (SpeechBrain
    does not split validation data), which keeps FSDP ranks in step.

    Arguments
    ---------
    names : list of str
        Among ``METRICS``.
    answer_match : str
        ``contains`` or ``exact``.
    text_set : DynamicItemDataset or None
        Written QA for ``text_ppl``.

    Example
    -------
    >>> StageMetrics(["S2T", "WER"]).summarize(None)
    {'S2T': 0.0, 'WER': 0.0}
    """

    def __init__(self, names, answer_match="contains", text_set=None):
        unknown = sorted(set(names) - set(METRICS))
        if unknown:
            raise ValueError(f"metrics {unknown} unknown; use some of {METRICS}.")
        self.text_set = text_set
        trackers = {
            "WER": wer_stats,
            "S2T": lambda: QAAccuracyStats(answer_match=answer_match),
            "T2T": lambda: QAAccuracyStats(answer_match=answer_match),
            "text_ppl": lambda: [0.0, 0],  # summed answer loss, answer tokens
        }
        self.stats = {name: trackers[name]() for name in names}

    def append(self, evaluator, batch):
        """Scores one batch.

        Arguments
        ---------
        evaluator : QAEvaluator
            The model to score.
        batch : PaddedBatch
            From ``make_qa_dataset``.
        """
        decoded = {}
        for name, stats in self.stats.items():
            if name == "text_ppl":
                if self.text_set is None:
                    batch_total, batch_count = answer_loss_sum(*evaluator.forward(batch, "text"))
                    stats[0] += batch_total
                    stats[1] += batch_count
                continue
            mode = "text" if name == "T2T" else "speech"
            if mode not in decoded:
                decoded[mode] = evaluator.decode_batch(batch, mode)
            ids = list(batch.id)
            if name == "WER":
                texts = (decoded[mode], list(batch.answer))
                stats.append(ids, *[[text.split() for text in column] for column in texts])
            else:
                stats.append(ids, decoded[mode], list(batch.references))

    def summarize(self, evaluator):
        """``{metric: value}`` (``text_ppl`` of ``text_set`` is computed here, on all ranks)."""
        results = {}
        for name, stats in self.stats.items():
            if name == "WER":
                results[name] = stats.summarize("error_rate") if stats.scores else 0.0
            elif name in MAX_METRICS:
                results[name] = stats.summarize("accuracy") if stats.scores else 0.0
            elif self.text_set is not None:
                results[name] = evaluator.perplexity(self.text_set, "text")
            else:
                results[name] = perplexity_of(*stats)
        return results

    def write(self, folder, name):
        """Per-item reports (main process): ``<folder>/<name>_s2t.tsv`` / ``_t2t.tsv``
        (the studies' name for the same file) and SpeechBrain's alignments ``<name>_wer.txt``."""
        for metric, stats in self.stats.items():
            if hasattr(stats, "write_stats"):
                write_stats(stats, os.path.join(folder, report_file_name(name, metric)))


def report_file_name(name, metric):
    """The per-item report of a set and metric: ``<set>_<metric>.tsv`` (``.txt`` for WER).

    Example
    -------
    >>> report_file_name("llama_questions", "S2T"), report_file_name("test-clean", "WER")
    ('llama_questions_s2t.tsv', 'test-clean_wer.txt')
    """
    return f"{name}_{metric.lower()}.{'txt' if metric == 'WER' else 'tsv'}"
