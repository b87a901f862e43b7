from pathlib import Path

import pytest
import torch
from conftest import HIDDEN, llama_config, tiny_speech_llm, tiny_whisper_config
from hyperpyyaml import load_hyperpyyaml
from transformers import WavLMConfig

from speechbrain_sllm.model.adaptors import ConvDownsampler, FrameStackAdaptor
from speechbrain_sllm.model.encoders import HFWav2Vec2Encoder, HFWhisperEncoder
from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder
from speechbrain_sllm.model.speech_llm import IGNORE_INDEX, SpeechLLM, load_causal_lm
from speechbrain_sllm.model.whisper_adaptors import WhisperQueryAdaptor


def test_splice_places_speech_between_prompt_parts_and_masks_labels(llm_config):
    torch.manual_seed(0)
    model = tiny_speech_llm(llm_config)
    speech = [torch.randn(4, HIDDEN), torch.randn(2, HIDDEN)]
    prefixes, suffixes, answers = [[5, 6], [5, 6]], [[7], [7]], [[8, 9, 3], [10, 3]]
    batch = model.build_batch(prefixes, speech, suffixes, answers)
    assert batch["inputs_embeds"].shape == (2, 10, HIDDEN)
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 7 + [0] * 3]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 7 + [8, 9, 3]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 5 + [10, 3] + [IGNORE_INDEX] * 3
    # speech frames land right after the prefix, token embeddings around them
    assert torch.equal(batch["inputs_embeds"][1, 2:4], speech[1])
    embed = model.llm.get_input_embeddings()
    assert torch.equal(batch["inputs_embeds"][0, :2], embed(torch.tensor([5, 6])))
    assert torch.equal(batch["inputs_embeds"][1, 4], embed(torch.tensor(7)))


def test_padding_does_not_change_the_loss_of_an_item(llm_config):
    model = tiny_speech_llm(llm_config).eval()
    speech = [torch.randn(5, HIDDEN), torch.randn(3, HIDDEN)]
    alone = model.loss(model.build_batch([[5]], speech[1:], [[7]], [[8, 3]]), "none")
    batched = model.loss(
        model.build_batch([[5, 6], [5]], speech, [[7], [7]], [[9, 9, 9, 3], [8, 3]]), "none"
    )
    assert torch.allclose(alone[0], batched[1], atol=1e-5)


def test_fbank_encoder_ignores_padding_when_normalising():
    torch.manual_seed(0)
    encoder = FbankTransformerEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, freeze=True)
    wav = torch.randn(1, 8000)
    alone, _ = encoder(wav, torch.ones(1))
    padded, lens = encoder(torch.cat([wav, torch.zeros(1, 8000)], 1), torch.tensor([0.5]))
    valid = alone.shape[1]
    assert lens.item() == pytest.approx(valid / padded.shape[1], abs=0.03)
    # frames away from the end see identical inputs
    assert torch.allclose(alone[:, : valid - 3], padded[:, : valid - 3], atol=1e-4)


def test_batched_left_padded_generation_matches_one_by_one():
    torch.manual_seed(0)
    model = SpeechLLM(load_causal_lm(config=llama_config())).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    for beams in (1, 3):
        batched = model.generate(
            model.build_batch(prompts, padding_side="left"), 6, beams, eos_id=3
        )
        single = [
            model.generate(model.build_batch([p], padding_side="left"), 6, beams, eos_id=3)[0]
            for p in prompts
        ]
        assert batched == single


def test_text_path_equals_plain_llm_on_the_same_tokens():
    torch.manual_seed(0)
    llm = load_causal_lm(config=llama_config())
    model = SpeechLLM(llm).eval()
    logits, labels = model([[5, 6, 7]], [[8, 3]])
    reference = llm(input_ids=torch.tensor([[5, 6, 7, 8, 3]])).logits
    assert torch.allclose(logits, reference, atol=1e-5)
    assert labels.tolist() == [[IGNORE_INDEX] * 3 + [8, 3]]


