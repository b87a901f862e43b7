"""Speech encoders: their interface and the HF Whisper / wav2vec2-family wrappers.

Every encoder maps ``(B, S)`` 16 kHz waveforms with relative lengths to
``(B, T, D)`` frames with relative lengths, and exposes ``output_size``. The
small Fbank encoder of the embedded study is ``model.fbank_encoder``.

Authors
 * speechbrain-sllm developers 2026
"""

import abc
import logging
import math

import torch
from torch import nn

from speechbrain_sllm.model.encoder_caches import EncoderOutputCache
from speechbrain_sllm.model.padding import absolute_lengths
from speechbrain_sllm.model.pretrained import pretrained_whisper

logger = logging.getLogger(__name__)

WAV2VEC2_FAMILY = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-bert")


class SpeechEncoder(nn.Module, abc.ABC):
    """Base class: handles freezing (no grad, eval mode) around ``encode``.

    A frozen encoder can keep its outputs in an ``EncoderOutputCache``: each
    item is then encoded once (on its own, so the result does not depend on
    the batch it came in) and reused by every later epoch, strategy and
    evaluation that sees the same audio.

    Arguments
    ---------
    freeze : bool
        If True, parameters are not trained and the forward pass runs in
        ``torch.no_grad`` and eval mode.
    output_cache : EncoderOutputCache, str or None
        Cache of a frozen encoder's outputs: a shared cache object, ``"memory"``,
        or a folder for an on-disk cache; None disables caching.
    """

    def __init__(self, freeze=True, output_cache=None):
        super().__init__()
        self.freeze = freeze
        if isinstance(output_cache, str):
            output_cache = EncoderOutputCache(None if output_cache == "memory" else output_cache)
        self.output_cache = output_cache

    def freeze_parameters(self):
        """Applies ``self.freeze`` to the parameters (call after building)."""
        for param in self.parameters():
            param.requires_grad_(not self.freeze)
        if self.freeze:
            self.eval()

    def train(self, mode=True):
        """Keeps a frozen encoder in eval mode (no dropout, fixed norms)."""
        return super().train(mode and not self.freeze)

    def forward(self, wavs, wav_lens):
        """Encodes waveforms.

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, S)`` waveforms at 16 kHz.
        wav_lens : torch.Tensor
            ``(B,)`` relative lengths.

        Returns
        -------
        feats : torch.Tensor
            ``(B, T, D)`` frames.
        lengths : torch.Tensor
            ``(B,)`` relative lengths of ``feats``.
        """
        if self.freeze:
            with torch.no_grad():
                if self.output_cache is not None:
                    return self.output_cache.encode(self, wavs, wav_lens)
                feats, lengths = self.encode(wavs, wav_lens)
            return feats.detach(), lengths
        return self.encode(wavs, wav_lens)

    @abc.abstractmethod
    def encode(self, wavs, wav_lens):
        """Subclasses implement the encoding here (see ``forward``)."""


class AudioTooLongError(ValueError):
    """A clip longer than the encoder's window; ``item`` is its index in the batch.

    Arguments
    ---------
    message : str
        What happened and the fix.
    item : int
        Index of the longest clip in the batch.
    """

    def __init__(self, message, item):
        super().__init__(message)
        self.item = item


