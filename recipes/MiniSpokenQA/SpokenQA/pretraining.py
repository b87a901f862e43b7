"""MiniSpokenQA's stage 2: the parts a real study downloads, trained here on the CPU.

* a sentencepiece tokenizer on every question and answer;
* a small Llama-style LM that memorises the written QA (its "textual competence");
* a speech encoder trained as a character CTC recogniser on the spoken training
  questions (a stand-in for Whisper: it never sees answers, and it is frozen
  during speech fine-tuning, as in the paper).

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import logging
import os

import speechbrain as sb
import torch

from speechbrain_sllm.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
from speechbrain_sllm.model.embedding_ctc import ctc_loss
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.strategies import apply_strategy, build_strategy
from speechbrain_sllm.study import StageTraining

logger = logging.getLogger(__name__)
ALPHABET = "abcdefghijklmnopqrstuvwxyz '?."


def load_or_train_tokenizer(hparams, paths):
    """A sentencepiece tokenizer trained on all questions and answers (kept in the output)."""
    folder = os.path.join(hparams["output_folder"], "tokenizer")
    model_path = os.path.join(folder, "spm.model")
    if os.path.isfile(model_path):
        return SentencePieceTokenizer(model_path)
    with open(paths["text_train"]) as handle:
        rows = list(csv.DictReader(handle))
    texts = [f"User: {row['question']}" for row in rows] + ["Assistant:"] * 10
    texts += [row["answer"] for row in rows]
    return train_sentencepiece(texts, folder, vocab_size=hparams["vocab_size"])


def pretrain_lm(runner, data, config, epochs, batch_size, lr):
    """The small LM, pretrained on the written QA and saved as an HF model folder.

    The LM's task is to memorise the written QA: there is no held-out text to
    validate on, so it trains for its epochs and keeps the final weights.

    Arguments
    ---------
    runner : StudyRunner
        The study (its stage Brains).
    data : dict
        Datasets (``text_train``).
    config : transformers.LlamaConfig
        The LM's shape.
    epochs : int
        Training epochs.
    batch_size : int
        Batch size.
    lr : float
        Peak learning rate.

    Returns
    -------
    str
        The saved model folder.
    """
    hparams = runner.hparams
    folder = os.path.join(hparams["output_folder"], "base")
    model_dir = os.path.join(folder, "model")
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        logger.info(f"Base LM found in {model_dir}")
        return model_dir
    model = SpeechLLM(load_causal_lm(config=config))
    strategy = build_strategy("full_ft")
    apply_strategy(model, strategy)
    shared = hparams["finetune"]  # the fine-tuning stages' optimizer and warmup
    training = StageTraining(lr, epochs, shared.opt_class, shared.warmup_fraction)
    brain = runner.stage_brain(model, strategy, "text", folder, training)
    brain.fit(
        brain.hparams.epoch_counter,
        data["text_train"],
        train_loader_kwargs={"batch_size": batch_size, "shuffle": True},
    )
    if sb.utils.distributed.if_main_process():
        model.llm.save_pretrained(model_dir)
        hparams["tokenizer"].to_hf(model_dir)
    return model_dir


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


def pretrain_encoder(hparams, run_opts, data, epochs, lr):
    """The speech encoder, trained with character CTC on the spoken training questions.

    Arguments
    ---------
    hparams : dict
        The study's yaml (``encoder``, ``output_folder``, ``seed``, ``finetune``'s batch size).
    run_opts : dict
        SpeechBrain run options.
    data : dict
        Datasets (``speech_train``, ``speech_valid``).
    epochs : int
        Training epochs (the lowest validation loss is kept).
    lr : float
        AdamW's learning rate.

    Returns
    -------
    str
        The saved encoder weights (``encoder/encoder.ckpt``).
    """
    folder = os.path.join(hparams["output_folder"], "encoder")
    path = os.path.join(folder, "encoder.ckpt")
    sb.utils.seed_everything(hparams["seed"])
    encoder = hparams["encoder"]()
    if os.path.isfile(path):
        encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return path
    head = torch.nn.Linear(encoder.output_size, len(ALPHABET) + 1)
    counter = sb.utils.epoch_loop.EpochCounter(limit=epochs)
    brain = CTCEncoderBrain(
        modules={"encoder": encoder, "ctc_head": head},
        opt_class=lambda params: torch.optim.AdamW(params, lr=lr),
        hparams={
            "alphabet": ALPHABET,
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
    brain.fit(
        counter,
        data["speech_train"],
        data["speech_valid"],
        train_loader_kwargs={"batch_size": hparams["finetune"].batch_size, "shuffle": True},
        valid_loader_kwargs={"batch_size": hparams["finetune"].batch_size},
    )
    brain.checkpointer.recover_if_possible(min_key="loss")
    if sb.utils.distributed.if_main_process():
        torch.save(encoder.state_dict(), path)
    return path
