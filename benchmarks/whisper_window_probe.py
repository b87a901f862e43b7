#!/usr/bin/env python3
"""Does a Whisper encoder's fitted window keep what its full 30 s window carries?

The studies encode each clip on a window fitted to it (``HFWhisperEncoder(window=
"batch")``), not on the 30 s Whisper was trained on. This probe lets the
checkpoint's own decoder read the encoder outputs of both windows (trimmed to the
clip, as the speech LLM sees them) and scores the transcripts against the
written questions. The trimmed outputs make the decoder repeat itself after the
question, so each transcript is cut to the question's word count before
scoring: the probe measures whether the question's words are in the frames.

> python benchmarks/whisper_window_probe.py --whisper tests/.cache/models/whisper-tiny.en \
>     --llama_questions ../shared/data/llama-questions --items 60

Authors
 * speechbrain-sllm developers 2026
"""

import argparse
import csv
import os
import time

import soundfile
import torch
from transformers import AutoTokenizer, WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging as transformers_logging

from speechbrain_sllm.cascade import transcript_wer
from speechbrain_sllm.model.encoders import HFWhisperEncoder
from speechbrain_sllm.study.report import hardware


def read_items(folder, count):
    """``[(wav path, question)]`` of the first ``count`` LLaMA Questions."""
    with open(os.path.join(folder, "llama_questions_300.tsv"), newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))[:count]
    return [(os.path.join(folder, row["Wav Filename"]), row["Questions"]) for row in rows]


@torch.no_grad()
def window_wer(source, window, items):
    """WER (%) of the decoder reading the ``window`` encoder's outputs, and the seconds taken.

    Arguments
    ---------
    source : str
        A Whisper HF folder.
    window : str
        ``full`` or ``batch`` (see ``HFWhisperEncoder``).
    items : list of (str, str)
        Recordings and their questions.

    Returns
    -------
    tuple of (float, float)
    """
    model = WhisperForConditionalGeneration.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    encoder = HFWhisperEncoder(source=source, window=window)
    hyps, refs, start = {}, {}, time.time()
    for path, question in items:
        wav = torch.tensor(soundfile.read(path, dtype="float32")[0])[None]
        hidden, _ = encoder(wav, torch.ones(1))
        outputs = BaseModelOutput(last_hidden_state=hidden)
        ids = model.generate(encoder_outputs=outputs, max_new_tokens=24, num_beams=1)
        words = tokenizer.decode(ids[0], skip_special_tokens=True).split()
        hyps[path] = " ".join(words[: len(question.split())])
        refs[path] = question
    return transcript_wer(hyps, refs), time.time() - start


def main():
    """Prints the WER of each window on the same recordings, with the hardware."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--whisper", required=True, help="a Whisper HF folder")
    parser.add_argument("--llama_questions", required=True, help="the LLaMA Questions folder")
    parser.add_argument("--items", type=int, default=60)
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()  # Whisper's generate warns on every call
    items = read_items(args.llama_questions, args.items)
    print(f"{len(items)} recordings, {hardware('cpu')}")
    for window in ("full", "batch"):
        wer, seconds = window_wer(args.whisper, window, items)
        print(f"window {window}: WER {wer:.1f}% (transcripts cut to the question), {seconds:.0f} s")


if __name__ == "__main__":
    main()