class HFWhisperEncoder(SpeechEncoder):
    """Encoder of an HF Whisper model (local path, hub id, or a ``WhisperConfig``).

    Audio is padded to the encoder's fixed window (``2 * max_source_positions``
    mel frames) as Whisper expects; outputs are trimmed to the longest valid
    input in the batch.

    Arguments
    ---------
    source : str or None
        Local folder or hub id of a Whisper checkpoint (with its
        ``preprocessor_config.json``).
    config : transformers.WhisperConfig or None
        Builds a randomly initialised encoder instead of loading ``source``.
    freeze : bool
        Whether the encoder is frozen.
    cache_dir : str or None
        HF cache folder.
    output_cache : EncoderOutputCache, str or None
        Cache of the frozen encoder's outputs (see ``SpeechEncoder``).
    window : str
        ``full``: every clip padded to Whisper's 30 s window, as it was trained;
        ``batch``: a window fitted to the batch's longest clip (positional
        embeddings sliced), far cheaper for short clips but not what Whisper saw
        in training (its effect: docs/results/webquestions.md).

    Example
    -------
    >>> from transformers import WhisperConfig
    >>> cfg = WhisperConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2,
    ...     encoder_ffn_dim=32, num_mel_bins=20, max_source_positions=50,
    ...     decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32)
    >>> enc = HFWhisperEncoder(config=cfg)
    >>> feats, lens = enc(torch.randn(2, 8000), torch.tensor([1.0, 0.5]))
    >>> feats.shape, lens
    (torch.Size([2, 25, 16]), tensor([1.0000, 0.5200]))
    """

    WINDOWS = ("full", "batch")

    def __init__(
        self,
        source=None,
        config=None,
        freeze=True,
        cache_dir=None,
        output_cache=None,
        window="full",
    ):
        super().__init__(freeze=freeze, output_cache=output_cache)
        from transformers import WhisperFeatureExtractor, WhisperModel

        if window not in self.WINDOWS:
            raise ValueError(f"HFWhisperEncoder: window {window!r} unknown; use {self.WINDOWS}.")
        self.window = window

        if (source is None) == (config is None):
            raise ValueError("HFWhisperEncoder: give exactly one of `source` or `config`.")
        if source is not None:
            model = pretrained_whisper(source, cache_dir)  # read once in a sharing scope
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(
                source, cache_dir=cache_dir
            )
            config = model.config
        else:
            model = WhisperModel(config)
            self.feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        self.encoder = model.encoder
        self.n_frames = 2 * config.max_source_positions
        self.hop_length = self.feature_extractor.hop_length
        self.output_size = config.d_model
        self.freeze_parameters()

    @property
    def window_seconds(self):
        """The longest clip the encoder takes, in seconds (30 for Whisper)."""
        return self.n_frames * self.hop_length / self.feature_extractor.sampling_rate

    def encode(self, wavs, wav_lens):
        """See ``SpeechEncoder.forward``."""
        n_samples = self.n_frames * self.hop_length
        if wavs.shape[1] > n_samples:
            lengths = absolute_lengths(wav_lens, wavs.shape[1])
            raise AudioTooLongError(
                f"HFWhisperEncoder: audio of {wavs.shape[1]} samples exceeds the "
                f"encoder window of {n_samples} samples; filter long utterances "
                "(the data pipeline's `max_duration`) or use a longer window.",
                item=int(lengths.argmax()),
            )
        frames = self.n_frames
        if self.window == "batch":
            frames = min(self.n_frames, 2 * math.ceil(wavs.shape[1] / self.hop_length / 2))
        mels = self.log_mel(wavs, frames)  # (B, n_mels, frames)
        if frames == self.n_frames:
            hidden = self.encoder(mels).last_hidden_state  # (B, n_frames/2, D)
        else:
            hidden = self.windowed_forward(mels)  # (B, frames/2, D)
        out_time = hidden.shape[1]
        valid = torch.ceil(wav_lens * wavs.shape[1] / self.hop_length / 2).clamp(1, out_time)
        keep = int(valid.max().item())
        return hidden[:, :keep], valid / keep

    def windowed_forward(self, mels):
        """HF ``WhisperEncoder.forward`` on a window shorter than 30 s.

        The same layers in the same order, with the positional embeddings sliced
        to the window (HF's forward insists on the full 30 s).

        Arguments
        ---------
        mels : torch.Tensor
            ``(B, n_mels, frames)`` features, ``frames`` even.

        Returns
        -------
        torch.Tensor
            ``(B, frames / 2, D)``.
        """
        encoder = self.encoder
        embeds = nn.functional.gelu(encoder.conv1(mels))
        embeds = nn.functional.gelu(encoder.conv2(embeds)).permute(0, 2, 1)  # (B, T, D)
        hidden = embeds + encoder.embed_positions.weight[: embeds.shape[1]]
        hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
        for layer in encoder.layers:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return encoder.layer_norm(hidden)

    def log_mel(self, wavs, frames=None):
        """Whisper log-mel features of waveforms padded to the encoder window.

        Arguments
        ---------
        wavs : torch.Tensor
            ``(B, S)`` waveforms.
        frames : int or None
            Window in mel frames (None: the full 30 s window).

        Returns
        -------
        torch.Tensor
            ``(B, n_mels, n_frames)`` features on the device of ``wavs``.
        """
        frames = frames or self.n_frames
        n_samples = frames * self.hop_length
        with torch.autocast(wavs.device.type, enabled=False):  # mel matmul stays fp32
            padded = nn.functional.pad(wavs.float(), (0, n_samples - wavs.shape[1]))
            feats = whisper_log_mel(padded, self.feature_extractor)[..., :frames]
        return feats.to(next(self.encoder.parameters()).dtype)


