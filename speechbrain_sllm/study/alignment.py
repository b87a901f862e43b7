"""Stage 1 of a speech LLM: the adaptor aligned with the LLM frozen.

The yaml's ``align`` (``AlignmentSettings``, run by ``stages.AlignStage``):
its ``objectives`` in sequence, each skipped at 0 epochs:

* ``ctc_embeddings`` (``ctc_epochs``): CTC of the adaptor's frames onto the
  frozen LLM's input embeddings (``EmbeddingCTCBrain``; the LLM never runs, see
  ``model.embedding_ctc``);
* ``lm_loss`` (``epochs``): the frozen LLM's own loss on the ``targets``,
  ``answer`` (the training targets) or ``transcript`` (repeat the spoken
  question, with ``transcript_prompt``);
* ``text_teacher`` (``epochs``): the frozen LLM given the spoken question
  matches its own next-token distributions given the written one
  (``speechbrain_sllm.distillation``).

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import dataclasses
import functools
import logging
import os

import speechbrain as sb
import torch

from speechbrain_sllm.checkpointing import AtomicCheckpointer, RNGState
from speechbrain_sllm.data.dataio import (
    ALTERNATIVES_FIELD,
    encode_alternatives,
    write_csv_manifest,
)
from speechbrain_sllm.data.preparation import completion_record, is_prepared, staged_preparation
from speechbrain_sllm.distillation import DistillationBrain, TeacherCache
from speechbrain_sllm.metrics import wer_stats
from speechbrain_sllm.model.embedding_ctc import EmbeddingCTCHead, ctc_loss, greedy_ctc_tokens
from speechbrain_sllm.model.speech_llm import SpeechLLM
from speechbrain_sllm.overrides import RENAMED_VALUES
from speechbrain_sllm.strategies import apply_strategy, build_strategy
from speechbrain_sllm.study.protocol import fit_and_restore_best
from speechbrain_sllm.study.settings import StageTraining

logger = logging.getLogger(__name__)
TARGETS = ("gold", "base_answers")
SPLITS = ("train", "valid")  # the manifests whose targets a study rewrites


class EmbeddingCTCBrain(sb.Brain):
    """Aligns an adaptor onto a frozen LLM's input embeddings with CTC; the LLM never runs.

    Stage 1 of a speech LLM made cheap (see ``model.embedding_ctc``): the adaptor
    learns to put frames near the input embeddings of the spoken words, which is
    what the frozen LLM reads when it is given the written question.

    Modules: ``encoder`` (a frozen ``SpeechEncoder``), ``adaptor`` and
    ``ctc_head`` (an ``EmbeddingCTCHead`` of the LLM's input embeddings).
    Hparams: ``tokenizer`` (the LLM's), ``norm_weight`` (weight of the frame-norm
    penalty), ``epoch_counter``, ``train_logger``. Batches need ``id``, ``sig``
    and ``question`` (the transcript). Validation reports the best-path WER of
    the decoded tokens; the checkpoint with the lowest validation loss is kept.
    """

    def compute_forward(self, batch, stage):
        """Encoder -> adaptor frames, their relative lengths and CTC log-probabilities."""
        batch = batch.to(self.device)
        feats, lengths = self.modules.encoder(*batch.sig)
        frames, lengths = self.modules.adaptor(feats, lengths)
        return frames, lengths, self.modules.ctc_head(frames)

    def compute_objectives(self, predictions, batch, stage):
        """CTC on the transcript's LLM tokens plus the weighted frame-norm penalty."""
        frames, lengths, log_probs = predictions
        token_ids = [self.hparams.tokenizer.encode(text) for text in batch.question]
        loss = ctc_loss(log_probs, lengths, token_ids)
        penalty = self.modules.ctc_head.norm_penalty(frames, lengths)
        if stage != sb.Stage.TRAIN:
            decode = self.hparams.tokenizer.decode
            hyps = [decode(ids).lower().split() for ids in greedy_ctc_tokens(log_probs, lengths)]
            refs = [text.lower().split() for text in batch.question]
            self.wer_metric.append(batch.id, hyps, refs)
        return loss + self.hparams.norm_weight * penalty

    def on_stage_start(self, stage, epoch=None):
        """A fresh WER tracker for validation and test."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = wer_stats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs loss and WER; keeps the checkpoint with the lowest validation loss."""
        if stage == sb.Stage.TRAIN:
            self.train_loss = stage_loss
            return
        stats = {"loss": stage_loss, "WER": self.wer_metric.summarize("error_rate")}
        self.last_stats = stats
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch},
                train_stats={"loss": getattr(self, "train_loss", None)},
                valid_stats=stats,
            )
            if self.checkpointer is not None:
                self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"])


