#!/usr/bin/env python3
"""MiniSpokenQA: the whole textual-degradation study, end to end, on a CPU.

Pretrains a small LM on a synthetic knowledge base, measures its textual
parameter importance, fine-tunes a speech LLM on spoken questions with each
strategy, then scores text (T2T) and spoken (S2T) QA and the importance shift.

To run it:
> python run_study.py hparams/study.yaml            # about 15 min on 2 CPU cores
> python run_study.py hparams/study.yaml --quick    # a few minutes (CI)

Authors
 * speechbrain-sllm developers 2026
"""

# isort: off
import speechbrain_sllm  # noqa: F401  (first: chooses OpenMP waiting before torch loads)

# isort: on

import logging
import os
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_sllm.brains import CTCEncoderBrain
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.data.prompts import ChatPrompt
from speechbrain_sllm.data.tokenizers import train_sentencepiece
from speechbrain_sllm.importance.report import (
    summarize_shift,
    write_json,
)
from speechbrain_sllm.importance.stage import run_importance, zeroing_check
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.strategies import LayerwiseLR, apply_strategy, build_strategy
from speechbrain_sllm.strategies.lora import merge_lora
from speechbrain_sllm.study import (
    StageClock,
    fit_and_restore_best,
    importance_shift,
    make_stage_brain,
    peak_layer,
    write_importance_plots,
)

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)
from minispokenqa_prepare import prepare_minispokenqa  # noqa: E402


def pretrain_lm(hparams, run_opts, data):
    """Stage 2: pretrains the small LM on the text QA and saves it as an HF model."""
    folder = os.path.join(hparams["output_folder"], "base_lm")
    model_dir = os.path.join(folder, "model")
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        logger.info(f"Base LM found in {model_dir}")
        return model_dir
    model = SpeechLLM(load_causal_lm(config=hparams["lm_config"]))
    strategy = build_strategy("full_ft")
    apply_strategy(model, strategy)
    brain = make_stage_brain(
        model, hparams, run_opts, strategy, hparams["lm_lr"], "text", folder, hparams["lm_epochs"]
    )
    # The LM's task is to memorise the written QA: there is no held-out text to
    # validate on (validating on the training questions cost a quarter of this
    # stage), so it trains for its epochs and keeps the final weights.
    brain.fit(
        brain.hparams.epoch_counter,
        data["text_train"],
        train_loader_kwargs={"batch_size": hparams["lm_batch_size"], "shuffle": True},
    )
    if sb.utils.distributed.if_main_process():
        model.llm.save_pretrained(model_dir)
        hparams["tokenizer"].to_hf(model_dir)
    return model_dir


def pretrain_encoder(hparams, run_opts, data):
    """Stage 2b: the speech encoder learns character CTC on the training questions.

    It stands in for a pretrained Whisper encoder; it never sees answers, and it
    is frozen during speech fine-tuning, as in the paper.
    """
    folder = os.path.join(hparams["output_folder"], "encoder")
    path = os.path.join(folder, "encoder.ckpt")
    sb.utils.seed_everything(hparams["seed"])
    encoder = hparams["encoder"]()
    if os.path.isfile(path):
        encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return path
    alphabet = "abcdefghijklmnopqrstuvwxyz '?."
    head = torch.nn.Linear(encoder.output_size, len(alphabet) + 1)
    counter = sb.utils.epoch_loop.EpochCounter(limit=hparams["encoder_epochs"])
    brain = CTCEncoderBrain(
        modules={"encoder": encoder, "ctc_head": head},
        opt_class=lambda params: torch.optim.AdamW(params, lr=hparams["encoder_lr"]),
        hparams={
            "alphabet": alphabet,
            "max_grad_norm": hparams["max_grad_norm"],
            "train_logger": sb.utils.train_logger.FileTrainLogger(
                os.path.join(folder, "train_log.txt")
            ),
        },
        run_opts=run_opts,
        checkpointer=sb.utils.checkpoints.Checkpointer(
            os.path.join(folder, "save"),
            recoverables={"counter": counter, "encoder": encoder, "head": head},
        ),
    )
    loader = {"batch_size": hparams["ft_batch_size"], "shuffle": True}
    brain.fit(
        counter,
        data["speech_train"],
        data["speech_valid"],
        train_loader_kwargs=loader,
        valid_loader_kwargs={"batch_size": hparams["ft_batch_size"]},
    )
    brain.checkpointer.recover_if_possible(min_key="loss")
    if sb.utils.distributed.if_main_process():
        torch.save(encoder.state_dict(), path)
    return path


