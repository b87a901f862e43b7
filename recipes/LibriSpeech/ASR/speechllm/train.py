#!/usr/bin/env python3
"""LibriSpeech stage-1 alignment of a speech LLM (ASR): encoder -> adaptor -> LLM.

Trains the adaptor (and, per `strategy`, LoRA or the LLM) to transcribe speech;
at every validation it decodes the dev set (WER, which selects the best
checkpoint) and scores the LLM's text perplexity on held-out text; the test
splits are decoded with the best checkpoint.

To run it (1 GPU):
> python train.py hparams/whisper_llm.yaml --data_folder=/data/LibriSpeech \
>     --llm_source=meta-llama/Llama-3.2-1B-Instruct --encoder_source=openai/whisper-large-v3
Several GPUs:
> torchrun --nproc_per_node=4 train.py hparams/whisper_llm.yaml ...

Authors
 * speechbrain-sllm developers 2026
"""

# isort: off
import speechbrain_sllm  # noqa: F401  (first: chooses OpenMP waiting before torch loads)

# isort: on

import os
import sys

import speechbrain as sb
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.distributed import if_main_process, run_on_main

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.config import load_recipe_hparams
from speechbrain_sllm.data.dataio import load_manifest, make_qa_dataset
from speechbrain_sllm.distributed import close_process_group
from speechbrain_sllm.importance.stage import run_importance
from speechbrain_sllm.model_export import export_recipe_run
from speechbrain_sllm.outputs import write_json
from speechbrain_sllm.strategies import apply_strategy

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from librispeech_prepare import prepare_librispeech  # noqa: E402


def read_splits(csv_paths):
    """The rows of one or more LibriSpeech CSVs, by utterance id."""
    rows = {}
    for path in csv_paths:
        rows.update(load_manifest(path).data)
    return rows


def transcription_view(csv_paths):
    """LibriSpeech CSVs seen as QA: the transcript (``wrd``, lower-cased) is the answer."""
    rows = read_splits(csv_paths)
    for item in rows.values():
        item["question"] = item["answer"] = item["wrd"].lower()
    return DynamicItemDataset(rows)


def continuation_view(csv_paths):
    """Written continuation pairs of transcripts (first half -> second half)."""
    pairs = {}
    for data_id, item in read_splits(csv_paths).items():
        words = item["wrd"].lower().split()
        if len(words) >= 2:
            half = len(words) // 2
            pairs[data_id] = {
                "question": " ".join(words[:half]),
                "answer": " ".join(words[half:]),
            }
    return DynamicItemDataset(pairs)


def dataio_prepare(hparams):
    """Speech datasets (transcript as target) and the held-out text set."""

    def csvs(names):
        """Paths of the prepared CSVs of ``names``."""
        return [os.path.join(hparams["manifest_folder"], f"{name}.csv") for name in names]

    def speech(names):
        """Spoken QA view (transcript as answer) of the CSVs of ``names``."""
        return make_qa_dataset(
            transcription_view(csvs(names)),
            hparams["prompt"],
            name=f"LibriSpeech {'+'.join(names)} ({', '.join(csvs(names))})",
            sample_rate=hparams["sample_rate"],
            max_duration=hparams["max_duration"],
            min_duration=hparams["min_duration"],
            sort_key="duration",
        )

    train = speech(["train"])  # every training split, merged by the preparation
    valid = speech(hparams["dev_splits"])
    tests = {split: speech([split]) for split in hparams["test_splits"]}
    text = make_qa_dataset(
        continuation_view(csvs(hparams["dev_splits"])),
        hparams["text_prompt"],
        name=f"written continuations of {'+'.join(hparams['dev_splits'])}",
        with_audio=False,
    )
    return train, valid, tests, text


def base_importance(brain, hparams, text_set):
    """Scores the untouched LLM on text when the importance LR rule needs its profile.

    Runs before ``fit`` on the model the strategy set up (LoRA starts as an
    exact no-op), sharded under ``parallelism: fsdp``.
    """
    strategy = hparams["training_strategy"]
    if strategy.layerwise_lr is None or strategy.layerwise_lr.rule != "importance":
        return
    if os.path.isfile(strategy.layerwise_lr.profile):
        return
    run_importance(
        brain.evaluator(for_gradients=True),
        text_set,
        os.path.dirname(strategy.layerwise_lr.profile),
        mode="text",
        fraction=hparams["importance_fraction"],
        batch_size=hparams["batch_size"],
    )


def main(argv):
    """Trains, scores and exports the ASR model: every step of the module docstring.

    Arguments
    ---------
    argv : list of str
        The hparams file, then run options and yaml overrides.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    hparams = load_recipe_hparams(hparams_file, overrides, run_opts)  # checked, then built
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    run_on_main(
        prepare_librispeech,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["manifest_folder"],
            "tr_splits": hparams["train_splits"],
            "dev_splits": hparams["dev_splits"],
            "te_splits": hparams["test_splits"],
            "merge_lst": hparams["train_splits"],
            "merge_name": "train.csv",
            "skip_prep": hparams["skip_prep"],
        },
    )
    train_set, valid_set, test_sets, text_set = dataio_prepare(hparams)
    hparams["text_valid_set"] = text_set

    apply_strategy(hparams["model"], hparams["training_strategy"])
    asr_brain = SpeechLLMBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
        evaluation=hparams["evaluation"],
        lr_schedule=hparams["lr_schedule"],
        train_logger=hparams["train_logger"],
        parallelism=hparams["parallelism"],
        fsdp=hparams["fsdp"],
    )
    asr_brain.shard_model()  # parallelism: fsdp under torchrun
    base_importance(asr_brain, hparams, text_set)
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        train_set,
        valid_set,
        train_loader_kwargs={"batch_size": hparams["batch_size"], "shuffle": True},
        valid_loader_kwargs={"batch_size": hparams["eval_batch_size"]},
    )
    results = {
        split: asr_brain.evaluate(
            dataset,
            min_key=hparams["ckpt_key"],
            test_loader_kwargs={"batch_size": hparams["eval_batch_size"]},
            name=split,
        )
        for split, dataset in test_sets.items()
    }
    export_recipe_run(hparams)
    if if_main_process():
        training = {
            "skipped_steps": asr_brain.skipped_steps,
            "dropped_items": asr_brain.dropped_items,
        }
        write_json(
            {"test": results, "training": training},
            os.path.join(hparams["output_folder"], "results.json"),
        )


if __name__ == "__main__":
    main(sys.argv[1:])
    # under torchrun: every rank waits for the others, then the group is closed
    close_process_group()