def test_whisper_and_wavlm_encoders_feed_the_llm():
    whisper = HFWhisperEncoder(config=tiny_whisper_config())
    wavlm = HFWav2Vec2Encoder(
        config=WavLMConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(8, 8),
            conv_stride=(5, 4),
            conv_kernel=(10, 8),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
        )
    )
    for encoder, adaptor in (
        (whisper, FrameStackAdaptor(16, HIDDEN, 5, 32)),
        (wavlm, ConvDownsampler(16, HIDDEN, 2, 2, 16)),
    ):
        model = SpeechLLM(load_causal_lm(config=llama_config()), encoder, adaptor)
        speech = model.speech_embeddings(torch.randn(2, 8000), torch.tensor([1.0, 0.5]))
        assert speech[0].shape[1] == HIDDEN and speech[1].shape[0] < speech[0].shape[0]
        assert not any(p.requires_grad for p in encoder.parameters())


def test_whisper_query_adaptor_is_the_checkpoints_decoder_read_by_learned_queries(tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    whisper = WhisperModel(tiny_whisper_config())
    whisper.save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor(feature_size=20).save_pretrained(tmp_path / "whisper")
    adaptor = WhisperQueryAdaptor(HIDDEN, source=str(tmp_path / "whisper"), num_queries=5)
    tokens = torch.tensor([[whisper.config.decoder_start_token_id, 7, 8, 9, 10]])
    frames = torch.randn(1, 12, 16)
    # queries set to these tokens' embeddings: the decoder's hidden states on the tokens
    with torch.no_grad():
        adaptor.queries.copy_(whisper.decoder.embed_tokens(tokens)[0])
        hidden = adaptor.decoder(
            inputs_embeds=adaptor.queries[None], encoder_hidden_states=frames
        ).last_hidden_state
        reference = whisper.decoder(input_ids=tokens, encoder_hidden_states=frames)
    assert torch.allclose(hidden, reference.last_hidden_state, atol=1e-6)
    # the start-of-transcript embedding at every query; no token table kept
    fresh = WhisperQueryAdaptor(HIDDEN, source=str(tmp_path / "whisper"), num_queries=5)
    start = whisper.decoder.embed_tokens.weight[whisper.config.decoder_start_token_id]
    assert torch.equal(fresh.queries, start.expand(5, -1))
    assert not any("embed_tokens" in name for name, _ in fresh.named_parameters())
    batch = torch.randn(3, 12, 16)
    embeds, lengths = fresh(batch, torch.tensor([1.0, 0.5, 0.5]))
    assert embeds.shape == (3, 5, HIDDEN) and torch.equal(lengths, torch.ones(3))
    alone, _ = fresh(batch[1:2, :6], torch.ones(1))  # padding is never read
    assert torch.allclose(embeds[1], alone[0], atol=1e-6)
    assert not torch.allclose(embeds[1], fresh(batch[1:2], torch.ones(1))[0][0], atol=1e-3)
    embeds.sum().backward()  # the queries and the decoder train
    assert fresh.queries.grad.abs().sum() > 0
    assert fresh.decoder.layers[0].encoder_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_queries must be in"):
        WhisperQueryAdaptor(HIDDEN, source=str(tmp_path / "whisper"), num_queries=10_000)
    fragment = Path(__file__).parents[1] / "hparams" / "adaptors" / "whisper_query.yaml"
    recipe = f"adaptor: !include:{fragment}\n    output_size: {HIDDEN}\n"
    recipe += f"    source: {tmp_path / 'whisper'}\n"
    built = load_hyperpyyaml(recipe)["adaptor"]
    assert built.queries.shape == (64, 16) and torch.equal(built.queries[0], start)
    encoder = HFWhisperEncoder(source=str(tmp_path / "whisper"))  # its frames feed the LLM
    model = SpeechLLM(load_causal_lm(config=llama_config()), encoder, fresh)
    speech = model.speech_embeddings(torch.randn(2, 8000), torch.tensor([1.0, 0.5]))
    assert [item.shape for item in speech] == [(5, HIDDEN), (5, HIDDEN)]


def test_whisper_rejects_audio_longer_than_its_window():
    whisper = HFWhisperEncoder(config=tiny_whisper_config())
    with pytest.raises(ValueError, match="exceeds the encoder window"):
        whisper(torch.randn(1, 20000), torch.ones(1))


def test_cached_encoder_outputs_equal_encoding_each_item_alone(tmp_path):
    from speechbrain_sllm.model.encoder_caches import EncoderOutputCache
    from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder

    torch.manual_seed(0)
    encoder = FbankTransformerEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, freeze=True)
    wavs, lens = torch.randn(3, 12000), torch.tensor([1.0, 0.6, 0.3])
    encoder.output_cache = EncoderOutputCache(str(tmp_path / "cache"))
    cached, cached_lens = encoder(wavs, lens)
    for b, length in enumerate(lens):
        alone, _ = encoder.encode(
            wavs[b : b + 1, : int(round(length.item() * 12000))], torch.ones(1)
        )
        frames = int(round(cached_lens[b].item() * cached.shape[1]))
        assert frames == alone.shape[1]
        assert torch.equal(cached[b, :frames], alone[0])
        assert not cached[b, frames:].any()  # padding
    # a new process (a fresh cache on the same folder) reads the entries back from disk
    fresh = FbankTransformerEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, freeze=True)
    fresh.load_state_dict(encoder.state_dict())
    fresh.output_cache = EncoderOutputCache(str(tmp_path / "cache"))
    fresh.encode = None  # any recomputation would fail
    again, again_lens = fresh(wavs, lens)
    assert torch.equal(again, cached) and torch.equal(again_lens, cached_lens)
    # other weights: other keys, nothing reused
    other = FbankTransformerEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, freeze=True)
    other.output_cache = fresh.output_cache
    assert not torch.equal(other(wavs, lens)[0], cached)


