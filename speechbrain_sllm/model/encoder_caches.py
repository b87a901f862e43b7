"""Exact caches of a speech encoder's work: its outputs when frozen, its features.

* ``EncoderOutputCache``: a frozen encoder's output per item, in memory and
  optionally on disk, shared by every epoch, strategy and evaluation;
* ``FeatureCache``: an encoder's Fbank features per item, for an encoder that
  trains (its outputs change, its inputs do not).

Both key items by ``tensor_key`` and keep them in a bounded ``TensorMemo``
(``speechbrain_sllm.model.tensor_cache``).

Authors
 * speechbrain-sllm developers 2026
"""

import os

import torch
from torch import nn

from speechbrain_sllm.model.padding import absolute_lengths
from speechbrain_sllm.model.tensor_cache import TensorMemo, module_key, tensor_key

MEMORY_ITEMS = 20000  # entries an in-memory cache keeps (least recently used dropped)


class EncoderOutputCache:
    """Exact cache of a frozen encoder's outputs, one entry per item.

    The key hashes the encoder's weights (taken at its first use: the encoder
    must stay frozen), the valid samples of the item's audio and the autocast
    dtype, so a hit returns exactly what encoding that item alone would. Items
    are encoded one at a time, so the cached output does not depend on the
    other items of a batch or their padding.

    Arguments
    ---------
    folder : str or None
        Where entries are also written as ``<key>.pt`` (shared by runs and
        processes); None keeps them in memory only.
    max_items : int
        Entries kept in memory (least recently used dropped; a folder keeps all).

    Example
    -------
    >>> from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder
    >>> encoder = FbankTransformerEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, freeze=True)
    >>> encoder.output_cache = EncoderOutputCache()
    >>> wavs, lens = torch.randn(2, 8000), torch.tensor([1.0, 0.5])
    >>> first, first_lens = encoder(wavs, lens)
    >>> again, _ = encoder(wavs, lens)
    >>> len(encoder.output_cache.memory), torch.equal(first, again)
    (2, True)
    """

    def __init__(self, folder=None, max_items=MEMORY_ITEMS):
        self.folder = folder
        self.memory = TensorMemo(max_items)
        if folder is not None:
            os.makedirs(folder, exist_ok=True)

    @staticmethod
    def fingerprint(encoder):
        """A key of the encoder's weights and buffers (computed at its first use)."""
        if getattr(encoder, "weights_fingerprint", None) is None:
            encoder.weights_fingerprint = module_key(encoder)
        return encoder.weights_fingerprint

    def key(self, encoder, wav):
        """The entry key of one item: encoder weights, audio samples, autocast dtype."""
        device = wav.device.type
        precision = (
            str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "off"
        )
        return tensor_key(wav.float(), self.fingerprint(encoder), precision)

    def lookup(self, key, device):
        """The cached ``(T, D)`` output of ``key`` on ``device``, or None."""
        output = self.memory.get(key)
        path = os.path.join(self.folder, f"{key}.pt") if self.folder else None
        if output is None and path and os.path.isfile(path):
            output = torch.load(path, map_location="cpu", weights_only=True)
            self.memory.put(key, output)
        return None if output is None else output.to(device)

    def store(self, key, output):
        """Keeps ``output`` (and writes it atomically when the cache has a folder)."""
        output = output.cpu()
        self.memory.put(key, output)
        if self.folder:
            path = os.path.join(self.folder, f"{key}.pt")
            torch.save(output, path + ".tmp")
            os.replace(path + ".tmp", path)

    def encode(self, encoder, wavs, wav_lens):
        """``encoder(wavs, wav_lens)`` through the cache (see ``SpeechEncoder.forward``)."""
        samples = absolute_lengths(wav_lens, wavs.shape[1]).tolist()
        outputs = []
        for wav, count in zip(wavs, samples):
            wav = wav[:count]
            key = self.key(encoder, wav)
            output = self.lookup(key, wavs.device)
            if output is None:
                feats, _ = encoder.encode(wav[None], torch.ones(1, device=wavs.device))
                output = feats[0].detach()
                self.store(key, output)
            outputs.append(output)
        longest = max(len(output) for output in outputs)
        feats = nn.utils.rnn.pad_sequence(outputs, batch_first=True)  # (B, T, D)
        lengths = torch.tensor([len(output) / longest for output in outputs], device=wavs.device)
        return feats, lengths


class FeatureCache:
    """In-memory cache of an encoder's Fbank features, for encoders that train.

    A training encoder's outputs change every step, but its input features do
    not: each item's features are computed once, on its valid samples alone
    followed by ``n_fft`` zeros (every frame that overlaps the audio), and the
    batch is completed with the item's features of silence. The result equals
    the features of the zero-padded batch, frame for frame.

    Arguments
    ---------
    fbank : speechbrain.lobes.features.Fbank
        The feature extractor (no randomness, centred STFT).
    max_items : int
        Items whose features are kept (least recently used dropped).

    Example
    -------
    >>> from speechbrain.lobes.features import Fbank
    >>> fbank = Fbank(n_mels=20)
    >>> cache = FeatureCache(fbank)
    >>> wavs, lens = torch.randn(2, 8000), torch.tensor([1.0, 0.5])
    >>> wavs[1, 4000:] = 0.0
    >>> feats = cache.features(wavs, lens)
    >>> len(cache.memory), torch.allclose(feats, fbank(wavs), atol=1e-5)
    (2, True)
    """

    def __init__(self, fbank, max_items=MEMORY_ITEMS):
        self.fbank = fbank
        stft = fbank.compute_STFT
        self.n_fft, self.hop = stft.n_fft, stft.hop_length
        self.memory = TensorMemo(max_items)

    def features(self, wavs, wav_lens):
        """The Fbank features of a zero-padded batch, item by item through the cache.

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, S)`` waveforms, zero past each item's end.
        wav_lens : torch.Tensor
            ``(B,)`` relative lengths.

        Returns
        -------
        torch.Tensor
            ``(B, S // hop + 1, n_mels)``.
        """
        frames = wavs.shape[1] // self.hop + 1
        samples = absolute_lengths(wav_lens, wavs.shape[1]).tolist()
        outputs = []
        for wav, count in zip(wavs, samples):
            wav = wav[:count]
            key = tensor_key(wav.float())
            cached = self.memory.get(key)
            if cached is None:
                with torch.no_grad():
                    padded = nn.functional.pad(wav, (0, self.n_fft))
                    cached = self.fbank(padded[None])[0].cpu()
                self.memory.put(key, cached)
            item = cached[:frames]
            # the item's last frame sees only zeros: Fbank's floor (top_db below its peak)
            rest = cached[-1].expand(frames - len(item), -1)
            outputs.append(torch.cat([item, rest]).to(wavs.device))
        return torch.stack(outputs)
