"""Converters of pretrained checkpoints in other formats into Hugging Face folders.

Some real pretrained models reach a machine without the hub only in other
formats (a GGUF LLM, a CTranslate2 Whisper). These functions turn them into
plain HF folders (``save_pretrained``) that every loader of the package takes
as a local ``source``.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import os
import re
import struct

import numpy
import torch

# CTranslate2 variable dtypes (its ``DataType`` enum)
CT2_DTYPES = {0: numpy.float32, 1: numpy.int8, 2: numpy.int16, 3: numpy.int32, 4: numpy.float16}


def gguf_causal_lm_to_hf(gguf_file, output_folder):
    """Dequantises a GGUF causal LM (Llama family) into a plain HF folder.

    transformers loads GGUF files (with the ``gguf`` package) but refuses to
    ``save_pretrained`` such a model; the weights are moved into a model built
    from the same config without its quantisation record, which saves normally.

    Arguments
    ---------
    gguf_file : str
        The ``.gguf`` file.
    output_folder : str
        Where the model and its tokenizer (with the chat template) are saved.

    Returns
    -------
    str
        ``output_folder``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_file))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf_file}: weights do not match: {missing[:5]}, {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(output_folder)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(output_folder)
    return output_folder


def read_ctranslate2_variables(model_bin):
    """The variables of a CTranslate2 ``model.bin`` as numpy arrays, by name.

    The file holds a version, the spec name and revision, then for each
    variable its name, rank, dims, dtype and bytes.

    Arguments
    ---------
    model_bin : str
        The ``model.bin`` file.

    Returns
    -------
    spec : str
        The model spec name (e.g. ``WhisperSpec``).
    variables : dict
        ``{name: numpy.ndarray}``.
    """

    def read(fmt, handle):
        """Unpacks ``struct`` format ``fmt`` from the file."""
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, handle.read(size))

    def read_string(handle):
        """A length-prefixed, NUL-terminated string."""
        (length,) = read("<H", handle)
        return handle.read(length).rstrip(b"\0").decode()

    variables = {}
    with open(model_bin, "rb") as handle:
        (version,) = read("<I", handle)
        if version < 5:
            raise ValueError(f"{model_bin}: CTranslate2 binary version {version} is not supported.")
        spec = read_string(handle)
        read("<I", handle)  # spec revision
        (count,) = read("<I", handle)
        for _ in range(count):
            name = read_string(handle)
            (rank,) = read("<B", handle)
            dims = read(f"<{rank}I", handle)
            (dtype,) = read("<B", handle)
            (size,) = read("<I", handle)
            if dtype not in CT2_DTYPES:
                raise ValueError(f"{model_bin}: variable {name} has unsupported dtype id {dtype}.")
            data = numpy.frombuffer(handle.read(size), dtype=CT2_DTYPES[dtype])
            variables[name] = data.reshape(dims)
    return spec, variables