def whisper_log_mel(wavs, feature_extractor):
    """Whisper's log-mel spectrogram, in torch on the device of ``wavs`` (fp32).

    The same computation as HF's ``WhisperFeatureExtractor`` (its batched torch
    path, without dither), kept on the device: HF's version takes a numpy
    array and returns one, a host round trip per batch, and it fails under
    bf16 autocast.

    Arguments
    ---------
    wavs : torch.Tensor
        ``(B, S)`` float32 waveforms at the extractor's sample rate.
    feature_extractor : transformers.WhisperFeatureExtractor
        Supplies ``n_fft``, ``hop_length`` and ``mel_filters``.

    Returns
    -------
    torch.Tensor
        ``(B, n_mels, S // hop_length)`` features.

    Example
    -------
    >>> from transformers import WhisperFeatureExtractor
    >>> extractor = WhisperFeatureExtractor(feature_size=20)
    >>> wavs = torch.randn(2, 16000)
    >>> ours = whisper_log_mel(wavs, extractor)
    >>> theirs = extractor._torch_extract_fbank_features(wavs.numpy())
    >>> ours.shape, bool(torch.allclose(ours, torch.from_numpy(theirs), atol=1e-5))
    (torch.Size([2, 20, 100]), True)
    """
    window = torch.hann_window(feature_extractor.n_fft, device=wavs.device)
    stft = torch.stft(
        wavs,
        feature_extractor.n_fft,
        feature_extractor.hop_length,
        window=window,
        return_complex=True,
    )
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (B, n_freq, frames)
    mel_filters = torch.as_tensor(feature_extractor.mel_filters, device=wavs.device).float()
    log_spec = torch.clamp(mel_filters.T @ power, min=1e-10).log10()  # (B, n_mels, frames)
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


class HFWav2Vec2Encoder(SpeechEncoder):
    """wav2vec2-family encoder (wav2vec2, HuBERT, WavLM, data2vec-audio) from HF.

    Arguments
    ---------
    source : str or None
        Local folder or hub id.
    config : transformers.PretrainedConfig or None
        Builds a randomly initialised model from this config instead.
    freeze : bool
        Whether the encoder is frozen.
    normalize : bool
        Normalise each waveform to zero mean, unit variance over its valid part.
    cache_dir : str or None
        HF cache folder.
    output_cache : EncoderOutputCache, str or None
        Cache of the frozen encoder's outputs (see ``SpeechEncoder``).

    Example
    -------
    >>> from transformers import WavLMConfig
    >>> cfg = WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...     intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8),
    ...     num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    >>> enc = HFWav2Vec2Encoder(config=cfg)
    >>> feats, lens = enc(torch.randn(2, 4000), torch.tensor([1.0, 0.5]))
    >>> feats.shape
    torch.Size([2, 198, 16])
    """

    def __init__(
        self,
        source=None,
        config=None,
        freeze=True,
        normalize=True,
        cache_dir=None,
        output_cache=None,
    ):
        super().__init__(freeze=freeze, output_cache=output_cache)
        from transformers import AutoModel

        if (source is None) == (config is None):
            raise ValueError("HFWav2Vec2Encoder: give exactly one of `source` or `config`.")
        if source is not None:
            self.model = AutoModel.from_pretrained(source, cache_dir=cache_dir)
        else:
            self.model = AutoModel.from_config(config)
        model_type = self.model.config.model_type
        if model_type not in WAV2VEC2_FAMILY:
            raise ValueError(
                f"HFWav2Vec2Encoder: model_type '{model_type}' of {source or 'config'} is "
                f"not in the wav2vec2 family {WAV2VEC2_FAMILY}; use HFWhisperEncoder "
                "for Whisper checkpoints."
            )
        if hasattr(self.model, "masked_spec_embed"):
            self.model.config.mask_time_prob = 0.0
        self.normalize = normalize
        self.output_size = self.model.config.hidden_size
        self.freeze_parameters()

    def encode(self, wavs, wav_lens):
        """See ``SpeechEncoder.forward``."""
        samples = wavs.shape[1]
        valid_samples = torch.round(wav_lens * samples).long()
        mask = torch.arange(samples, device=wavs.device)[None, :] < valid_samples[:, None]
        if self.normalize:
            wavs = normalize_waveforms(wavs, mask)
        dtype = next(self.model.parameters()).dtype
        hidden = self.model(wavs.to(dtype), attention_mask=mask.long()).last_hidden_state
        out_valid = self.model._get_feat_extract_output_lengths(valid_samples)
        return hidden, out_valid.clamp(min=1).float() / hidden.shape[1]


def normalize_waveforms(wavs, mask):
    """Zero-mean unit-variance normalisation over the valid samples of each row.

    Arguments
    ---------
    wavs : torch.Tensor
        ``(B, S)`` waveforms.
    mask : torch.Tensor
        ``(B, S)`` booleans, True on valid samples.

    Returns
    -------
    torch.Tensor
        ``(B, S)`` normalised waveforms, zeros on padding.

    Example
    -------
    >>> out = normalize_waveforms(torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[True, True, False]]))
    >>> out.abs().tolist()
    [[1.0, 1.0, 0.0]]
    """
    mask = mask.to(wavs.dtype)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (wavs * mask).sum(dim=1, keepdim=True) / count
    var = (((wavs - mean) * mask) ** 2).sum(dim=1, keepdim=True) / count
    return (wavs - mean) / torch.sqrt(var + 1e-7) * mask