def evaluate_both(brain, data, hparams, folder):
    """T2T and (when the model has an encoder) S2T accuracy, plus text perplexity."""
    kwargs = {"batch_size": hparams["eval_batch_size"], "progress": True}
    results = {
        "t2t": brain.evaluate_qa(
            data["text_test"], "text", output_file=os.path.join(folder, "t2t.tsv"), **kwargs
        ),
        "text_ppl": brain.perplexity(data["text_test"], "text", hparams["eval_batch_size"]),
    }
    if brain.model.encoder is not None:
        results["s2t"] = brain.evaluate_qa(
            data["speech_test"], "speech", output_file=os.path.join(folder, "s2t.tsv"), **kwargs
        )
    return results


def importance(brain, data, hparams, folder):
    """Stage 3 / 5: textual importance of the brain's LLM."""
    return run_importance(
        brain,
        data["text_test"],
        folder,
        topk_percents=tuple(hparams["importance_topk"]),
        estimator=hparams["importance_estimator"],
        mode="text",
        fraction=hparams["importance_fraction"],
        batch_size=hparams["eval_batch_size"],
        progress=True,
    )


def base_stage(hparams, run_opts, data, lm_dir):
    """Evaluates the base LM and computes its importance profile (+ zeroing check)."""
    folder = os.path.join(hparams["output_folder"], "base_lm")
    model = SpeechLLM(load_causal_lm(source=lm_dir))
    strategy = build_strategy("frozen_llm")
    brain = make_stage_brain(model, hparams, run_opts, strategy, 0.0, "text", folder, 0)
    results = evaluate_both(brain, data, hparams, folder)
    profile, accumulator = importance(
        brain, data, hparams, os.path.join(hparams["output_folder"], "importance", "base")
    )
    results["zeroing"] = zeroing_check(
        brain, data["text_test"], accumulator, hparams["zeroing_fraction"], "text", hparams["seed"]
    )
    scores = {name: accumulator.score(name) for name in accumulator.params}
    logger.info(f"base LM: {results}")
    return results, profile, scores


def finetune_stage(name, hparams, run_opts, data, lm_dir, base_profile_path):
    """Stage 4-5 for one strategy: speech fine-tuning, evaluation, importance."""
    folder = os.path.join(hparams["output_folder"], "finetune", name)
    sb.utils.seed_everything(hparams["seed"])
    encoder, adaptor = hparams["encoder"](), hparams["adaptor"]()
    encoder.load_state_dict(
        torch.load(hparams["encoder_path"], map_location="cpu", weights_only=True)
    )
    model = SpeechLLM(load_causal_lm(source=lm_dir), encoder, adaptor)
    layerwise = LayerwiseLR(
        rule="importance", lam=hparams["layerwise_lambda"], profile=base_profile_path
    )
    strategy = build_strategy(
        name, lora=hparams["lora"], layerwise_lr=layerwise, train_encoder=hparams["train_encoder"]
    )
    apply_strategy(model, strategy)
    brain = make_stage_brain(
        model, hparams, run_opts, strategy, hparams["ft_lr"], "speech", folder, hparams["ft_epochs"]
    )
    fit_and_restore_best(
        brain, data["speech_train"], data["speech_valid"], hparams["ft_batch_size"]
    )
    results = evaluate_both(brain, data, hparams, folder)
    merge_lora(model)
    profile, accumulator = importance(
        brain, data, hparams, os.path.join(hparams["output_folder"], "importance", name)
    )
    scores = {n: accumulator.score(n) for n in accumulator.params}
    logger.info(f"{name}: {results}")
    return results, profile, scores


def results_table(base, runs):
    """The paper-style table as markdown."""
    lines = [
        "| Method | T2T acc % | S2T acc % | text PPL | importance JS vs base | peak layer | top-3% IoU vs base |",
        "|---|---|---|---|---|---|---|",
        f"| no fine-tuning | {base['t2t']:.1f} | - | {base['text_ppl']:.3f} | 0 | {base['peak']} | 1 |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['t2t']:.1f} | {run['s2t']:.1f} | {run['text_ppl']:.3f} | "
            f"{run['shift']['js']:.4f} | {run['shift']['peak_after']} | {run['top3_iou']:.3f} |"
        )
    return "\n".join(lines)


def parse(argv):
    """SpeechBrain argument parsing, with ``--quick`` mapped to ``hparams/quick.yaml``."""
    quick = "--quick" in argv
    argv = [arg for arg in argv if arg != "--quick"]
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if quick:
        with open(os.path.join(HERE, "hparams", "quick.yaml")) as handle:
            quick_overrides = load_hyperpyyaml(handle)
        user = load_hyperpyyaml(overrides) if overrides else {}
        quick_overrides.update(user or {})
        overrides = quick_overrides
    return hparams_file, run_opts, overrides


