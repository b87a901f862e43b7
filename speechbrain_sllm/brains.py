"""SpeechBrain ``Brain`` for speech-LLM training and two-sided evaluation.

Authors
 * speechbrain-sllm developers 2026
"""

import logging
import math
import os

import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataloader import make_dataloader
from tqdm import tqdm

from speechbrain_sllm.checkpointing import TrainableState, unwrap
from speechbrain_sllm.data.dataio import unpad
from speechbrain_sllm.distributed import (
    all_reduce_max,
    all_reduce_sum,
    gather_in_order,
    rank_shard,
    share_debug_checkpoint_folder,
)
from speechbrain_sllm.fsdp import (
    DISTRIBUTED_MODES,
    FSDPSettings,
    ShardedState,
    full_tensor,
    is_sharded,
    root_gathered,
    shard_speech_llm,
)
from speechbrain_sllm.inference import generated_texts, speech_inputs
from speechbrain_sllm.metrics import QAAccuracyStats, wer_stats
from speechbrain_sllm.model.embedding_ctc import ctc_loss, greedy_ctc_tokens
from speechbrain_sllm.model.encoders import AudioTooLongError
from speechbrain_sllm.model.speech_llm import ContextLengthError, shifted_lm_loss
from speechbrain_sllm.strategies import param_groups

logger = logging.getLogger(__name__)
INPUT_MODES = ("speech", "text")
METRICS = ("WER", "S2T", "T2T", "text_ppl")
MAX_METRICS = ("S2T", "T2T")


def context_error(error, item_id, mode):
    """A ``ContextLengthError`` that names the dataset item and the fix for its input mode."""
    what = "spoken question + answer" if mode == "speech" else "written question + answer"
    fix = (
        "lower `max_duration`, or downsample speech more (adaptor stack / stride)"
        if mode == "speech"
        else "shorten the question or answer, or remove the item from the manifest"
    )
    return ValueError(
        f"Item {item_id!r}: the {what} takes {error.length} positions, over the LLM "
        f"context of {error.limit}; {fix}."
    )


