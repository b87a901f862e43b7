"""Offline text-to-speech: eSpeak NG (PyPI ``espeakng-loader``) and Flite (Debian ``flite``).

Used to make real spoken questions for the studies and the tests: no
download, several voices and speaking rates for variety. eSpeak is always
there (a dependency); Flite's CMU voices, closer to human speech, when its
program is installed (``Synthesisers`` routes ``flite:<voice>`` names to it).

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
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import soundfile
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


class FliteTTS:
    """Synthesises speech with Flite's CMU voices (the Debian package ``flite``).

    Flite's ``slt`` (US female), ``rms`` (US male) and ``awb`` (Scottish male)
    are statistical parametric (clustergen) voices, ``kal16`` a diphone voice,
    all at 16 kHz: closer to human speech than eSpeak's formant synthesis, and
    deterministic (the same text and settings give the same samples).

    Arguments
    ---------
    sample_rate : int
        Output rate (Flite's voices speak at 16 kHz; others are resampled).
    executable : str
        The ``flite`` program.

    Example
    -------
    >>> FliteTTS.available() in (True, False)
    True
    """

    VOICES = ("slt", "rms", "awb", "kal16")
    DEFAULT_RATE = 175  # words per minute that Flite's duration_stretch 1.0 stands for

    def __init__(self, sample_rate=16000, executable="flite"):
        self.sample_rate = sample_rate
        self.executable = shutil.which(executable)
        if self.executable is None:
            raise FileNotFoundError(
                f"FliteTTS: no {executable!r} program on PATH; install Flite "
                "(Debian / Ubuntu: apt-get install flite) or use eSpeak voices."
            )

    @staticmethod
    def available(executable="flite"):
        """Whether the ``flite`` program is installed."""
        return shutil.which(executable) is not None

    def synthesize(self, text, voice="slt", rate=DEFAULT_RATE, pitch=50, seed=0):
        """Speaks ``text`` (``pitch`` and ``seed`` are accepted for eSpeak's signature).

        Arguments
        ---------
        text : str
            Text to speak.
        voice : str
            One of ``VOICES``.
        rate : int
            Words per minute (as ``duration_stretch = 175 / rate``).
        pitch : int
            Unused: Flite's clustergen voices ignore a target pitch.
        seed : int
            Unused: Flite is deterministic.

        Returns
        -------
        torch.Tensor
            ``(S,)`` float waveform in [-1, 1] at ``sample_rate``.
        """
        if voice not in self.VOICES:
            raise ValueError(f"FliteTTS: no voice {voice!r}; use one of {self.VOICES}.")
        stretch = self.DEFAULT_RATE / float(rate)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "out.wav")
            command = [self.executable, "-voice", voice, "--setf", f"duration_stretch={stretch}"]
            done = subprocess.run(
                command + ["-t", text, "-o", path], capture_output=True, text=True
            )
            if done.returncode != 0 or not os.path.isfile(path):
                raise RuntimeError(f"Flite failed on {text!r}: {done.stderr.strip()}")
            samples, native_rate = soundfile.read(path, dtype="float32")
        wav = torch.from_numpy(samples)
        if native_rate != self.sample_rate:
            wav = torchaudio.functional.resample(wav, native_rate, self.sample_rate)
        return wav


class Synthesisers:
    """Routes ``engine:voice`` names to their synthesiser (``flite:slt``; no prefix: eSpeak).

    Arguments
    ---------
    sample_rate : int
        Output rate of every engine.

    Example
    -------
    >>> tts = Synthesisers()
    >>> tts.split_voice("flite:rms"), tts.split_voice("en-us+f3")
    (('flite', 'rms'), ('espeak', 'en-us+f3'))
    """

    ENGINES = {"espeak": EspeakTTS, "flite": FliteTTS}

    def __init__(self, sample_rate=16000):
        self.sample_rate = sample_rate
        self.engines = {}

    @staticmethod
    def split_voice(voice):
        """``(engine, voice)`` of a voice name."""
        engine, _, name = voice.rpartition(":")
        return (engine or "espeak"), name

    def synthesize(self, text, voice="en-us", rate=175, pitch=50, seed=0):
        """Speaks ``text`` with the engine the voice names (see ``EspeakTTS.synthesize``)."""
        engine, name = self.split_voice(voice)
        if engine not in self.ENGINES:
            raise ValueError(
                f"voice {voice!r}: engine {engine!r} unknown; use {list(self.ENGINES)}."
            )
        if engine not in self.engines:
            self.engines[engine] = self.ENGINES[engine](sample_rate=self.sample_rate)
        return self.engines[engine].synthesize(text, voice=name, rate=rate, pitch=pitch, seed=seed)
