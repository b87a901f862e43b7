#!/usr/bin/env python3
"""The real-model recipe's ``--debug`` run on a GPU in bf16, with random weights.

Proves the GPU paths of ``recipes/WebQuestions/SpokenQA/speechllm`` (bf16 autocast,
a bf16 LLM, gradient checkpointing beside a frozen encoder, stage 1a/1b, every
strategy, batched generation, the importance stage) on a machine that cannot
download models: the LLM and Whisper are built with random weights from config
folders (``config.json`` plus the tokenizer / feature-extractor files, no weights),
and the data are the small WebQuestions / LLaMA Questions-format sets that the tests
write with eSpeak NG. Accuracies are meaningless here; the run must finish.

> python benchmarks/gpu_recipe_debug.py --llm-config tests/.cache/models/smollm2-135m-instruct \\
>     --encoder-config tests/.cache/models/whisper-tiny.en --output /tmp/gpu_debug

Arguments after the script's own are recipe overrides, e.g. the paper's shapes:

> python benchmarks/gpu_recipe_debug.py --llm-config llama-3.2-1b-config \\
>     --encoder-config whisper-large-v3-config --output /tmp/gpu_debug \\
>     --llm_dim=2048 --encoder_dim=1280

Prints the recipe's table and stage wall times.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, WhisperForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def random_weight_copy(config_folder, target, model_class):
    """``config_folder``'s files (weights left out) plus random weights, in ``target``.

    Arguments
    ---------
    config_folder : str
        An HF model folder; only its config, tokenizer and processor files are read.
    target : str
        Output folder.
    model_class : type
        ``AutoModelForCausalLM`` or ``WhisperForConditionalGeneration``.

    Returns
    -------
    str
        ``target``.
    """
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(config_folder):
        if name not in WEIGHT_FILES:
            shutil.copy(os.path.join(config_folder, name), target)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_folder)
    if model_class is AutoModelForCausalLM:
        model = model_class.from_config(config)
    else:
        model = model_class(config)
    model.save_pretrained(target)
    return target


def main():
    """Builds the random-weight models and the data, runs the recipe, prints its results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-config", required=True, help="LLM folder (config + tokenizer)")
    parser.add_argument("--encoder-config", required=True, help="Whisper folder (config files)")
    parser.add_argument("--output", required=True, help="work folder")
    parser.add_argument("--device", default="cuda:0")
    args, recipe_overrides = parser.parse_known_args()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_webquestions_recipe import (
        debug_command,
        write_llama_questions,
        write_webquestions,
    )

    models = os.path.join(args.output, "models")
    llm = random_weight_copy(args.llm_config, os.path.join(models, "llm"), AutoModelForCausalLM)
    whisper = random_weight_copy(
        args.encoder_config, os.path.join(models, "whisper"), WhisperForConditionalGeneration
    )
    webq = write_webquestions(os.path.join(args.output, "webq"))
    llamaq = write_llama_questions(os.path.join(args.output, "llamaq"))
    study = os.path.join(args.output, "study")
    command = debug_command(study, webq, llamaq, llm, whisper) + [
        f"--device={args.device}",
        "--precision=bf16",
        "--llm_dtype=bfloat16",
        "--gradient_checkpointing=True",
        *recipe_overrides,
    ]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout[-6000:])
    if done.returncode != 0:
        print(done.stderr[-4000:])
        raise SystemExit(f"the recipe failed (rc {done.returncode})")
    with open(os.path.join(study, "timings.json")) as handle:
        timings = json.load(handle)
    print(f"recipe --debug on {timings['hardware']}: {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
