"""Offline text-to-speech with eSpeak NG (from the PyPI package ``espeakng-loader``).

Used to make real spoken questions for the embedded study and the tests: no
download, several voices and speaking rates for variety.

Deterministic: voices with breath noise (e.g. ``+f2``, ``+f3``) draw from
eSpeak NG's random generator, which is re-seeded before every utterance, so
the same sequence of calls gives the same samples in every process. eSpeak
keeps some state from one utterance to the next (the same sentence after
another one differs by a few samples), so a preparation that speaks its items
in a fixed order is reproducible; one utterance alone is not the same as in
the middle of a sequence.

Authors
 * speechbrain-sllm developers 2026
"""

import ctypes
import os
import threading

import numpy as np
import torch
import torchaudio

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_RATE = 1
ESPEAK_PITCH = 3
CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakTTS:
    """Synthesises speech with eSpeak NG through its C API (one engine per process).

    Arguments
    ---------
    sample_rate : int
        Output rate; eSpeak's native 22.05 kHz is resampled to it.

    Example
    -------
    >>> tts = EspeakTTS()
    >>> wav = tts.synthesize("hello world", voice="en-us", rate=170)
    >>> wav.dtype, wav.dim(), 0.3 < wav.shape[0] / 16000 < 3.0
    (torch.float32, 1, True)
    """

    _lock = threading.Lock()
    _lib = None
    _native_rate = None
    _chunks = []

    def __init__(self, sample_rate=16000):
        self.sample_rate = sample_rate
        self._ensure_engine()

    @classmethod
    def _ensure_engine(cls):
        if cls._lib is not None:
            return
        try:
            import espeakng_loader
        except ImportError as error:
            raise ImportError(
                "EspeakTTS needs the PyPI package espeakng-loader (pip install espeakng-loader)."
            ) from error
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_parent = os.path.dirname(espeakng_loader.get_data_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent.encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise with data in {data_parent!r}.")

        def collect(samples, count, events):
            """eSpeak's synthesis callback: keeps a copy of each chunk of samples."""
            if count > 0:
                cls._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
            return 0

        cls._callback = CALLBACK(collect)  # keep a reference for the C side
        lib.espeak_SetSynthCallback(cls._callback)
        cls._lib, cls._native_rate = lib, rate

    def synthesize(self, text, voice="en-us", rate=175, pitch=50, seed=0):
        """Speaks ``text``.

        Arguments
        ---------
        text : str
            Text to speak.
        voice : str
            eSpeak voice name, e.g. ``en-us``, ``en-us+f3``, ``en-us+klatt``.
        rate : int
            Words per minute.
        pitch : int
            Base pitch, 0-100.
        seed : int
            Seed of eSpeak NG's noise generator for this utterance.

        Returns
        -------
        torch.Tensor
            ``(S,)`` float waveform in [-1, 1] at ``sample_rate``.
        """
        lib = self._lib
        with self._lock:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"eSpeak NG has no voice {voice!r}; try 'en-us' or 'en-us+f3'.")
            lib.espeak_SetParameter(ESPEAK_RATE, int(rate), 0)
            lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
            lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
            type(self)._chunks = []
            data = text.encode("utf-8") + b"\0"
            lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None)
            lib.espeak_Synchronize()
            chunks = type(self)._chunks
        if not chunks:
            raise RuntimeError(f"eSpeak NG produced no audio for {text!r}.")
        wav = torch.from_numpy(np.concatenate(chunks).astype(np.float32) / 32768.0)
        if self._native_rate != self.sample_rate:
            wav = torchaudio.functional.resample(wav, self._native_rate, self.sample_rate)
        return wav
