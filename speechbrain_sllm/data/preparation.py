"""Atomic, provenance-checked data preparation.

A recipe's preparation writes its manifests into a staging folder, moves them
into place, and writes a completion record LAST: the source files (path, size,
modification time and, up to ``DIGEST_LIMIT`` bytes, a SHA-256 of the content)
and the preparation options. A later run skips the work only when the record
matches: a source is the same when its size and modification time are, or, when
they differ only in time, when its digest is (data copied to another machine
keeps its content and gets new times). A run killed at any point leaves either
the previous complete set (with its record) or no valid record, and is redone.

Authors
 * speechbrain-sllm developers 2026
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil

logger = logging.getLogger(__name__)
RECORD = "preparation.json"
ON_CHANGE = ("redo", "stop")
DIGEST_LIMIT = 256 * 2**20  # larger sources are recorded by size and time only


def file_digest(path):
    """SHA-256 of a file's content, read in 1 MiB blocks.

    Arguments
    ---------
    path : str
        The file.

    Returns
    -------
    str
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_record(paths):
    """Path, size, modification time and content digest of each source file.

    Missing files are recorded as None; files over ``DIGEST_LIMIT`` bytes get no digest.

    Arguments
    ---------
    paths : list of str
        Source files of the preparation.

    Returns
    -------
    dict

    Example
    -------
    >>> source_record(["/no/such/file"])
    {'/no/such/file': None}
    """
    record = {}
    for path in paths:
        path = os.path.abspath(path)
        if os.path.isfile(path):
            stat = os.stat(path)
            record[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if stat.st_size <= DIGEST_LIMIT:
                record[path]["sha256"] = file_digest(path)
        else:
            record[path] = None
    return record


def same_source(before, after):
    """Whether two records of one source file describe the same content.

    Arguments
    ---------
    before : dict or None
        The recorded entry (a record written before digests has none).
    after : dict or None
        The entry now.

    Returns
    -------
    bool

    Example
    -------
    >>> old = {"size": 3, "mtime_ns": 1, "sha256": "ab"}
    >>> same_source(old, {"size": 3, "mtime_ns": 2, "sha256": "ab"})  # copied: new time
    True
    >>> same_source(old, {"size": 3, "mtime_ns": 2, "sha256": "cd"})
    False
    >>> same_source({"size": 3, "mtime_ns": 1}, {"size": 3, "mtime_ns": 1, "sha256": "cd"})
    True
    """
    if before is None or after is None:
        return before is after
    if before["size"] != after["size"]:
        return False
    if "sha256" in before and "sha256" in after:
        return before["sha256"] == after["sha256"]
    return before["mtime_ns"] == after["mtime_ns"]


def changed_sources(previous, record):
    """The source paths whose content differs between two completion records.

    Arguments
    ---------
    previous : dict
        The stored record.
    record : dict
        From ``completion_record``.

    Returns
    -------
    list of str
        Paths in only one record, then paths whose entries are not ``same_source``.
    """
    before, after = previous.get("sources", {}), record["sources"]
    return sorted(set(before) ^ set(after)) + [
        path for path in after if path in before and not same_source(before[path], after[path])
    ]


def same_record(previous, record):
    """Whether a stored completion record matches the one made now (options and sources).

    Arguments
    ---------
    previous : dict
        The stored record.
    record : dict
        From ``completion_record``.

    Returns
    -------
    bool
    """
    return previous.get("options") == record["options"] and not changed_sources(previous, record)


def completion_record(sources, options):
    """What a finished preparation records: its sources and its options.

    Arguments
    ---------
    sources : list of str
        Source files.
    options : dict
        Preparation options (JSON-serialisable).

    Returns
    -------
    dict
    """
    return {"sources": source_record(sources), "options": options}


def is_prepared(save_folder, record, outputs, on_change="redo"):
    """Whether ``save_folder`` holds a complete preparation made from ``record``.

    Arguments
    ---------
    save_folder : str
        Output folder of the preparation.
    record : dict
        From ``completion_record``.
    outputs : list of str
        File names the preparation writes into ``save_folder``.
    on_change : str
        ``redo``: a changed source or option means preparing again; ``stop``:
        raise an error naming what changed (set by the recipe yaml).

    Returns
    -------
    bool
    """
    if on_change not in ON_CHANGE:
        raise ValueError(f"on_change {on_change!r} unknown; use one of {ON_CHANGE}.")
    path = os.path.join(save_folder, RECORD)
    if not os.path.isfile(path):
        return False
    with open(path) as handle:
        previous = json.load(handle)
    if not all(os.path.isfile(os.path.join(save_folder, name)) for name in outputs):
        return False
    if same_record(previous, record):
        return True
    changed = describe_change(previous, record)
    if on_change == "stop":
        raise ValueError(
            f"{save_folder} was prepared from other data or options ({changed}). "
            "Use another output folder, or set `prepare_on_change: redo` to prepare again."
        )
    logger.warning(f"{save_folder}: {changed}; preparing again")
    return False


def describe_change(previous, record):
    """A short description of what differs between two completion records."""
    changed = changed_sources(previous, record)
    if changed:
        return f"changed sources: {changed[:3]}"
    return f"changed options: {previous.get('options')} -> {record['options']}"


@contextlib.contextmanager
def staged_preparation(save_folder, record):
    """Yields a staging folder; on success moves its files into place, record last.

    Arguments
    ---------
    save_folder : str
        Final output folder.
    record : dict
        From ``completion_record``; written only once every output is in place.

    Yields
    ------
    str
        The staging folder to write the outputs into.
    """
    staging = os.path.join(save_folder, ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    stale = os.path.join(save_folder, RECORD)
    if os.path.isfile(stale):
        os.remove(stale)  # from here until the new record, the folder is "not prepared"
    yield staging
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(save_folder, name))
    os.rmdir(staging)
    with open(stale + ".tmp", "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(stale + ".tmp", stale)