def read_rows(manifest):
    """The rows of a CSV manifest, as dicts."""
    with open(manifest, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def rewrite_answers(manifest, answers, path):
    """Writes ``manifest`` again with each item's answer set to ``answers[ID]``.

    Items without a (non-empty) new answer are left out; the new answer is
    the item's only accepted one (``alternatives``).

    Arguments
    ---------
    manifest : str
        A CSV manifest (``ID``, ``answer``, ...).
    answers : dict
        ``{ID: new answer}``.
    path : str
        The new manifest.
    """
    rows = read_rows(manifest)
    fields = list(rows[0]) if rows else ["ID", "answer"]
    new = {key: text for key, text in answers.items() if text.strip()}
    kept = [
        dict(row, answer=new[row["ID"]], alternatives=encode_alternatives([new[row["ID"]]]))
        for row in rows
        if row["ID"] in new
    ]
    if ALTERNATIVES_FIELD not in fields:
        fields.append(ALTERNATIVES_FIELD)
    write_csv_manifest(kept, fields, path)


def base_answer_targets(runner, paths, model, max_new_tokens):
    """Training / validation targets: the base LLM's answers to the written questions.

    Redone only when the manifests or the LLM change (completion record).

    Arguments
    ---------
    runner : StudyRunner
        The study (``hparams``: ``llm_source``, ``prepare_on_change``, ...).
    paths : dict
        Manifests from the preparation (``train``, ``valid``).
    model : SpeechLLM
        The base LLM.
    max_new_tokens : int
        Decoding budget of the base LLM's answers.

    Returns
    -------
    dict
        ``paths`` with ``train`` and ``valid`` replaced by the base-answer manifests.
    """
    hparams = runner.hparams
    folder = os.path.join(hparams["output_folder"], "targets")
    sources = [paths["train"], paths["valid"]]
    options = {"llm_source": hparams["llm_source"], "tokens": max_new_tokens}
    record = completion_record(sources, options)
    new_paths = dict(paths, **{split: os.path.join(folder, f"{split}.csv") for split in SPLITS})
    if is_prepared(folder, record, ["train.csv", "valid.csv"], hparams["prepare_on_change"]):
        return new_paths
    os.makedirs(folder, exist_ok=True)
    brain = runner.stage_brain(model, build_strategy("frozen_llm"), "text", folder)
    evaluator = brain.evaluator()
    evaluator.settings = dataclasses.replace(evaluator.settings, max_new_tokens=max_new_tokens)
    with staged_preparation(folder, record) as staging:
        for split in SPLITS:
            dataset = runner.qa_dataset(paths[split])
            ids, predictions, _ = evaluator.decode(
                dataset, "text", runner.evaluation.batch_size, progress=True
            )
            answers = {i: p.strip().split("\n")[0] for i, p in zip(ids, predictions)}
            rewrite_answers(paths[split], answers, os.path.join(staging, f"{split}.csv"))
    return new_paths


def training_targets(runner, paths, model, targets, max_new_tokens):
    """The training / validation manifests for the yaml's ``targets``.

    Arguments
    ---------
    runner : StudyRunner
        The study.
    paths : dict
        Manifests from the preparation.
    model : SpeechLLM
        The base LLM (answers the written questions for ``base_answers``).
    targets : str
        ``gold`` (the dataset's answers) or ``base_answers`` (the base LLM's).
    max_new_tokens : int
        Decoding budget of the base LLM's answers.

    Returns
    -------
    dict
        ``paths``, with ``train`` / ``valid`` replaced for ``base_answers``.
    """
    if targets in RENAMED_VALUES:
        new = RENAMED_VALUES[targets]
        raise ValueError(
            f"targets {targets!r} is now {new!r} (one name per concept): --targets={new}"
        )
    if targets not in TARGETS:
        raise ValueError(f"targets {targets!r} unknown; use one of {TARGETS}.")
    if targets == "base_answers":
        return base_answer_targets(runner, paths, model, max_new_tokens)
    return paths


def transcript_targets(hparams, paths):
    """Stage-1 manifests whose answer is the question itself (ASR-style alignment)."""
    folder = os.path.join(hparams["output_folder"], "align", "data")
    os.makedirs(folder, exist_ok=True)
    aligned = {}
    for split in SPLITS:
        questions = {row["ID"]: row["question"] for row in read_rows(paths[split])}
        aligned[split] = os.path.join(folder, f"{split}.csv")
        rewrite_answers(paths[split], questions, aligned[split])
    return aligned


def ctc_alignment(runner, settings, encoder, adaptor, embeddings):
    """Stage 1a: CTC of the adaptor's frames onto the LLM's input embeddings (LLM not run).

    Arguments
    ---------
    runner : StudyRunner
        The study: its ``tokenizer``; its data's ``align`` split (every spoken
        training question, whose ``question`` is the transcript) trains, its
        validation set picks the epoch (lowest loss).
    settings : AlignmentSettings
        The ``ctc_*`` settings and the batch size.
    encoder : SpeechEncoder
        The frozen encoder.
    adaptor : torch.nn.Module
        Trained in place; the lowest-validation-loss epoch is restored.
    embeddings : torch.Tensor
        The LLM's input embedding table.

    Returns
    -------
    dict
        ``ctc_valid_loss`` and ``ctc_valid_wer`` (best-path decoding, %) of the
        restored epoch, and ``ctc_<prefix>_wer`` on each spoken test set of the runner.
    """
    hparams, data = runner.hparams, runner.data
    train, valid = data.datasets["align"], data.valid_set
    folder = os.path.join(hparams["output_folder"], "align", "ctc")
    counter = sb.utils.epoch_loop.EpochCounter(limit=settings.ctc_epochs)
    head = EmbeddingCTCHead(embeddings, scale=settings.ctc_scale)
    checkpointer = AtomicCheckpointer(
        os.path.join(folder, "save"),
        recoverables={"adaptor": adaptor, "ctc_head": head, "counter": counter, "rng": RNGState()},
    )
    brain = EmbeddingCTCBrain(
        modules={"encoder": encoder, "adaptor": adaptor, "ctc_head": head},
        opt_class=functools.partial(torch.optim.AdamW, lr=settings.ctc_lr),
        hparams={
            "tokenizer": hparams["tokenizer"],
            "norm_weight": settings.ctc_norm_weight,
            "epoch_counter": counter,
            "train_logger": sb.utils.train_logger.FileTrainLogger(
                os.path.join(folder, "train_log.txt")
            ),
        },
        run_opts=runner.run_opts,
        checkpointer=checkpointer,
    )
    loader = {"batch_size": settings.batch_size}
    brain.fit(
        counter,
        train,
        valid,
        train_loader_kwargs=dict(loader, shuffle=True),
        valid_loader_kwargs=dict(loader),
    )
    brain.evaluate(valid, min_key="loss", test_loader_kwargs=dict(loader), progressbar=False)
    results = {"ctc_valid_loss": brain.last_stats["loss"], "ctc_valid_wer": brain.last_stats["WER"]}
    for prefix, sets in data.test_sets.items():  # e.g. real recordings: the speech shift
        brain.evaluate(sets["speech"], test_loader_kwargs=dict(loader), progressbar=False)
        results[f"ctc_{prefix}_wer" if prefix else "ctc_test_wer"] = brain.last_stats["WER"]
    return results


def align_stage(runner, settings, llm, encoder, adaptor):
    """Stage 1: trains ``adaptor`` in place with the LLM frozen; returns its scores.

    The ``settings.objectives`` run in their order (default
    ``[ctc_embeddings, lm_loss]``): ``ctc_embeddings`` for ``ctc_epochs``,
    ``lm_loss`` (the LLM's loss on the ``targets``) and ``text_teacher`` (the LLM
    given speech matches itself given text, ``teacher_topk`` tokens cached per
    position) for ``epochs`` each; 0 epochs skips one.
    The LLM is frozen: its text scores are the base LLM's, so only S2T is scored.

    Arguments
    ---------
    runner : StudyRunner
        The study: its data's manifests (``train``, ``valid``), datasets
        (``align``: every spoken training question) and training / validation sets.
    settings : AlignmentSettings
        The objectives and their settings.
    llm : transformers.PreTrainedModel
        The pretrained LLM (kept frozen).
    encoder : SpeechEncoder
        The frozen encoder.
    adaptor : torch.nn.Module
        The adaptor to train.

    Returns
    -------
    dict
    """
    hparams = runner.hparams
    folder = os.path.join(hparams["output_folder"], "align")
    results, brain = {}, None
    model = SpeechLLM(llm, encoder, adaptor)
    strategy = build_strategy("frozen_llm")
    apply_strategy(model, strategy)
    for objective in settings.objectives:
        if objective == "ctc_embeddings" and settings.ctc_epochs > 0:
            embeddings = llm.get_input_embeddings().weight
            results.update(ctc_alignment(runner, settings, encoder, adaptor, embeddings))
        elif objective == "lm_loss":
            brain = lm_loss_alignment(runner, settings, model, strategy, results)
        elif objective == "text_teacher":
            brain = text_teacher_alignment(runner, settings, model, strategy)
    if brain is None:  # only CTC (or nothing) ran: a Brain that scores
        brain = runner.stage_brain(model, strategy, "speech", folder)
    runner.export(model, strategy, folder)
    brain.hparams.prompt = hparams["prompt"]
    results.update(runner.evaluate(brain, folder, modes=("speech",)))
    logger.info(f"stage 1 (aligned adaptor): {results}")
    return results


def lm_loss_alignment(runner, settings, model, strategy, results):
    """Stage 1b: the frozen LLM's own loss on the alignment's ``targets``; returns the Brain."""
    hparams = runner.hparams
    folder = os.path.join(hparams["output_folder"], "align")
    target = settings.targets
    prompt = settings.transcript_prompt if target == "transcript" else hparams["prompt"]
    train, valid = runner.data.train_set, runner.data.valid_set
    if target == "transcript":
        aligned = transcript_targets(hparams, runner.data.manifests)
        train, valid = (runner.qa_dataset(aligned[s], prompt) for s in ("train", "valid"))
    training = stage_training(settings)
    brain = runner.stage_brain(model, strategy, "speech", folder, training, prompt=prompt)
    if settings.epochs > 0:
        fit_and_restore_best(brain, train, valid, settings.batch_size)
    if target == "transcript":
        results["valid_wer"] = brain.evaluator().word_error_rate(
            valid, os.path.join(folder, "valid_wer.txt"), batch_size=runner.evaluation.batch_size
        )
    return brain


def text_teacher_alignment(runner, settings, model, strategy):
    """Stage 1 by distillation from the same frozen LLM given text; returns the Brain."""
    folder = os.path.join(runner.hparams["output_folder"], "align", "text_teacher")
    cache = TeacherCache(k=settings.teacher_topk)
    training = stage_training(settings, brain_class=DistillationBrain)
    brain = runner.stage_brain(model, strategy, "speech", folder, training, teacher_cache=cache)
    if settings.epochs > 0:
        data = runner.data
        fit_and_restore_best(brain, data.train_set, data.valid_set, settings.batch_size)
    return brain


def stage_training(settings, brain_class=None):
    """The ``StageTraining`` of an alignment objective through the frozen LLM."""
    return StageTraining(
        lr=settings.lr,
        epochs=settings.epochs,
        opt_class=settings.opt_class,
        warmup_fraction=settings.warmup_fraction,
        brain_class=brain_class,
    )
