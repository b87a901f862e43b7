"""An upstream-ready copy of a recipe, laid out as in a SpeechBrain checkout.

Recipes here include shared fragments (``!include:../../../../../hparams/...``)
that resolve to nothing once a recipe is copied into SpeechBrain's tree. The
copy inlines each fragment into the recipe yaml (the fragment's tag and keys,
with the include's arguments replacing its defaults), and writes beside it the
recipe's script, data preparation, README, an ``extra_requirements.txt`` naming
this package and the recipe's rows of ``tests/recipes/<Dataset>.csv``:

> python -m speechbrain_sllm.upstream recipes/VoiceAssistant/SpokenQA/speechllm ../speechbrain

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import os
import re
import shutil

from speechbrain_sllm.upstream.checks import read_recipe_rows

INCLUDE = re.compile(r"^(\w+): !include:(\S+)\s*$")
PACKAGE_REQUIREMENT = "speechbrain-sllm>=0.1.0"


def fragment_parts(fragment_file):
    """The tag line and the ``key: value`` lines (comments kept) of a fragment.

    Arguments
    ---------
    fragment_file : str
        A fragment of ``hparams/`` (a tag line, then one top-level key per line).

    Returns
    -------
    tag : str
        E.g. ``!new:speechbrain_sllm.strategies.LoRASettings``.
    entries : dict
        ``{key: "key: value  # comment"}`` in the fragment's order.
    """
    tag, entries = None, {}
    with open(fragment_file) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            if tag is None:
                tag = line.strip()
                continue
            if line[:1] in (" ", "\t"):
                raise ValueError(
                    f"{fragment_file}: nested value {line!r}; fragments hold one key per line."
                )
            entries[line.split(":", 1)[0]] = line
    if tag is None:
        raise ValueError(f"{fragment_file}: empty fragment.")
    return tag, entries


def inlined_yaml(hparam_file):
    """The text of ``hparam_file`` with every ``key: !include:fragment`` inlined.

    Arguments
    ---------
    hparam_file : str
        A recipe yaml.

    Returns
    -------
    str
    """
    with open(hparam_file) as handle:
        lines = handle.read().split("\n")
    out, index = [], 0
    while index < len(lines):
        found = INCLUDE.match(lines[index])
        if found is None:
            out.append(lines[index])
            index += 1
            continue
        key, relative = found.groups()
        fragment = os.path.normpath(os.path.join(os.path.dirname(hparam_file), relative))
        tag, entries = fragment_parts(fragment)
        index += 1
        while index < len(lines) and lines[index].startswith("    "):
            argument = lines[index].strip()
            entries[argument.split(":", 1)[0]] = argument
            index += 1
        missing = [name for name, line in entries.items() if "!PLACEHOLDER" in line]
        if missing:
            raise ValueError(f"{hparam_file}: {key!r} leaves {missing} of {fragment} unset.")
        out.append(f"{key}: {tag}")
        out.extend(f"    {line}" for line in entries.values())
    return "\n".join(out)


class ExistingFilesError(FileExistsError):
    """Files of the destination checkout that the copy would change, listed."""


def copy_file(root, relative, destination, target_name=None):
    """Copies ``root/relative`` to ``destination/relative`` (folders created; a symbolic
    link stays a link, as upstream links a dataset's preparation into its recipes)."""
    source = os.path.join(root, relative)
    target = os.path.join(destination, target_name or relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
    else:
        shutil.copyfile(source, target)


def same_content(path, content):
    """Whether ``path`` holds ``content`` (a link: the same link text)."""
    if content[0] == "link":
        return os.path.islink(path) and os.readlink(path) == content[1]
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        return handle.read() == content[1]


def planned_content(root, relative, inlined):
    """``("link", target)`` or ``("bytes", data)`` the copy writes for ``relative``."""
    source = os.path.join(root, relative)
    if os.path.basename(relative) == "extra_requirements.txt":
        return "bytes", requirements_text(source).encode()
    if relative in inlined:
        return "bytes", inlined_yaml(source).encode()
    if os.path.islink(source):
        return "link", os.readlink(source)
    with open(source, "rb") as handle:
        return "bytes", handle.read()


def export_recipe(recipe_folder, destination, root=".", beside=False):
    """Writes an upstream-ready copy of one recipe under ``destination``, changing no file.

    A file that already exists in ``destination`` with other content is never
    replaced: the copy stops before writing anything and lists such files, or,
    with ``beside``, writes this repository's version next to each as
    ``<name>.speechbrain_sllm``. A dataset's preparation script that upstream
    already has (``Data_prep_file``, e.g. ``recipes/LibriSpeech/librispeech_prepare.py``)
    is kept as upstream's: the recipes call it with upstream's signature.

    Arguments
    ---------
    recipe_folder : str
        The recipe, e.g. ``recipes/VoiceAssistant/SpokenQA/speechllm`` (relative to ``root``).
    destination : str
        A SpeechBrain checkout (or an empty folder laid out as one).
    root : str
        This repository's root.
    beside : bool
        Write this repository's version of a differing file beside it instead of stopping.

    Returns
    -------
    list of str
        The written paths, relative to ``destination``.
    """
    recipe = os.path.relpath(os.path.join(root, recipe_folder), root)
    parts = recipe.split(os.sep)
    if len(parts) < 3 or parts[0] != "recipes":
        raise ValueError(f"{recipe_folder!r} is not a folder under recipes/<Dataset>/.")
    csv_file = os.path.join(root, "tests", "recipes", f"{parts[1]}.csv")
    rows = [r for r in read_recipe_rows(csv_file) if r["Script_file"].startswith(recipe + "/")]
    if not rows:
        raise ValueError(f"{csv_file} has no row for {recipe}; add one before exporting.")
    inlined = {r["Hparam_file"] for r in rows}
    preparation = data_preparation(rows)
    plan, kept, conflicts = {}, [], []
    for relative in sorted(recipe_files(root, recipe) | preparation):
        target = os.path.join(destination, relative)
        content = planned_content(root, relative, inlined)
        if not os.path.lexists(target) or same_content(target, content):
            plan[relative] = relative
        elif relative in preparation:
            kept.append(relative)  # upstream's own preparation script stays
        else:
            conflicts.append(relative)
    if conflicts and not beside:
        raise ExistingFilesError(
            f"{destination} already holds other versions of {conflicts}: nothing was written. "
            "Compare them, or pass --beside to write this repository's versions next to them "
            "as <name>.speechbrain_sllm."
        )
    plan.update({relative: relative + ".speechbrain_sllm" for relative in conflicts})
    written = []
    for relative, target_name in sorted(plan.items()):
        target = os.path.join(destination, target_name)
        if os.path.lexists(target):
            os.remove(target)
        kind, data = planned_content(root, relative, inlined)
        if kind == "bytes":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)
        else:
            copy_file(root, relative, destination, target_name)
        written.append(target_name)
    requirements = os.path.join(recipe, "extra_requirements.txt")
    if requirements not in plan and requirements not in conflicts:
        written.append(write_requirements(root, recipe, destination))
    written.append(write_rows(rows, csv_file, os.path.join(destination, "tests", "recipes")))
    return written + [f"{relative} (kept: upstream's own)" for relative in kept]


def recipe_files(root, recipe):
    """Every file of the recipe folder (repository-relative; no caches, no results)."""
    files = set()
    for folder, subfolders, names in os.walk(os.path.join(root, recipe)):
        subfolders[:] = [name for name in subfolders if name not in ("__pycache__", "results")]
        files |= {os.path.relpath(os.path.join(folder, name), root) for name in names}
    return files


def data_preparation(rows):
    """The ``Data_prep_file`` of the rows (upstream keeps it at the dataset's root)."""
    return {row["Data_prep_file"] for row in rows if row["Data_prep_file"]}


def requirements_text(source):
    """``extra_requirements.txt``: this package first, then the recipe's own lines."""
    lines = [PACKAGE_REQUIREMENT]
    if os.path.exists(source):
        with open(source) as handle:
            lines += [line.strip() for line in handle if line.strip()]
    return "\n".join(dict.fromkeys(lines)) + "\n"


def write_requirements(root, recipe, destination):
    """Writes the recipe's ``extra_requirements.txt`` (for a recipe without one)."""
    relative = os.path.join(recipe, "extra_requirements.txt")
    os.makedirs(os.path.join(destination, recipe), exist_ok=True)
    with open(os.path.join(destination, relative), "w") as handle:
        handle.write(requirements_text(os.path.join(root, relative)))
    return relative


def write_rows(rows, csv_file, folder):
    """Adds ``rows`` to ``folder/<Dataset>.csv`` (created with the same header; rows of
    other recipes kept, earlier copies of these replaced)."""
    os.makedirs(folder, exist_ok=True)
    with open(csv_file, newline="") as handle:
        header = next(csv.reader(handle))
    target = os.path.join(folder, os.path.basename(csv_file))
    scripts = {row["Script_file"] for row in rows}
    kept = []
    if os.path.exists(target):
        kept = [r for r in read_recipe_rows(target) if r["Script_file"] not in scripts]
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept + rows)
    return os.path.relpath(target, os.path.dirname(os.path.dirname(folder)))
