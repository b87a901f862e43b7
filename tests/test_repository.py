"""Repository hygiene: ruff-clean code, and CI running exactly the README's commands."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_states_exactly_two_setup_commands_and_ci_runs_them():
    commands = readme_commands()
    assert len(commands) == 2
    with open(os.path.join(ROOT, ".ci", "run")) as handle:
        ci_lines = [line.strip() for line in handle]
    for command in commands:
        assert command.strip() in ci_lines


def test_code_is_ruff_clean():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    result = subprocess.run([ruff, "check", ROOT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def python_sources():
    for folder in ("speechbrain_sllm", "recipes", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py"))


def test_every_module_class_and_function_has_a_docstring_with_its_arguments():
    """SpeechBrain's docstring rule: modules, classes and functions are documented, and a
    public function or class documenting its parameters lists them under ``Arguments``."""
    import ast

    problems = []
    for path in python_sources():
        with open(path) as handle:
            tree = ast.parse(handle.read())
        where = os.path.relpath(path, ROOT)
        if ast.get_docstring(tree) is None:
            problems.append(f"{where}: module docstring")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if doc is None:
                if not node.name.startswith("_"):
                    problems.append(f"{where}:{node.lineno} {node.name}: no docstring")
                continue
            if "Arguments\n" in doc and isinstance(node, ast.FunctionDef):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                names = [n for n in names if n not in ("self", "cls")]
                missing = [n for n in names if not re.search(rf"^\s*{n} :", doc, re.M)]
                if missing:
                    problems.append(f"{where}:{node.lineno} {node.name}: undocumented {missing}")
    assert not problems, "\n".join(problems)


def heading_anchor(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_of_the_docs_names_a_committed_file_and_heading():
    """A link to a file git ignores (docs/results/ once was) or to a heading renamed since
    is a pointer to nothing for a reader of the repository."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    tracked = set(listed.stdout.split())
    broken = []
    for document in sorted(path for path in tracked if path.endswith(".md")):
        with open(os.path.join(ROOT, document)) as handle:
            text = handle.read()
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(document), target))
            if (
                target
                and path not in tracked
                and not any(t.startswith(path + "/") for t in tracked)
            ):
                broken.append(f"{document}: {target}")
                continue
            linked = path if target else document
            if anchor and linked.endswith(".md"):
                with open(os.path.join(ROOT, linked)) as handle:
                    headings = re.findall(r"^#+ (.+)$", handle.read(), flags=re.M)
                if anchor not in {heading_anchor(heading) for heading in headings}:
                    broken.append(f"{document}: {target}#{anchor}")
    assert not broken, broken


def names_table():
    """The rows of docs/using_the_package.md's names table, as lists of cells."""
    with open(os.path.join(ROOT, "docs", "using_the_package.md")) as handle:
        section = handle.read().split("## Names", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def code_text(suffixes=(".py", ".yaml")):
    """The text of the package, the recipes and the yaml fragments (not the tests)."""
    texts = []
    for folder in ("speechbrain_sllm", "recipes", "hparams"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(files):
                if name.endswith(suffixes):
                    with open(os.path.join(dirpath, name)) as handle:
                        texts.append((os.path.join(dirpath, name), handle.read()))
    return texts


def test_the_names_table_matches_the_code():
    """Each concept's name is in the code; each retired name is gone, or (a yaml key)
    refused by RENAMED_KEYS (a yaml key) or RENAMED_VALUES (a value) with the new name."""
    from speechbrain_sllm.overrides import RENAMED_KEYS, RENAMED_VALUES

    renamed = {**RENAMED_KEYS, **RENAMED_VALUES}

    texts = code_text()
    everything = "\n".join(text for _, text in texts)
    problems = []
    for concept, name, _, retired in names_table():
        identifiers = [
            re.match(r"[\w.]+", token).group()
            for token in re.findall(r"`([^`]+)`", name)
            if "<" not in token and re.match(r"[\w.]+", token)
        ]
        if not any(identifier.split(".")[-1] in everything for identifier in identifiers):
            problems.append(f"{concept}: none of {identifiers} is in the code")
        for old in re.findall(r"`([^`]+)`", retired):
            if old in renamed:
                if renamed[old] not in name:  # (a yaml that lacks the new key refuses it)
                    problems.append(f"{old} is refused naming {renamed[old]}, not in {name}")
                continue
            problems += [f"{path}: retired name {old}" for path, text in texts if old in text]
    assert not problems, problems