def main(argv):
    """Runs the study; returns the results dict."""
    hparams_file, run_opts, overrides = parse(argv)
    with open(hparams_file) as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    sb.create_experiment_directory(
        hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    clock = StageClock()
    with clock.stage("data"):
        paths = prepare_minispokenqa(
            hparams["data_folder"], hparams["num_entities"], hparams["seed"], hparams["skip_prep"]
        )
        tokenizer = load_or_train_tokenizer(hparams, paths)
        hparams["tokenizer"], hparams["prompt"] = tokenizer, ChatPrompt(tokenizer)
        data = {
            split: make_qa_dataset(
                path,
                hparams["prompt"],
                with_audio=split.startswith("speech"),
                sample_rate=hparams["sample_rate"],
                max_duration=hparams["max_duration"],
                sort_key=None,
            )
            for split, path in paths.items()
        }
    with clock.stage("lm_pretraining"):
        lm_dir = pretrain_lm(hparams, run_opts, data)
    with clock.stage("encoder_pretraining"):
        hparams["encoder_path"] = pretrain_encoder(hparams, run_opts, data)
    with clock.stage("base_lm_evaluation_and_importance"):
        base, base_profile, base_scores = base_stage(hparams, run_opts, data, lm_dir)
    base_profile_path = os.path.join(hparams["output_folder"], "importance", "base", "profile.json")
    base["peak"] = peak_layer(base_profile)
    runs, profiles = {}, {"base LM": base_profile}
    for name in hparams["strategies"]:
        with clock.stage(f"finetune_{name}"):
            run, profile, scores = finetune_stage(
                name, hparams, run_opts, data, lm_dir, base_profile_path
            )
        run["shift"], run["top3_iou"] = importance_shift(base_profile, base_scores, profile, scores)
        logger.info(f"{name}: {summarize_shift(run['shift'])}")
        runs[name], profiles[name] = run, profile
    return report(hparams, base, runs, profiles, base_profile, clock)


def load_or_train_tokenizer(hparams, paths):
    """Stage 2a: a sentencepiece tokenizer trained on all questions and answers."""
    import csv

    from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer

    folder = os.path.join(hparams["output_folder"], "tokenizer")
    model_path = os.path.join(folder, "spm.model")
    if os.path.isfile(model_path):
        return SentencePieceTokenizer(model_path)
    with open(paths["text_train"]) as handle:
        rows = list(csv.DictReader(handle))
    texts = [f"User: {row['question']}" for row in rows] + ["Assistant:"] * 10
    texts += [row["answer"] for row in rows]
    return train_sentencepiece(texts, folder, vocab_size=hparams["vocab_size"])


def report(hparams, base, runs, profiles, base_profile, clock):
    """Stage 6: table, shift metrics, plots and results.json; returns the results."""
    folder = hparams["output_folder"]
    table = results_table(base, runs)
    # results.json holds only what the seed and thread count determine; timings apart
    results = {
        "base": base,
        "strategies": runs,
        "table": table,
        "torch_threads": torch.get_num_threads(),
    }
    seconds = clock.total()
    if sb.utils.distributed.if_main_process():
        write_json(results, os.path.join(folder, "results.json"))
        write_json(
            {
                "total": seconds,
                "stages": clock.seconds,
                "torch_threads": torch.get_num_threads(),
                "openmp_waiting": speechbrain_sllm.OPENMP_WAITING,
            },
            os.path.join(folder, "timings.json"),
        )
        write_importance_plots(profiles, base_profile, os.path.join(folder, "plots"))
        with open(os.path.join(folder, "results.md"), "w") as handle:
            handle.write(table + "\n")
    zeroing = base["zeroing"]
    print("\n" + table)
    print(
        f"\nZeroing 3% of the base LM's parameters (text PPL): none {zeroing['none']:.3f}, "
        f"bottom {zeroing['bottom']:.3f}, random {zeroing['random']:.3f}, top {zeroing['top']:.4g}"
    )
    for name, run in runs.items():
        print(f"{name:>18}: {summarize_shift(run['shift'])}")
    print(
        "\nStage wall times (s): "
        + ", ".join(f"{name} {value}" for name, value in clock.seconds.items())
    )
    print(
        f"\nDone in {seconds / 60:.1f} min. Results: {folder}/results.json, {folder}/results.md; "
        f"plots: {folder}/plots/; importance profiles: {folder}/importance/; "
        f"predictions and train logs: {folder}/finetune/<strategy>/"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