def test_whisper_batch_window_runs_the_same_layers_as_hf_on_the_full_window():
    from conftest import tiny_whisper_config

    from speechbrain_sllm.model.encoders import HFWhisperEncoder

    torch.manual_seed(0)
    encoder = HFWhisperEncoder(config=tiny_whisper_config(max_source_positions=50), window="batch")
    mels = torch.randn(2, 20, 100)  # the full 1 s window of this tiny config
    with torch.no_grad():
        ours = encoder.windowed_forward(mels)
        theirs = encoder.encoder(mels).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-6)
    feats, lengths = encoder(torch.randn(2, 4000), torch.tensor([1.0, 0.5]))
    assert feats.shape == (2, 13, 16) and torch.allclose(lengths, torch.tensor([1.0, 7 / 13]))


def test_fbank_feature_cache_gives_the_uncached_outputs_and_gradients():
    from speechbrain_sllm.model.fbank_encoder import FbankTransformerEncoder

    torch.manual_seed(0)
    settings = {"n_mels": 20, "d_model": 16, "num_layers": 1, "nhead": 2, "dropout": 0.0}
    plain = FbankTransformerEncoder(**settings)
    cached = FbankTransformerEncoder(**settings, cache_features=True)
    cached.load_state_dict(plain.state_dict())
    wavs, lens = torch.randn(3, 12000), torch.tensor([1.0, 0.61, 0.3])
    for wav, length in zip(wavs, lens):
        wav[int(round(length.item() * 12000)) :] = 0.0  # padded as in a PaddedBatch
    for _ in range(2):  # second pass: every item from the cache
        ours, our_lens = cached(wavs, lens)
        theirs, their_lens = plain(wavs, lens)
        assert torch.equal(our_lens, their_lens)
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert len(cached.feature_cache.memory) == 3
    ours.sum().backward()  # the encoder still trains on cached features
    assert cached.subsample[0].weight.grad is not None


def test_transcript_adaptor_ends_a_transcript_at_its_end_or_where_it_starts_over():
    from conftest import tiny_whisper_decoder_config

    from speechbrain_sllm.model.whisper_adaptors import WhisperTranscriptAdaptor

    config = tiny_whisper_decoder_config(max_target_positions=20)
    adaptor = WhisperTranscriptAdaptor(HIDDEN, config=config, restart_ngram=2)
    decoding = adaptor.decoding
    assert decoding.transcript_end([5, 6, 7, 2]) == 3
    assert decoding.transcript_end([5, 6, 7, 5, 6]) == 3  # started over: cut there
    assert decoding.transcript_end([5, 6, 7, 6, 5]) is None
    assert decoding.transcript_end([5, 6, 5]) is None  # too short to have started over
    assert decoding.transcript_end([5, 9, 9, 9]) == 2  # a one-token loop keeps one
    assert decoding.transcript_end([5, 6, 7, 8, 7, 8, 7, 8]) == 4  # "called, called, called,"
    assert decoding.transcript_end([5, 6, 7, 8, 7, 8]) is None  # twice may be speech
    decoding.token_keys = {5: "what", 8: "what"}  # " What" and "what" read alike
    assert decoding.transcript_end([5, 6, 7, 8, 6]) == 3
    assert decoding.prompt == [1] and decoding.max_tokens == 19