def ctranslate2_whisper_to_hf(model_dir, output_folder):
    """Converts a CTranslate2 Whisper (``model.bin``, ``tokenizer.json``) into an HF folder.

    CTranslate2 fuses the self-attention q/k/v projections (and the
    cross-attention k/v) into one matrix; HF keeps them apart, and its k
    projections have no bias.

    Arguments
    ---------
    model_dir : str
        Folder with ``model.bin`` and ``tokenizer.json``.
    output_folder : str
        Where ``WhisperForConditionalGeneration``, its feature extractor and
        tokenizer are saved.

    Returns
    -------
    str
        ``output_folder``.
    """
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    spec, ct2 = read_ctranslate2_variables(os.path.join(model_dir, "model.bin"))
    if spec != "WhisperSpec":
        raise ValueError(f"{model_dir}: a {spec}, not a Whisper model.")
    vocab, width = ct2["decoder/embeddings/weight"].shape
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=width,
        encoder_layers=count_layers(ct2, "encoder"),
        decoder_layers=count_layers(ct2, "decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        **whisper_special_tokens(os.path.join(model_dir, "tokenizer.json")),
    )
    model = WhisperForConditionalGeneration(config)
    state = whisper_state_dict(ct2, config)
    missing, unexpected = model.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: unmapped weights {missing[:5]} {unexpected[:5]}")
    model.tie_weights()  # proj_out shares the token embeddings
    model.save_pretrained(output_folder)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(output_folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    tokenizer.save_pretrained(output_folder)
    return output_folder


def count_layers(ct2, stack):
    """Number of ``<stack>/layer_<i>`` blocks."""
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    return len({match.group(1) for match in map(pattern.match, ct2) if match})


def whisper_special_tokens(tokenizer_json):
    """Start / end token ids of a Whisper tokenizer (``<|startoftranscript|>``, ``<|endoftext|>``)."""
    with open(tokenizer_json) as handle:
        added = {token["content"]: token["id"] for token in json.load(handle)["added_tokens"]}
    end = added["<|endoftext|>"]
    return {
        "decoder_start_token_id": added["<|startoftranscript|>"],
        "eos_token_id": end,
        "bos_token_id": end,
        "pad_token_id": end,
    }


def whisper_state_dict(ct2, config):
    """HF ``WhisperModel`` tensors from CTranslate2 variables (q/k/v split, k without bias)."""

    def tensor(name):
        """A CTranslate2 variable as a float32 tensor."""
        return torch.from_numpy(ct2[name].astype(numpy.float32))

    state = {}

    def linear(hf, name, with_bias=True):
        """Copies a linear layer (weight, optional bias)."""
        state[f"{hf}.weight"] = tensor(f"{name}/weight")
        if with_bias:
            state[f"{hf}.bias"] = tensor(f"{name}/bias")

    def norm(hf, name):
        """Copies a layer norm (CTranslate2 gamma/beta)."""
        state[f"{hf}.weight"] = tensor(f"{name}/gamma")
        state[f"{hf}.bias"] = tensor(f"{name}/beta")

    def split(hf_prefix, name, parts):
        """Splits a fused projection into HF's separate q/k/v (k has no bias)."""
        weights = tensor(f"{name}/weight").chunk(len(parts))  # (P*D, D) -> P x (D, D)
        biases = tensor(f"{name}/bias").chunk(len(parts))
        for part, weight, bias in zip(parts, weights, biases):
            state[f"{hf_prefix}.{part}_proj.weight"] = weight
            if part != "k":
                state[f"{hf_prefix}.{part}_proj.bias"] = bias

    def block(hf, name, cross):
        """Copies one encoder (or, with ``cross``, decoder) layer."""
        split(f"{hf}.self_attn", f"{name}/self_attention/linear_0", ("q", "k", "v"))
        linear(f"{hf}.self_attn.out_proj", f"{name}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{name}/self_attention/layer_norm")
        if cross:
            linear(f"{hf}.encoder_attn.q_proj", f"{name}/attention/linear_0")
            split(f"{hf}.encoder_attn", f"{name}/attention/linear_1", ("k", "v"))
            linear(f"{hf}.encoder_attn.out_proj", f"{name}/attention/linear_2")
            norm(f"{hf}.encoder_attn_layer_norm", f"{name}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{name}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{name}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{name}/ffn/layer_norm")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    state["encoder.embed_positions.weight"] = tensor("encoder/position_encodings/encodings")
    norm("encoder.layer_norm", "encoder/layer_norm")
    for index in range(config.encoder_layers):
        block(f"encoder.layers.{index}", f"encoder/layer_{index}", cross=False)
    state["decoder.embed_tokens.weight"] = tensor("decoder/embeddings/weight")
    state["decoder.embed_positions.weight"] = tensor("decoder/position_encodings/encodings")
    norm("decoder.layer_norm", "decoder/layer_norm")
    for index in range(config.decoder_layers):
        block(f"decoder.layers.{index}", f"decoder/layer_{index}", cross=True)
    return state
