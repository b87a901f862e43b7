"""CTC alignment of an adaptor onto an LLM's input embeddings (model/embedding_ctc.py,
study.EmbeddingCTCBrain)."""

import speechbrain as sb
import torch
import torch.nn.functional as F

from speechbrain_sllm.model.adaptors import FrameStackAdaptor
from speechbrain_sllm.model.embedding_ctc import (
    EmbeddingCTCHead,
    ctc_loss,
    greedy_ctc_tokens,
)
from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder
from speechbrain_sllm.study import EmbeddingCTCBrain


def frames_spelling(head, embeddings, token_ids, repeat=2):
    """Frames that sit on each token's embedding (``repeat`` times) with blanks between."""
    blank = head.blank.detach()
    frames = []
    for token in token_ids:
        frames += [embeddings[token]] * repeat + [blank / blank.norm() * head.radius]
    return torch.stack(frames)[None]


def test_frames_on_the_token_embeddings_decode_to_those_tokens():
    torch.manual_seed(0)
    embeddings = torch.randn(50, 32)
    head = EmbeddingCTCHead(embeddings, scale=30.0)
    frames = frames_spelling(head, embeddings, [7, 3, 3, 41])
    log_probs = head(frames)
    assert greedy_ctc_tokens(log_probs, torch.tensor([1.0])) == [[7, 3, 3, 41]]
    # the loss indexes token t as t + 1 (0 is the blank): the spelled tokens score
    # far better than the same tokens shifted by one id
    spelled = ctc_loss(log_probs, torch.tensor([1.0]), [[7, 3, 3, 41]])
    shifted = ctc_loss(log_probs, torch.tensor([1.0]), [[8, 4, 4, 42]])
    assert spelled < 1.0 < shifted


def test_relative_lengths_cut_the_padding_off():
    torch.manual_seed(0)
    embeddings = torch.randn(20, 16)
    head = EmbeddingCTCHead(embeddings)
    item = frames_spelling(head, embeddings, [5, 9])  # 6 frames
    padding = frames_spelling(head, embeddings, [2, 2])  # would decode as 2, 2
    batch = torch.cat([torch.cat([item, padding], dim=1), torch.cat([item, item], dim=1)])
    decoded = greedy_ctc_tokens(head(batch), torch.tensor([0.5, 1.0]))
    assert decoded == [[5, 9], [5, 9, 5, 9]]


def test_norm_penalty_pulls_valid_frames_to_the_embeddings_median_norm():
    embeddings = torch.randn(30, 8)
    head = EmbeddingCTCHead(embeddings)
    radius = embeddings.norm(dim=1).median().item()
    on_radius = F.normalize(torch.randn(1, 4, 8), dim=-1) * radius
    assert head.norm_penalty(on_radius, torch.tensor([1.0])) < 1e-10
    assert torch.isclose(head.norm_penalty(2 * on_radius, torch.tensor([1.0])), torch.tensor(1.0))
    # frames past an item's length do not count
    padded = torch.cat([on_radius, 5 * on_radius], dim=1)
    assert head.norm_penalty(padded, torch.tensor([0.5])) < 1e-10


class WordTokenizer:
    """Word-level tokenizer of a fixed vocabulary (the Brain needs encode / decode)."""

    def __init__(self, words):
        self.words = words

    def encode(self, text):
        return [self.words.index(word) for word in text.split()]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def tone_dataset(words, sentences, rate=16000):
    """Items whose audio spells each word as its own tone (0.15 s per word)."""
    samples = torch.arange(int(0.15 * rate)) / rate
    tones = {w: torch.sin(2 * torch.pi * (300 + 250 * i) * samples) for i, w in enumerate(words)}
    data = {
        f"s{i}": {"sig": torch.cat([tones[w] for w in text.split()]), "question": text}
        for i, text in enumerate(sentences)
    }
    dataset = sb.dataio.dataset.DynamicItemDataset(data)
    dataset.set_output_keys(["id", "sig", "question"])
    return dataset


def test_brain_aligns_an_adaptor_and_keeps_the_best_epoch(tmp_path):
    torch.manual_seed(0)
    words = ["who", "was", "the", "first", "king"]
    sentences = ["who was the first king", "the king was first", "who was king", "the first"]
    dataset = tone_dataset(words, sentences)
    encoder = FbankTransformerEncoder(n_mels=20, d_model=32, num_layers=1, nhead=2, freeze=True)
    adaptor = FrameStackAdaptor(input_size=32, output_size=16, stack=2, hidden_size=64)
    head = EmbeddingCTCHead(torch.randn(len(words), 16), scale=10.0)
    counter = sb.utils.epoch_loop.EpochCounter(limit=30)
    checkpointer = sb.utils.checkpoints.Checkpointer(
        tmp_path / "save", {"adaptor": adaptor, "ctc_head": head, "counter": counter}
    )
    brain = EmbeddingCTCBrain(
        modules={"encoder": encoder, "adaptor": adaptor, "ctc_head": head},
        opt_class=lambda params: torch.optim.Adam(params, lr=3e-3),
        hparams={
            "tokenizer": WordTokenizer(words),
            "norm_weight": 1.0,
            "epoch_counter": counter,
            "train_logger": sb.utils.train_logger.FileTrainLogger(tmp_path / "log.txt"),
        },
        checkpointer=checkpointer,
    )
    loader = {"batch_size": 2}
    brain.evaluate(dataset, test_loader_kwargs=dict(loader), progressbar=False)
    before = dict(brain.last_stats)
    brain.fit(
        counter,
        dataset,
        dataset,
        train_loader_kwargs=dict(loader, shuffle=True),
        valid_loader_kwargs=dict(loader),
        progressbar=False,
    )
    brain.evaluate(dataset, min_key="loss", test_loader_kwargs=dict(loader), progressbar=False)
    after = brain.last_stats
    assert after["loss"] < 0.3 * before["loss"]
    assert before["WER"] > 50.0 and after["WER"] == 0.0  # every tone read as its word
    # the encoder stays frozen: only the adaptor and the blank direction train
    assert all(not p.requires_grad for p in encoder.parameters())
    log = (tmp_path / "log.txt").read_text()
    assert log.count("valid loss") == 30 and "WER" in log
