"""speechbrain-sllm: speech LLMs for SpeechBrain, and why they lose text ability.

Public API (import the submodules for the rest):

* model: ``SpeechLLM``, ``load_causal_lm``, encoders and adaptors;
* strategies: ``build_strategy``, ``apply_strategy``, ``LayerwiseLR``, ``LoRASettings``;
* training: ``SpeechLLMBrain``, ``make_speech_llm_brain``;
* importance: ``run_importance``, ``zeroing_check``, ``layer_shift``.
"""

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.experiment import fit_and_restore_best, make_speech_llm_brain
from speechbrain_sllm.importance.shift import layer_shift
from speechbrain_sllm.importance.stage import run_importance, zeroing_check
from speechbrain_sllm.model.adaptors import ConvDownsampler, FrameStackAdaptor
from speechbrain_sllm.model.encoders import (
    FbankTransformerEncoder,
    HFWav2Vec2Encoder,
    HFWhisperEncoder,
)
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm
from speechbrain_sllm.strategies import (
    LayerwiseLR,
    LoRASettings,
    apply_strategy,
    build_strategy,
)

__version__ = "0.1.0"
__all__ = [
    "ConvDownsampler",
    "FbankTransformerEncoder",
    "FrameStackAdaptor",
    "HFWav2Vec2Encoder",
    "HFWhisperEncoder",
    "LayerwiseLR",
    "LoRASettings",
    "SpeechLLM",
    "SpeechLLMBrain",
    "apply_strategy",
    "build_strategy",
    "fit_and_restore_best",
    "layer_shift",
    "load_causal_lm",
    "make_speech_llm_brain",
    "run_importance",
    "zeroing_check",
]
