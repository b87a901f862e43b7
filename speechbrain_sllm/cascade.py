"""The cascade reference: an ASR model transcribes, the text LLM answers the transcript.

An end-to-end speech LLM's S2T is judged against what its own parts achieve in
a pipeline: the same Whisper checkpoint decoding with its own decoder (greedy),
then the base LLM answering the transcript as a written question. That is the
S2T ceiling for those parts, measured on the same items; its WER says how much
of the gap to T2T is recognition.

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import logging
import os

import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataloader import make_dataloader
from transformers.utils import logging as transformers_logging

from speechbrain_sllm.data.preparation import completion_record, is_prepared, staged_preparation
from speechbrain_sllm.metrics import normalize_answer, wer_stats, write_stats
from speechbrain_sllm.model.padding import absolute_lengths
from speechbrain_sllm.model.pretrained import pretrained_whisper

logger = logging.getLogger(__name__)


class WhisperTranscriber:
    """Greedy transcription with a Whisper checkpoint's own decoder (30 s window).

    Arguments
    ---------
    source : str
        Local folder (or hub id) of a ``WhisperForConditionalGeneration`` with
        its feature extractor and tokenizer files.
    device : str
        Where the model runs.
    max_new_tokens : int
        Decoding budget per clip.

    Example
    -------
    >>> WhisperTranscriber.clean(" What is the capital of France? ")
    'What is the capital of France?'
    """

    def __init__(self, source, device="cpu", max_new_tokens=96):
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        self.source = source
        self.model = pretrained_whisper(source, with_head=True).to(device).eval()
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.device = device
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def clean(text):
        """A decoded transcript without surrounding white space."""
        return text.strip()

    @torch.no_grad()
    def transcribe(self, wavs, wav_lens):
        """Transcripts of a padded batch of 16 kHz clips.

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, T)`` padded audio.
        wav_lens : torch.Tensor
            Relative lengths (SpeechBrain's convention).

        Returns
        -------
        list of str
        """
        lengths = absolute_lengths(wav_lens, wavs.shape[1]).tolist()
        clips = [wav[:length].cpu().numpy() for wav, length in zip(wavs, lengths)]
        rate = self.feature_extractor.sampling_rate
        features = self.feature_extractor(clips, sampling_rate=rate, return_tensors="pt")
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # Whisper's generate warns on every call
        try:
            generated = self.model.generate(
                features.input_features.to(self.device),
                max_new_tokens=self.max_new_tokens,
                num_beams=1,
                do_sample=False,
            )
        finally:
            transformers_logging.set_verbosity(verbosity)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [self.clean(text) for text in texts]

    def transcribe_dataset(self, dataset, batch_size=16):
        """Transcripts of every item of a spoken dataset (keys ``id``, ``sig``).

        Arguments
        ---------
        dataset : DynamicItemDataset
            Spoken items.
        batch_size : int
            Clips per ``generate`` call.

        Returns
        -------
        dict
            ``{item id: transcript}`` in the dataset's order.
        """
        transcripts = {}
        with dataset.output_keys_as(["id", "sig"]):
            loader = make_dataloader(dataset, batch_size=batch_size, collate_fn=PaddedBatch)
            for batch in loader:
                wavs, wav_lens = batch.sig
                for item_id, text in zip(batch.id, self.transcribe(wavs, wav_lens)):
                    transcripts[item_id] = text
        return transcripts


def transcript_wer(transcripts, questions, output_file=None):
    """WER (%) of transcripts against the written questions, both normalised.

    Normalisation is the answer matcher's (lower case, digits, no punctuation
    or articles), so "The U.S." and "the US" agree.

    Arguments
    ---------
    transcripts : dict
        ``{item id: transcript}``.
    questions : dict
        ``{item id: written question}`` (every transcript's id present).
    output_file : str or None
        Where SpeechBrain's alignment report is written.

    Returns
    -------
    float

    Example
    -------
    >>> transcript_wer({"a": "What is the Capital of France"},
    ...                {"a": "What is the capital of France?"})
    0.0
    >>> transcript_wer({"a": "What is capital"}, {"a": "what is the capital of france"})
    40.0
    """
    stats = wer_stats()
    ids = list(transcripts)
    stats.append(
        ids,
        [normalize_answer(transcripts[i]).split() for i in ids],
        [normalize_answer(questions[i]).split() for i in ids],
    )
    write_stats(stats, output_file)
    return stats.summarize("error_rate")


def write_transcribed_manifest(manifest, transcripts, path):
    """A copy of a CSV manifest whose ``question`` is each item's transcript.

    Items without a transcript are left out (the cascade scores what it heard).

    Arguments
    ---------
    manifest : str
        The spoken test set's CSV manifest (``ID``, ``question``, ...).
    transcripts : dict
        ``{item id: transcript}``.
    path : str
        The new manifest.

    Returns
    -------
    str
        ``path``.
    """
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    kept = [dict(row, question=transcripts[row["ID"]]) for row in rows if row["ID"] in transcripts]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".partial", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(path + ".partial", path)
    return path


def transcribe_test_sets(transcriber, manifests, dataset_of, folder, batch_size=16):
    """Transcribes each spoken test set once into ``<folder>/<name>.csv`` (questions = transcripts).

    Redone only when a manifest or the ASR model changes (completion record);
    call it on the main process.

    Arguments
    ---------
    transcriber : WhisperTranscriber
        The ASR model (``source`` recorded as ``transcriber.source`` if set).
    manifests : dict
        ``{set name: CSV manifest of the spoken set}``.
    dataset_of : callable
        Manifest -> spoken dataset (e.g. ``StudyRunner.qa_dataset``).
    folder : str
        Output folder.
    batch_size : int
        Clips per ``generate`` call.

    Returns
    -------
    dict
        ``{set name: transcribed manifest}``.
    """
    options = {"asr": getattr(transcriber, "source", None), "sets": sorted(manifests)}
    record = completion_record(list(manifests.values()), options)
    outputs = {name: os.path.join(folder, f"{name}.csv") for name in manifests}
    if is_prepared(folder, record, [f"{name}.csv" for name in manifests]):
        return outputs
    os.makedirs(folder, exist_ok=True)
    with staged_preparation(folder, record) as staging:
        for name, manifest in manifests.items():
            transcripts = transcriber.transcribe_dataset(dataset_of(manifest), batch_size)
            write_transcribed_manifest(manifest, transcripts, os.path.join(staging, f"{name}.csv"))
    return outputs


def read_questions(manifest):
    """``{item id: question}`` of a CSV manifest."""
    with open(manifest, newline="", encoding="utf-8") as handle:
        return {row["ID"]: row["question"] for row in csv.DictReader(handle)}


def cascade_reference(transcribed, manifests, evaluator, dataset_of, folder):
    """S2T of the cascade (transcript -> LLM as written question) and the transcripts' WER.

    Arguments
    ---------
    transcribed : dict
        ``{set name: transcribed manifest}`` from ``transcribe_test_sets``.
    manifests : dict
        ``{set name: the spoken set's own manifest}`` (its written questions
        are the WER references).
    evaluator : QAEvaluator
        The base LLM's evaluator (answers in ``text`` mode).
    dataset_of : callable
        Manifest -> QA dataset.
    folder : str
        Where ``<name>_cascade.tsv`` (per-item answers) and ``<name>_wer.txt`` go.

    Returns
    -------
    dict
        ``<name>_s2t`` (accuracy %, over every item of the spoken set: an empty
        transcript counts as a wrong answer), ``<name>_wer`` (WER %) and
        ``<name>_unheard`` (items whose transcript is empty) per set.
    """
    results = {}
    for name, path in transcribed.items():
        transcripts, questions = read_questions(path), read_questions(manifests[name])
        results[f"{name}_wer"] = transcript_wer(
            transcripts, questions, os.path.join(folder, f"{name}_wer.txt")
        )
        heard = [item for item, text in transcripts.items() if text.strip()]
        accuracy = 0.0
        if heard:
            output_file = os.path.join(folder, f"{name}_cascade.tsv")
            accuracy = evaluator.qa_accuracy(dataset_of(path), "text", output_file=output_file)
        # an empty transcript is a question the LLM never got: a wrong answer
        results[f"{name}_s2t"] = accuracy * len(heard) / len(questions)
        results[f"{name}_unheard"] = len(questions) - len(heard)
    logger.info(f"cascade reference (ASR transcript -> base LLM): {results}")
    return results
