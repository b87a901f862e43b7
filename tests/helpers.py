"""Test helpers: a Brain over a tiny SpeechLLM and a fixed batch of real spoken QA."""

import json
import os
import shutil
import tempfile

import speechbrain as sb
import torch
from conftest import llama_config, tiny_speech_llm
from speechbrain.dataio.dataloader import make_dataloader

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.checkpointing import AtomicCheckpointer
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.evaluation import EvaluationSettings
from speechbrain_sllm.strategies import (
    LayerwiseLR,
    LoRASettings,
    apply_strategy,
    build_strategy,
)


def failure_report(result, lines=40):
    """What a failed recipe subprocess left: its last log lines, free memory and disk.

    SpeechBrain logs uncaught exceptions (traceback included) through its logger,
    which writes to stdout, so stderr alone shows progress bars and no error.
    Progress-bar lines are dropped from both streams.
    """

    def tail(text):
        kept = [
            line
            for line in text.replace("\r", "\n").splitlines()
            if line.strip() and "it/s]" not in line and "s/it]" not in line
        ]
        return "\n".join(kept[-lines:])

    with open("/proc/meminfo") as handle:
        memory = " ".join(line.strip() for line in handle if line.startswith("MemAvailable"))
    disk = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return (
        f"rc {result.returncode}; {memory}; {disk:.1f} GiB free in {tempfile.gettempdir()}\n"
        f"--- stdout ---\n{tail(result.stdout)}\n--- stderr ---\n{tail(result.stderr)}"
    )


def write_profile(path, values):
    with open(path, "w") as handle:
        json.dump({"layers": [{"layer": i, "sum": v} for i, v in enumerate(values)]}, handle)
    return str(path)


def strategy_for(name, folder, layers=3, rule="importance", lora_rank=4):
    profile = write_profile(
        os.path.join(folder, "profile.json"), [float(i + 1) for i in range(layers)]
    )
    return build_strategy(
        name,
        lora=LoRASettings(rank=lora_rank, dropout=0.0),
        layerwise_lr=LayerwiseLR(rule=rule, lam=0.4, profile=profile, decay=0.5),
        train_encoder=True,
    )


def make_brain(
    name, tokenizer, prompt, folder, lr=3e-3, seed=0, mode="speech", counter_limit=1, **run_opts
):
    model = tiny_speech_llm(llama_config(vocab_size=len(tokenizer)), seed=seed)
    strategy = strategy_for(name, str(folder))
    apply_strategy(model, strategy)
    counter = sb.utils.epoch_loop.EpochCounter(limit=counter_limit)
    checkpointer = AtomicCheckpointer(
        os.path.join(str(folder), "save"), recoverables={"counter": counter}
    )
    opts = {"device": "cpu", "max_grad_norm": 5.0}
    opts.update(run_opts)
    return SpeechLLMBrain(
        modules={"model": model},
        opt_class=lambda groups: torch.optim.AdamW(groups, weight_decay=0.0),
        hparams={
            "prompt": prompt,
            "tokenizer": tokenizer,
            "training_strategy": strategy,
            "lr": lr,
            "input_mode": mode,
            "epoch_counter": counter,
        },
        run_opts=opts,
        checkpointer=checkpointer,
        evaluation=EvaluationSettings(max_new_tokens=4),
    )


def fixed_batch(manifest, prompt, with_audio=True, size=6):
    dataset = make_qa_dataset(manifest, prompt, with_audio=with_audio)
    return next(iter(make_dataloader(dataset, batch_size=size)))


def llm_state(model):
    return {n: p.detach().clone() for n, p in model.llm.named_parameters()}


def tsv_rows(path):
    """The rows of a per-item QA file (``QAAccuracyStats.write_stats``), fields unescaped."""

    def unescape(field):
        out, chars = [], iter(field)
        for char in chars:
            if char == "\\":
                following = next(chars, "")
                out.append({"t": "\t", "n": "\n", "\\": "\\"}.get(following, following))
            else:
                out.append(char)
        return "".join(out)

    with open(path, encoding="utf-8") as handle:
        return [
            [unescape(f) for f in line.rstrip("\n").split("\t")] for line in handle if line.strip()
        ]


def accuracy_from_tsv(path, answer_match="contains"):
    """Accuracy (%) recomputed from a per-item file: each prediction matched to its references
    again, independently of the score column the evaluation wrote; and the number of items."""
    import json

    from speechbrain_sllm.metrics import answer_matches

    rows = tsv_rows(path)
    correct = sum(
        answer_matches(prediction, json.loads(references), answer_match)
        for _, _, prediction, references in rows
    )
    return 100.0 * correct / len(rows), len(rows)


def tiny_export(folder, fixtures, strategy_name="lora"):
    """A loadable export of a tiny speech LLM built on the recipe fixtures' models.

    Arguments: the export folder, the fixtures folder (``recipe_fixtures``) and the
    strategy. Returns the exported ``SpeechLLM``.
    """
    from speechbrain_sllm.data.prompts import ChatPrompt
    from speechbrain_sllm.data.tokenizers import HFTokenizer
    from speechbrain_sllm.model.adaptors import FrameStackAdaptor
    from speechbrain_sllm.model.encoders import HFWhisperEncoder
    from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
    from speechbrain_sllm.model_export import (
        INFERENCE_TEMPLATE,
        export_trained_model,
        inference_settings,
    )

    llm_source = os.path.join(fixtures, "tiny_llm")
    encoder_source = os.path.join(fixtures, "tiny_whisper")
    torch.manual_seed(0)
    llm = load_causal_lm(llm_source, dtype="float32")
    encoder = HFWhisperEncoder(source=encoder_source)
    adaptor = FrameStackAdaptor(16, llm.config.hidden_size, stack=2, hidden_size=16)
    model = SpeechLLM(llm, encoder, adaptor)
    strategy = strategy_for(strategy_name, os.path.dirname(str(folder)))
    apply_strategy(model, strategy)
    hparams = {
        "llm_source": llm_source,
        "encoder_source": encoder_source,
        "prompt": ChatPrompt(HFTokenizer(llm_source)),
        "sample_rate": 16000,
        "evaluation": EvaluationSettings(max_new_tokens=4),
    }
    settings = dict(inference_settings(hparams, model), llm_dtype="float32")
    export_trained_model(model, strategy, INFERENCE_TEMPLATE, str(folder), settings)
    return model
