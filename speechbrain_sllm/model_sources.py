"""A model given as a local folder or a hub id: which it is, and whether the folder loads.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def looks_like_a_path(source):
    """Whether a model ``source`` is meant as a local folder rather than a hub id.

    Arguments
    ---------
    source : str
        A ``*_source`` value.

    Returns
    -------
    bool

    Example
    -------
    >>> looks_like_a_path("meta-llama/Llama-3.2-1B"), looks_like_a_path("./models/llama")
    (False, True)
    """
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or "\\" in source


def check_model_folder(key, folder):
    """Names the missing or unreadable files of a local model folder, before loading it.

    Arguments
    ---------
    key : str
        The yaml key (``llm_source`` needs tokenizer files too).
    folder : str
        The local folder.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"`{key}`: {os.path.join(folder, 'config.json')} not found. Point --{key} at a "
            "saved model folder (save_pretrained writes config.json and the weights)."
        )
    if key == "llm_source" and not any(
        os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"`llm_source`: {folder!r} has no tokenizer files (one of {list(TOKENIZER_FILES)}). "
            "Save the tokenizer into the folder (tokenizer.save_pretrained(folder))."
        )
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, name))
            if problem:
                raise ValueError(
                    f"`{key}`: weight file {os.path.join(folder, name)} is unreadable "
                    f"({problem}). Copy or download it again."
                )


def safetensors_problem(path):
    """Why a ``.safetensors`` file cannot be loaded (truncated, bad header), or None.

    Reads only the header: its length, its JSON, and the end of the last
    tensor's bytes against the file's size.

    Arguments
    ---------
    path : str
        A ``.safetensors`` file.

    Returns
    -------
    str or None

    Example
    -------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> _ = open(path, "wb").write(b"\x10")
    >>> safetensors_problem(path)
    'shorter than its 8-byte header length'
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "shorter than its 8-byte header length"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"truncated: header of {length} bytes, file of {size} bytes"
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            return f"header is not valid JSON ({error})"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"truncated: {size} bytes, the tensors need {8 + length + max(ends)}"
    return None
