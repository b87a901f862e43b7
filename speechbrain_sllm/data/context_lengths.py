"""Every item of a dataset that would not fit the LLM's context, found before any step.

A sequence is ``prompt [speech] [suffix] answer``; one that is longer than the
LLM's ``max_position_embeddings`` fails in the forward pass, one item per run.
``check_context_lengths`` measures every item before training or testing and
names all of the items that are too long at once: text lengths by tokenizing;
speech lengths bounded first (the encoder and adaptor on silence of the longest
clip, whose output length depends on the duration alone; a transcript adaptor's
decoding budget), then measured exactly on the audio of each remaining candidate.

Authors
 * speechbrain-sllm developers 2026
"""

import soundfile
import torch

from speechbrain_sllm.data.dataio import load_audio

SHOWN_ITEMS = 20


class ItemsTooLongError(ValueError):
    """Items whose sequence is longer than the LLM's context, all of them named."""


def item_duration(item):
    """An item's duration in seconds: the manifest's ``duration``, else the file's header.

    Arguments
    ---------
    item : dict
        A manifest item (``wav``, optionally ``duration``).

    Returns
    -------
    float
    """
    if item.get("duration") not in (None, ""):
        return float(item["duration"])
    info = soundfile.info(item["wav"])
    return info.frames / info.samplerate


def text_positions(dataset, prompt, mode):
    """Each item's positions other than the speech: prompt, suffix and answer.

    Arguments
    ---------
    dataset : DynamicItemDataset
        Items with ``question`` and ``answer``.
    prompt : ChatPrompt
        The prompt builder.
    mode : str
        ``speech`` (the spoken-question prompt) or ``text`` (the written question).

    Returns
    -------
    dict
        ``{item id: positions}``.
    """
    prefix, suffix = prompt.speech_prompt()
    lengths = {}
    for data_id in dataset.data_ids:
        item = dataset.data[data_id]
        answer = len(prompt.answer_ids(str(item["answer"])))
        if mode == "text":
            lengths[data_id] = len(prompt.text_prompt(str(item["question"]))) + answer
        else:
            lengths[data_id] = len(prefix) + len(suffix) + answer
    return lengths


@torch.no_grad()
def speech_positions(model, wav):
    """The number of LLM positions the encoder and adaptor give one clip.

    Arguments
    ---------
    model : SpeechLLM
        The model.
    wav : torch.Tensor
        ``(S,)`` waveform.

    Returns
    -------
    int
    """
    wav = wav.to(model.device)[None]
    return int(model.speech_embeddings(wav, torch.ones(1, device=model.device))[0].shape[0])


def speech_upper_bound(model, seconds, sample_rate):
    """The most LLM positions any clip of at most ``seconds`` can take.

    A transcript adaptor gives as many positions as the tokens it decodes (at most
    its decoding budget times ``upsample``); any other adaptor's output length
    depends on the clip's duration alone, measured on silence of that duration.

    Arguments
    ---------
    model : SpeechLLM
        The model.
    seconds : float
        The longest clip's duration.
    sample_rate : int
        The encoder's audio rate.

    Returns
    -------
    int
    """
    decoding = getattr(model.adaptor, "decoding", None)
    if decoding is not None:
        return decoding.max_tokens * getattr(model.adaptor, "upsample", 1)
    samples = max(int(round(seconds * sample_rate)), 1)
    return speech_positions(model, torch.zeros(samples))


def items_over_context(model, dataset, prompt, mode, sample_rate=16000):
    """``{item id: positions}`` of the items longer than the LLM's context.

    Arguments
    ---------
    model : SpeechLLM
        The model (``llm.config.max_position_embeddings``; encoder and adaptor).
    dataset : DynamicItemDataset
        Items with ``question``, ``answer`` and (spoken) ``wav`` / ``duration``.
    prompt : ChatPrompt
        The prompt builder.
    mode : str
        ``speech`` or ``text``.
    sample_rate : int
        The encoder's audio rate.

    Returns
    -------
    dict
    """
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit is None or len(dataset) == 0:
        return {}
    lengths = text_positions(dataset, prompt, mode)
    if mode == "speech" and "wav" in dataset.data[dataset.data_ids[0]]:
        longest = max(item_duration(dataset.data[data_id]) for data_id in lengths)
        bound = speech_upper_bound(model, longest, sample_rate)
        for data_id in [i for i in lengths if lengths[i] + bound > limit]:
            wav = load_audio(dataset.data[data_id]["wav"], sample_rate)
            lengths[data_id] += speech_positions(model, wav)
    return {data_id: length for data_id, length in lengths.items() if length > limit}


def check_context_lengths(model, dataset, prompt, mode, name, sample_rate=16000):
    """Raises ``ItemsTooLongError`` naming every item longer than the LLM's context.

    Arguments
    ---------
    model : SpeechLLM
        The model.
    dataset : DynamicItemDataset
        The set about to be trained on or scored.
    prompt : ChatPrompt
        The prompt builder.
    mode : str
        ``speech`` or ``text``.
    name : str
        The set's name in the message.
    sample_rate : int
        The encoder's audio rate.
    """
    over = items_over_context(model, dataset, prompt, mode, sample_rate)
    if not over:
        return
    limit = model.llm.config.max_position_embeddings
    shown = ", ".join(f"{item} ({length})" for item, length in sorted(over.items())[:SHOWN_ITEMS])
    more = f" and {len(over) - SHOWN_ITEMS} more" if len(over) > SHOWN_ITEMS else ""
    fix = (
        "lower `max_duration` or downsample speech more (adaptor stack / stride)"
        if mode == "speech"
        else "shorten those questions or answers"
    )
    raise ItemsTooLongError(
        f"{name}: {len(over)} item(s) take more positions than the LLM context of {limit}: "
        f"{shown}{more}. Remove them from the manifest, or {fix}."
    )
