"""A small Fbank + Transformer speech encoder for CPU work (the embedded study's).

Authors
 * speechbrain-sllm developers 2026
"""

import torch
from speechbrain.lobes.features import Fbank
from torch import nn

from speechbrain_sllm.model.encoder_caches import FeatureCache
from speechbrain_sllm.model.encoders import SpeechEncoder


class FbankTransformerEncoder(SpeechEncoder):
    """Small encoder for CPU work: Fbank -> 2 strided convs (4x) -> Transformer.

    Arguments
    ---------
    n_mels : int
        Number of mel filters.
    d_model : int
        Transformer width (``output_size``).
    num_layers : int
        Number of Transformer encoder layers.
    nhead : int
        Attention heads.
    dropout : float
        Dropout inside the Transformer.
    freeze : bool
        Whether the encoder is frozen.
    sample_rate : int
        Input sampling rate.
    output_cache : EncoderOutputCache, str or None
        Cache of the frozen encoder's outputs (see ``SpeechEncoder``).
    cache_features : bool
        Keep each item's Fbank features in a ``FeatureCache`` (for an encoder
        that trains on audio that is not augmented).

    Example
    -------
    >>> enc = FbankTransformerEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, freeze=False)
    >>> feats, lens = enc(torch.randn(2, 16000), torch.tensor([1.0, 0.5]))
    >>> feats.shape
    torch.Size([2, 26, 16])
    """

    def __init__(
        self,
        n_mels=40,
        d_model=256,
        num_layers=4,
        nhead=4,
        dropout=0.1,
        freeze=False,
        sample_rate=16000,
        output_cache=None,
        cache_features=False,
    ):
        super().__init__(freeze=freeze, output_cache=output_cache)
        self.fbank = Fbank(n_mels=n_mels, sample_rate=sample_rate)
        self.feature_cache = FeatureCache(self.fbank) if cache_features else None
        self.subsample = nn.Sequential(
            nn.Conv1d(n_mels, d_model, 3, 2, padding=1),
            nn.GELU(),
            nn.Conv1d(d_model, d_model, 3, 2, padding=1),
            nn.GELU(),
        )
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, 4 * d_model, dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.output_size = d_model
        self.freeze_parameters()

    def encode(self, wavs, wav_lens):
        """See ``SpeechEncoder.forward``."""
        if self.feature_cache is not None:
            feats = self.feature_cache.features(wavs, wav_lens)  # (B, F, n_mels)
        else:
            feats = self.fbank(wavs)
        frames = feats.shape[1]
        valid_frames = torch.round(wav_lens * (frames - 1)) + 1  # centred STFT: S / hop + 1
        frame_mask = torch.arange(frames, device=feats.device)[None, :] < valid_frames[:, None]
        frame_mask = frame_mask.unsqueeze(-1).to(feats.dtype)  # (B, F, 1)
        mean = (feats * frame_mask).sum(dim=1, keepdim=True) / valid_frames[:, None, None]
        feats = (feats - mean) * frame_mask  # per-utterance mean over valid frames only
        hidden = self.subsample(feats.transpose(1, 2)).transpose(1, 2)  # (B, F/4, D)
        time = hidden.shape[1]
        valid = torch.ceil(wav_lens * time).clamp(min=1)
        pad_mask = torch.arange(time, device=hidden.device)[None, :] >= valid[:, None]
        hidden = self.transformer(hidden, src_key_padding_mask=pad_mask)
        return self.norm(hidden), valid / time
