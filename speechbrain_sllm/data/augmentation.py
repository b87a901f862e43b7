"""SpeechBrain's augmentation applied to synthesised training clips, once and seeded.

A frozen encoder's outputs are cached per clip, so augmentation is applied when
the clips are written (not per step): each augmented rendering is a file of its
own, reproducible from the seed and the clip's number alone. The chain is
SpeechBrain's own: speed perturbation (``speechbrain.augment.SpeedPerturb``),
reverberation (``reverberate``, the function ``AddReverb`` applies) with a
synthetic room impulse response per clip, and white noise (``AddNoise``).

Authors
 * speechbrain-sllm developers 2026
"""

import math

import torch
from speechbrain.augment.time_domain import AddNoise, SpeedPerturb
from speechbrain.processing.signal_processing import reverberate

RT60_RANGE = (0.2, 0.6)  # seconds
DRR_RANGE = (0.0, 10.0)  # direct-to-reverberant energy ratio, dB (a talker near the mic)


def synthetic_rir(sample_rate=16000, generator=None):
    """A synthetic room impulse response: a direct path, then decaying Gaussian noise.

    The decay reaches -60 dB at an RT60 drawn in ``RT60_RANGE``; the tail is
    scaled so that the direct-to-reverberant energy ratio is drawn in
    ``DRR_RANGE``.

    Arguments
    ---------
    sample_rate : int
        Its rate.
    generator : torch.Generator or None
        The draws' generator (None: the global one).

    Returns
    -------
    torch.Tensor
        ``(1, L, 1)``, as ``reverberate`` takes it.

    Example
    -------
    >>> rir = synthetic_rir(generator=torch.Generator().manual_seed(0))
    >>> rir.shape[0], rir[0, 0, 0].item(), 0.2 * 16000 <= rir.shape[1] <= 0.6 * 16000
    (1, 1.0, True)
    """
    rt60, drr = (low + (high - low) * torch.rand(1, generator=generator).item()
                 for low, high in (RT60_RANGE, DRR_RANGE))  # fmt: skip
    length = int(rt60 * sample_rate)
    time = torch.arange(length) / sample_rate
    decay = torch.exp(-3 * math.log(10) * time / rt60)  # -60 dB at rt60
    tail_gain = math.sqrt(10 ** (-drr / 10) / decay.pow(2).sum().item())
    rir = torch.randn(length, generator=generator) * decay * tail_gain
    rir[0] = 1.0
    return rir[None, :, None]


class RenderingAugmenter:
    """Speed perturbation, reverberation and noise from ``speechbrain.augment``, seeded per clip.

    Arguments
    ---------
    sample_rate : int
        The clips' rate.
    speeds : list of int
        Speed factors in percent (one drawn per clip).
    snr_range : tuple of float
        White noise SNR in dB (drawn per clip).
    reverb_probability : float
        Share of clips reverberated (each with its own ``synthetic_rir``).
    seed : int
        Seed of every clip's draws.

    Example
    -------
    >>> augment = RenderingAugmenter()
    >>> wav = torch.sin(torch.arange(16000) / 5.0)
    >>> out = augment(wav, index=3)
    >>> out.dim(), torch.equal(out, augment(wav, index=3))
    (1, True)
    """

    def __init__(
        self,
        sample_rate=16000,
        speeds=(90, 95, 105, 110),
        snr_range=(15.0, 35.0),
        reverb_probability=0.5,
        seed=0,
    ):
        self.seed = seed
        self.sample_rate = sample_rate
        self.reverb_probability = reverb_probability
        self.speed = SpeedPerturb(sample_rate, speeds=list(speeds))
        self.noise = AddNoise(snr_low=snr_range[0], snr_high=snr_range[1])

    @torch.no_grad()
    def __call__(self, wav, index):
        """The augmented clip (its length changes with the speed drawn).

        Arguments
        ---------
        wav : torch.Tensor
            ``(S,)`` waveform.
        index : int
            The clip's number: with ``seed`` it fixes every draw, and the global
            random state is left as it was.

        Returns
        -------
        torch.Tensor
            ``(S',)`` waveform, peak at most 1.
        """
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 1_000_003 + index)
            batch = self.speed(wav[None])
            if torch.rand(1).item() < self.reverb_probability:
                rir = synthetic_rir(self.sample_rate)
                batch = reverberate(batch[..., None], rir, rescale_amp="avg")[..., 0]
            batch = self.noise(batch, torch.ones(1))
        out = batch[0]
        peak = out.abs().max()
        return out / peak if peak > 1 else out