class SpeechLLMBrain(sb.Brain):
    """Trains a ``SpeechLLM`` (module key ``model``) with the strategy in ``hparams``.

    Expected hparams (a recipe passes its whole yaml): ``prompt`` (ChatPrompt),
    ``tokenizer``; for training also ``training_strategy`` (from
    ``build_strategy``, applied to the model before the Brain is built) and
    ``lr``. Optional: ``lr_schedule`` (WarmupDecaySchedule, set before each
    optimizer step), ``epoch_counter``, ``input_mode`` (``speech`` or ``text``),
    ``train_logger``, ``valid_metrics`` / ``test_metrics`` (see ``METRICS``),
    ``ckpt_key``, ``text_valid_set`` (written QA for ``text_ppl``),
    ``answer_match``, ``eval_batch_size``, ``max_new_tokens``, ``num_beams``,
    ``output_folder`` (per-item test outputs). SpeechBrain run options in the
    yaml (``precision``, ``max_grad_norm``, ...) are read by ``sb.Brain``.

    Gradients are clipped over ALL parameter groups (SpeechBrain clips
    ``param_groups[0]`` only), and checkpoints hold only trainable tensors.
    Under torchrun, decoding and perplexity are split across ranks and gathered
    exactly, and all ranks share one checkpoint folder (also in ``--debug``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        share_debug_checkpoint_folder(self.checkpointer)
        self.skipped_steps = 0  # non-finite loss or gradient norm, this process
        self.dropped_items = 0  # items with non-finite audio, this process
        self.counts_before_epoch = (0, 0)
        self.batch_ids = []

    @property
    def input_mode(self):
        """``speech`` (spoken question) or ``text`` (written question)."""
        mode = getattr(self.hparams, "input_mode", "speech")
        if mode not in INPUT_MODES:
            raise ValueError(f"input_mode {mode!r} unknown; use one of {INPUT_MODES}.")
        return mode

    @property
    def model(self):
        """The ``SpeechLLM``, unwrapped from DDP."""
        return unwrap(self.modules.model)

    def compute_forward(self, batch, stage):
        """Runs the model on a batch in the current input mode."""
        return self.forward_mode(batch, self.input_mode)

    def forward_mode(self, batch, mode):
        """Forward pass with spoken (``speech``) or written (``text``) questions.

        Arguments
        ---------
        batch : PaddedBatch
            Batch from ``make_qa_dataset``.
        mode : str
            ``speech`` or ``text``.

        Returns
        -------
        logits : torch.Tensor
            ``(B, L, V)``.
        labels : torch.Tensor
            ``(B, L)``.
        """
        batch = batch.to(self.device)
        answers = [ids.tolist() for ids in unpad(batch.answer_ids)]
        ids = list(batch.id)
        try:
            if mode == "speech":
                wavs, wav_lens = batch.sig
                keep = self.items_with_finite_audio(wavs, ids)
                if len(keep) < len(ids):
                    wavs, wav_lens = wavs[keep], wav_lens[keep]
                    answers, ids = [answers[i] for i in keep], [ids[i] for i in keep]
                prefix, suffix = self.hparams.prompt.speech_prompt()
                count = len(answers)
                return self.modules.model(
                    [prefix] * count, answers, wavs, wav_lens, [suffix] * count
                )
            prompts = [ids.tolist() for ids in unpad(batch.prompt_ids)]
            return self.modules.model(prompts, answers)
        except ContextLengthError as error:
            raise context_error(error, ids[error.item], mode) from error
        except AudioTooLongError as error:
            raise AudioTooLongError(f"Item {ids[error.item]!r}: {error}", error.item) from error

    def items_with_finite_audio(self, wavs, ids):
        """Indices of the items whose audio is finite; the others are dropped and logged.

        A NaN or infinite sample makes the whole batch's loss and gradients
        non-finite; dropping the item keeps the step for the good items. A batch
        with no good item is kept whole (its step is then skipped).

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, T)`` padded audio.
        ids : list of str
            The items' ids.

        Returns
        -------
        list of int
        """
        finite = torch.isfinite(wavs).all(dim=1).tolist()
        keep = [index for index, good in enumerate(finite) if good]
        if len(keep) in (0, len(ids)):
            return list(range(len(ids)))
        dropped = [ids[index] for index, good in enumerate(finite) if not good]
        self.dropped_items += len(dropped)
        logger.warning(f"Step {self.step}: dropped items with non-finite audio: {dropped}")
        return keep

    def compute_objectives(self, predictions, batch, stage):
        """Mean next-token cross-entropy over answer tokens."""
        logits, labels = predictions
        return shifted_lm_loss(logits, labels, "mean")

    def init_optimizers(self):
        """Builds one optimizer over the strategy's parameter groups."""
        if self.opt_class is None:
            return
        groups = param_groups(self.model, self.hparams.training_strategy, self.hparams.lr)
        if not groups:
            raise ValueError("No trainable parameter: check `strategy` and the model settings.")
        self.optimizer = self.opt_class(groups)
        self.optimizers_dict = {"optimizer": self.optimizer}
        if self.checkpointer is None:
            return
        if is_sharded(self.model):  # one DCP entry: trainable shards + optimizer shards
            self.checkpointer.recoverables.pop("optimizer", None)
            self.checkpointer.add_recoverable("model", ShardedState(self.model, self.optimizer))
        else:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def on_fit_start(self):
        """Registers the compact model state and the schedule before recovery."""
        if self.checkpointer is not None:
            recoverables = self.checkpointer.recoverables
            if "model" not in recoverables:
                self.checkpointer.add_recoverable("model", TrainableState(self.modules.model))
            schedule = getattr(self.hparams, "lr_schedule", None)
            if schedule is not None and "lr_schedule" not in recoverables:
                self.checkpointer.add_recoverable("lr_schedule", schedule)
        super().on_fit_start()

    def _parallelism(self):
        """The yaml's ``parallelism`` (``ddp`` or ``fsdp``), checked."""
        mode = getattr(self.hparams, "parallelism", "ddp")
        if mode not in DISTRIBUTED_MODES:
            raise ValueError(
                f"parallelism {mode!r} unknown; use one of {DISTRIBUTED_MODES} "
                "(yaml key or --parallelism=...)."
            )
        return mode

    def shard_model(self):
        """Shards the model now under ``parallelism: fsdp`` and torchrun; else does nothing.

        ``fit`` shards anyway; a recipe calls this first when it scores
        importance before training, so that step too runs on shards (a model
        that does not fit one device). Call it after ``apply_strategy``:
        LoRA cannot be added to a sharded LLM.
        """
        if self._parallelism() == "fsdp" and self.distributed_launch:
            if not is_sharded(self.model):
                shard_speech_llm(self.model, getattr(self.hparams, "fsdp", None) or FSDPSettings())

    def _wrap_distributed(self):
        """SpeechBrain's DDP, or FSDP2 sharding with ``parallelism: fsdp`` under torchrun."""
        if self._parallelism() == "ddp" or not self.distributed_launch:
            return super()._wrap_distributed()
        self.shard_model()

    def check_loss_isfinite(self, loss):
        """Counts a non-finite loss; its step will be skipped (see ``optimizers_step``).

        Training stops with a clear error once more than ``nonfinite_patience``
        losses of the current epoch were non-finite.
        """
        if torch.isfinite(loss):
            return
        self.nonfinite_count += 1
        self.skip_this_step = True
        self.skipped_steps += 1
        logger.warning(
            f"Non-finite loss at step {self.step} (items {self.batch_ids}): the optimizer "
            f"step is skipped ({self.nonfinite_count} this epoch, patience "
            f"{self.nonfinite_patience})."
        )
        if self.nonfinite_count > self.nonfinite_patience:
            raise FloatingPointError(
                f"{self.nonfinite_count} non-finite losses in this epoch exceed "
                f"nonfinite_patience={self.nonfinite_patience}. Lower the learning rate, "
                "check the data (empty or corrupted audio), or train in fp32/bf16 instead "
                "of fp16. The last good checkpoint is untouched."
            )

    def optimizers_step(self):
        """Optimizer step with gradient clipping over every parameter group.

        Steps whose loss or gradient norm is non-finite are skipped (gradients
        dropped) and counted in ``skipped_steps``.
        """
        if self.opt_class is None:
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        if getattr(self, "skip_this_step", False) or not torch.isfinite(norm):
            if not getattr(self, "skip_this_step", False):
                self.skipped_steps += 1
                logger.warning(
                    f"Non-finite gradient norm at step {self.step} (items {self.batch_ids}): "
                    "step skipped."
                )
            self.skip_this_step = False
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            return
        if not self.scaler.is_enabled() and self.skip_nonfinite_grads:
            self.check_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1

    def fit(
        self,
        epoch_counter,
        train_set,
        valid_set=None,
        progressbar=None,
        train_loader_kwargs=None,
        valid_loader_kwargs=None,
    ):
        """``Brain.fit`` that also sizes the LR schedule and keeps the valid set for decoding.

        The schedule's length (optimizer steps of the whole run) is known only
        once the training loader exists: it is set here from the loader's length
        on this rank, the epoch limit and ``grad_accumulation_factor``.
        """
        train_loader_kwargs = dict(train_loader_kwargs or {})
        if not isinstance(train_set, torch.utils.data.DataLoader):
            train_set = self.make_dataloader(train_set, sb.Stage.TRAIN, **train_loader_kwargs)
        schedule = getattr(self.hparams, "lr_schedule", None)
        if schedule is not None:
            batches = len(train_set) * epoch_counter.limit
            schedule.set_total_steps(max(batches // self.grad_accumulation_factor, 1))
        self.eval_set, self.eval_name = valid_set, "valid"
        super().fit(
            epoch_counter,
            train_set,
            valid_set,
            progressbar=progressbar,
            train_loader_kwargs=train_loader_kwargs,
            valid_loader_kwargs=dict(valid_loader_kwargs or {}),
        )

    def evaluate(
        self,
        test_set,
        max_key=None,
        min_key=None,
        progressbar=None,
        test_loader_kwargs=None,
        name="test",
    ):
        """``Brain.evaluate`` (best checkpoint by ``max_key``/``min_key``), named for its outputs.

        Arguments
        ---------
        test_set : DynamicItemDataset
            Test data.
        max_key : str or None
            Checkpoint meta key to maximise when choosing the checkpoint.
        min_key : str or None
            Checkpoint meta key to minimise.
        progressbar : bool or None
            Show a progress bar.
        test_loader_kwargs : dict or None
            Loader options.
        name : str
            Name of the set in the logs and output files (e.g. ``test-clean``).

        Returns
        -------
        dict
            The test stats (``loss`` and every metric of ``test_metrics``).
        """
        self.eval_set, self.eval_name = test_set, name
        super().evaluate(
            test_set,
            max_key=max_key,
            min_key=min_key,
            progressbar=progressbar,
            test_loader_kwargs=dict(test_loader_kwargs or {}),
        )
        return self.test_stats

    def on_fit_batch_start(self, batch, should_step):
        """Restores recovered random generators, then sets this step's learning rates.

        The schedule advances BEFORE the optimizer step, so optimizer step ``k``
        runs at ``factor(k)``: step 1 at ``lr / warmup_steps``.
        """
        self.batch_ids = list(getattr(batch, "id", []))  # named when the step is skipped
        rng = self.checkpointer.recoverables.get("rng") if self.checkpointer else None
        if rng is not None:
            rng.apply_pending()
        schedule = getattr(self.hparams, "lr_schedule", None)
        if should_step and schedule is not None and self.opt_class is not None:
            schedule(self.optimizer)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Computes the stage's metrics, logs them, keeps the best checkpoint after validation.

        Metrics are named in ``valid_metrics`` / ``test_metrics`` (see
        ``METRICS``); the checkpoint kept is the best by ``ckpt_key``
        (``loss`` by default; higher is better for accuracies).
        """
        stats = {"loss": stage_loss, "ppl": math.exp(min(stage_loss, 50.0))}
        if stage == sb.Stage.TRAIN:
            skipped, dropped = self.counts_before_epoch
            stats["skipped_steps"] = self.skipped_steps - skipped  # this epoch
            stats["dropped_items"] = self.dropped_items - dropped
            self.counts_before_epoch = (self.skipped_steps, self.dropped_items)
            self.train_stats = stats
            return
        names = getattr(
            self.hparams, "valid_metrics" if stage == sb.Stage.VALID else "test_metrics", []
        )
        stats.update(self.compute_metrics(names, stage))
        train_logger = getattr(self.hparams, "train_logger", None)
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"] if self.opt_class else 0.0
            if train_logger is not None:
                train_logger.log_stats(
                    stats_meta={"epoch": epoch, "lr": lr},
                    train_stats=getattr(self, "train_stats", None),
                    valid_stats=stats,
                )
            if self.checkpointer is not None:
                key = self.ckpt_key
                keys = {"max_keys": [key]} if key in MAX_METRICS else {"min_keys": [key]}
                self.checkpointer.save_and_keep_only(meta=stats, **keys)
            return
        self.test_stats = stats
        if train_logger is not None:
            train_logger.log_stats(
                stats_meta={
                    "Epoch loaded": self.hparams.epoch_counter.current,
                    "set": self.eval_name,
                },
                test_stats=stats,
            )

    @property
    def ckpt_key(self):
        """The checkpoint meta key that selects the best checkpoint (``ckpt_key`` hparam)."""
        key = getattr(self.hparams, "ckpt_key", "loss")
        allowed = ["loss", *getattr(self.hparams, "valid_metrics", [])]
        if key not in allowed:
            raise ValueError(
                f"ckpt_key {key!r} is not computed at validation; use one of {allowed} "
                "(add it to valid_metrics)."
            )
        return key

    def compute_metrics(self, names, stage):
        """Metrics of the current evaluation set (decoding split across ranks).

        Arguments
        ---------
        names : list of str
            Among ``METRICS``: ``WER`` (speech -> transcript), ``S2T`` / ``T2T``
            (spoken / written QA accuracy), ``text_ppl`` (perplexity of
            ``text_valid_set``, or of the evaluation set's written questions).
        stage : sb.Stage
            ``VALID`` or ``TEST`` (per-item outputs are written at TEST).

        Returns
        -------
        dict
        """
        unknown = sorted(set(names) - set(METRICS))
        if unknown:
            raise ValueError(f"metrics {unknown} unknown; use some of {METRICS}.")
        folder = getattr(self.hparams, "output_folder", None)
        write = stage == sb.Stage.TEST and folder is not None
        kwargs = {"batch_size": getattr(self.hparams, "eval_batch_size", 8)}
        stats = {}
        for name in names:
            output = os.path.join(folder, f"{self.eval_name}_{name}.txt") if write else None
            if name == "WER":
                stats[name] = self.evaluate_wer(self.eval_set, output_file=output, **kwargs)
            elif name in ("S2T", "T2T"):
                mode = "speech" if name == "S2T" else "text"
                match = getattr(self.hparams, "answer_match", "contains")
                stats[name] = self.evaluate_qa(
                    self.eval_set, mode, match=match, output_file=output, **kwargs
                )
            else:
                text_set = getattr(self.hparams, "text_valid_set", None) or self.eval_set
                stats[name] = self.perplexity(text_set, mode="text", **kwargs)
        return stats

    def _rank_loader(self, dataset, batch_size):
        """This rank's share of ``dataset`` (``rank::world``) and its item positions."""
        positions = rank_shard(range(len(dataset)))
        subset = torch.utils.data.Subset(dataset, positions)
        loader = make_dataloader(
            subset, batch_size=batch_size, shuffle=False, collate_fn=PaddedBatch
        )
        return loader, positions

    def rank_batches(self, dataset, batch_size):
        """Yields ``(batch, counted)`` over this rank's share of ``dataset``.

        A sharded (FSDP) model gathers its parameters in every forward, so all
        ranks must run the same number of batches: a rank with fewer batches
        runs copies of the first item with ``counted=False``, whose results
        the caller drops.

        Arguments
        ---------
        dataset : DynamicItemDataset
            The data.
        batch_size : int
            Batch size.

        Yields
        ------
        batch : PaddedBatch
            The next batch.
        counted : bool
            False for a lockstep filler batch.
        """
        loader, _ = self._rank_loader(dataset, batch_size)
        missing = 0
        if is_sharded(self.model):  # agreed before any forward: a collective of its own
            missing = all_reduce_max(len(loader), self.device) - len(loader)
        yield from ((batch, True) for batch in loader)
        for _ in range(missing):
            yield PaddedBatch([dataset[0]]), False

    @torch.no_grad()
    def perplexity(self, dataset, mode="text", batch_size=8):
        """Perplexity of the answers given the questions (token-weighted).

        Under torchrun each rank scores its share and the sums are all-reduced.

        Arguments
        ---------
        dataset : DynamicItemDataset
            QA dataset.
        mode : str
            ``text`` or ``speech`` questions.
        batch_size : int
            Batch size.

        Returns
        -------
        float
        """
        self.modules.eval()
        total, count = 0.0, 0
        for batch, counted in self.rank_batches(dataset, batch_size):
            with self.evaluation_ctx:
                logits, labels = self.forward_mode(batch, mode)
            if counted:
                total += shifted_lm_loss(logits.float(), labels, "sum").item()
                count += int((labels[:, 1:] != -100).sum())
        total, count = all_reduce_sum([total, count], self.device)
        return math.exp(min(total / max(count, 1), 50.0))

    @torch.no_grad()
    def decode(self, dataset, mode="speech", batch_size=8, progress=False):
        """Generates answers for every item of ``dataset``.

        Arguments
        ---------
        dataset : DynamicItemDataset
            QA dataset.
        mode : str
            ``speech`` (S2T) or ``text`` (T2T) questions.
        batch_size : int
            Batch size.
        progress : bool
            Show a progress bar.

        Returns
        -------
        ids, predictions, references : list of str
            In dataset order; under torchrun each rank decodes its share and
            every rank returns the whole, each item once.
        """
        self.modules.eval()
        model, prompt, tok = self.model, self.hparams.prompt, self.hparams.tokenizer
        ids, predictions, references = [], [], []
        positions = rank_shard(range(len(dataset)))
        batches = self.rank_batches(dataset, batch_size)
        for batch, counted in tqdm(batches, disable=not progress, desc=f"decode {mode}"):
            batch = batch.to(self.device)
            with self.evaluation_ctx, root_gathered(model):
                if mode == "speech":
                    inputs = speech_inputs(model, prompt, *batch.sig)
                else:
                    prompts = [p.tolist() for p in unpad(batch.prompt_ids)]
                    inputs = model.build_batch(prompts, padding_side="left")
                texts = generated_texts(
                    model,
                    tok,
                    inputs,
                    max_new_tokens=getattr(self.hparams, "max_new_tokens", 32),
                    num_beams=getattr(self.hparams, "num_beams", 1),
                )
            if not counted:
                continue
            ids.extend(batch.id)
            predictions.extend(texts)
            references.extend(batch.answer)
        items = gather_in_order(list(zip(ids, predictions, references)), positions)
        if not items:
            return [], [], []
        ids, predictions, references = (list(column) for column in zip(*items))
        return ids, predictions, references

    def evaluate_qa(self, dataset, mode="speech", match="contains", output_file=None, **kwargs):
        """QA accuracy (%) with normalised answer matching (T2T or S2T).

        Arguments
        ---------
        dataset : DynamicItemDataset
            QA dataset.
        mode : str
            ``speech`` or ``text``.
        match : str
            ``contains`` or ``exact``.
        output_file : str or None
            Where per-item predictions are written (tab separated).
        **kwargs : dict
            Passed to ``decode``.

        Returns
        -------
        float
        """
        stats = QAAccuracyStats(mode=match)
        stats.append(*self.decode(dataset, mode=mode, **kwargs))
        accuracy = stats.summarize("accuracy")
        if output_file and sb.utils.distributed.if_main_process():
            os.makedirs(os.path.dirname(output_file) or ".", exist_ok=True)
            with open(output_file, "w") as handle:
                stats.write_stats(handle)
        return accuracy

    def evaluate_wer(self, dataset, output_file=None, **kwargs):
        """Word error rate (%) of generated transcripts against the ``answer`` field.

        Arguments
        ---------
        dataset : DynamicItemDataset
            ASR dataset whose answers are transcripts.
        output_file : str or None
            Where SpeechBrain's WER alignment report is written.
        **kwargs : dict
            Passed to ``decode``.

        Returns
        -------
        float
        """
        stats = wer_stats()
        ids, predictions, references = self.decode(dataset, mode="speech", **kwargs)
        stats.append(ids, [p.split() for p in predictions], [r.split() for r in references])
        if output_file and sb.utils.distributed.if_main_process():
            with open(output_file, "w") as handle:
                stats.write_stats(handle)
        return stats.summarize("error_rate")


class CTCEncoderBrain(sb.Brain):
    """Pretrains a speech encoder as a character CTC recogniser (a Whisper stand-in).

    Modules: ``encoder`` (a ``SpeechEncoder``) and ``ctc_head`` (``Linear(D, vocab)``).
    Hparams: ``alphabet`` (characters; the head's index 0 is the CTC blank, so
    character ``c`` is index ``alphabet.index(c) + 1``, as in ``ctc_loss``).
    Batches need ``sig`` and ``question``.
    """

    def tokens(self, texts):
        """Character ids (``alphabet`` positions) of lower-cased texts, unknown ones dropped."""
        alphabet = self.hparams.alphabet
        return [[alphabet.index(ch) for ch in text.lower() if ch in alphabet] for text in texts]

    def compute_forward(self, batch, stage):
        """Encoder frames -> CTC log-probabilities ``(B, T, vocab)``."""
        batch = batch.to(self.device)
        feats, lengths = self.modules.encoder(*batch.sig)
        return self.modules.ctc_head(feats).log_softmax(dim=-1), lengths

    def compute_objectives(self, predictions, batch, stage):
        """Character CTC loss, mean over the batch."""
        log_probs, lengths = predictions
        return ctc_loss(log_probs, lengths, self.tokens(batch.question))

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs the loss and keeps the best checkpoint by validation loss."""
        if stage == sb.Stage.TRAIN:
            self.train_loss = stage_loss
        elif stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch},
                train_stats={"loss": getattr(self, "train_loss", None)},
                valid_stats={"loss": stage_loss},
            )
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"])


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
