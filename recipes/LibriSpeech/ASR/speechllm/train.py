#!/usr/bin/env python3
"""LibriSpeech stage-1 alignment of a speech LLM (ASR): encoder -> adaptor -> LLM.

Trains the adaptor (and, per `strategy`, LoRA or the LLM) to transcribe speech,
logs the LLM's text perplexity on held-out text beside the validation loss,
and reports WER on the test splits.

To run it (1 GPU):
> python train.py hparams/whisper_llm.yaml --data_folder=/data/LibriSpeech \
>     --llm_source=meta-llama/Llama-3.2-1B-Instruct --encoder_source=openai/whisper-large-v3
Several GPUs:
> torchrun --nproc_per_node=4 train.py hparams/whisper_llm.yaml ...

Authors
 * speechbrain-sllm developers 2026
"""

import os
import sys

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main

from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.experiment import (
    ensure_base_profile,
    fit_and_restore_best,
    make_speech_llm_brain,
    steps_per_run,
)
from speechbrain_sllm.model.speech_llm import SpeechLLM
from speechbrain_sllm.strategies import apply_strategy, build_strategy

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from librispeech_prepare import prepare_librispeech  # noqa: E402


def dataio_prepare(hparams):
    """Speech datasets (transcript as target) and the held-out text set."""

    def speech(split):
        return make_qa_dataset(
            os.path.join(hparams["manifest_folder"], f"{split}.csv"),
            hparams["prompt"],
            sample_rate=hparams["sample_rate"],
            max_duration=hparams["max_duration"],
            sort_key="duration",
        )

    train = speech(hparams["train_splits"][0])
    valid = speech(hparams["dev_splits"][0])
    tests = {split: speech(split) for split in hparams["test_splits"]}
    text = make_qa_dataset(
        os.path.join(hparams["manifest_folder"], f"{hparams['dev_splits'][0]}_text.csv"),
        hparams["text_prompt"],
        with_audio=False,
    )
    return train, valid, tests, text


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    splits = hparams["train_splits"] + hparams["dev_splits"] + hparams["test_splits"]
    run_on_main(
        prepare_librispeech,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["manifest_folder"],
            "splits": splits,
            "skip_prep": hparams["skip_prep"],
        },
    )
    train_set, valid_set, test_sets, text_set = dataio_prepare(hparams)

    model = SpeechLLM(hparams["llm"], hparams["encoder"], hparams["adaptor"])
    strategy = build_strategy(
        hparams["strategy"],
        lora=hparams["lora"],
        layerwise_lr=hparams["layerwise_lr"],
        train_encoder=hparams["train_encoder"],
    )
    ensure_base_profile(
        model,
        strategy,
        hparams["text_prompt"],
        hparams["tokenizer"],
        text_set,
        os.path.join(hparams["output_folder"], "importance"),
        run_opts,
        fraction=hparams["importance_fraction"],
        batch_size=hparams["batch_size"],
    )
    apply_strategy(model, strategy)
    brain = make_speech_llm_brain(
        model,
        strategy,
        hparams["prompt"],
        hparams["tokenizer"],
        hparams["output_folder"],
        hparams["lr"],
        hparams["number_of_epochs"],
        steps_per_run(
            len(train_set),
            hparams["batch_size"],
            hparams["number_of_epochs"],
            hparams["grad_accumulation_factor"],
        ),
        run_opts=dict(
            run_opts,
            precision=run_opts.get("precision", hparams["precision"]),
            max_grad_norm=hparams["max_grad_norm"],
            grad_accumulation_factor=hparams["grad_accumulation_factor"],
            ckpt_interval_minutes=hparams["ckpt_interval_minutes"],
        ),
        warmup_fraction=hparams["warmup_fraction"],
        max_new_tokens=hparams["max_new_tokens"],
        num_beams=hparams["num_beams"],
        text_valid_set=text_set,
    )
    fit_and_restore_best(brain, train_set, valid_set, hparams["batch_size"])

    for split, dataset in test_sets.items():
        wer = brain.evaluate_wer(
            dataset,
            output_file=os.path.join(hparams["output_folder"], f"wer_{split}.txt"),
            batch_size=hparams["batch_size"],
        )
        text_ppl = brain.perplexity(text_set, "text", hparams["batch_size"])
        brain.hparams.train_logger.log_stats(
            stats_meta={"test split": split}, test_stats={"WER": wer, "text_ppl": text_ppl}
        )
