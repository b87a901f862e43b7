"""speechbrain-sllm: speech LLMs for SpeechBrain, and why they lose text ability.

Public API (import the submodules for the rest):

* model: ``SpeechLLM``, ``load_causal_lm``, encoders and adaptors;
* strategies: ``build_strategy``, ``apply_strategy``, ``LayerwiseLR``, ``LoRASettings``;
* training: ``SpeechLLMBrain`` (built from a recipe yaml), ``WarmupDecaySchedule``,
  ``AtomicCheckpointer``;
* importance: ``run_importance``, ``zeroing_check``, ``layer_shift``.
"""

# isort: off
from speechbrain_sllm.openmp import choose_openmp_waiting

OPENMP_WAITING = choose_openmp_waiting()  # before anything imports torch
# isort: on

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.checkpointing import AtomicCheckpointer
from speechbrain_sllm.importance.shift import layer_shift
from speechbrain_sllm.importance.stage import run_importance, zeroing_check
from speechbrain_sllm.model.adaptors import ConvDownsampler, FrameStackAdaptor
from speechbrain_sllm.model.encoders import HFWav2Vec2Encoder, HFWhisperEncoder
from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.schedules import WarmupDecaySchedule
from speechbrain_sllm.strategies import (
    LayerwiseLR,
    LoRASettings,
    apply_strategy,
    build_strategy,
)

__version__ = "0.1.0"
__all__ = [
    "AtomicCheckpointer",
    "ConvDownsampler",
    "FbankTransformerEncoder",
    "FrameStackAdaptor",
    "HFWav2Vec2Encoder",
    "HFWhisperEncoder",
    "LayerwiseLR",
    "LoRASettings",
    "SpeechLLM",
    "SpeechLLMBrain",
    "WarmupDecaySchedule",
    "apply_strategy",
    "build_strategy",
    "layer_shift",
    "load_causal_lm",
    "run_importance",
    "zeroing_check",
]
