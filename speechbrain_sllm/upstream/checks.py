"""SpeechBrain's recipe consistency rules, as upstream's CI applies them.

A recipe contributed to SpeechBrain must pass the checks of its repository
(``tests/consistency/test_recipe.py``, ``tests/utils/check_yaml.py``,
``tests/utils/check_docstrings.py``). Their code is not shipped on PyPI; these
functions apply the same rules, line-based as upstream reads files, so that a
recipe here is checked the way an upstream pull request would be:

* **yaml vs script**: a top-level key of a recipe yaml counts as used only if a
  later ``!ref`` of the same yaml names it, or the recipe script names it as
  ``["key"]``, ``hparams.key``, ``modules.key``, ``attr(self.hparams, "key"``
  or ``hparams.get("key"``; SpeechBrain's run options are exempt. (Upstream
  also accepts a few f-string patterns with a printed warning; they are not
  accepted here, so this check is at least as strict.)
* **modules**: every ``self.modules.<name>`` of the script is a key of the
  yaml's ``modules:`` block.
* **recipe list**: every ``.yaml`` under ``recipes/<Dataset>`` is the
  ``Hparam_file`` of a row of ``tests/recipes/<Dataset>.csv``, and every row
  has ``test_debug_flags``; the files a row names exist.
* **docstrings**: a Python file starts with a docstring, and the line after each
  ``def ...:`` line (skipping lines holding ``...`` or ``>>>``) starts with a quote.

Authors
 * speechbrain-sllm developers 2026
"""

import csv
import os
import re

from speechbrain.utils.run_opts import RunOptions

# upstream's avoid list for the recipe list (paths holding one of these are not recipes)
NOT_RECIPE_PATHS = ("/models/", "/results/", "/pretrained_models/", "hpopt.yaml")
SCRIPT_NAMINGS = ("hparams.{}", "modules.{}", 'attr(self.hparams, "{}', 'hparams.get("{}', '["{}"]')
RECIPE_CSV_FIELDS = ("Script_file", "Hparam_file", "Data_prep_file", "Readme_file")
EXEMPT_KEYS = ("rescoring_lm_scale",)


def declared_yaml_keys(hparam_file):
    """Top-level keys of a yaml that its script must name (upstream's ``get_yaml_var``).

    A key is dropped when a ``!ref`` line after its declaration names ``<key>``
    (or ``<key[...]>``); ``!apply`` lines and lines with ``!!`` declare nothing.

    Arguments
    ---------
    hparam_file : str
        Path of the yaml.

    Returns
    -------
    list of str

    Example
    -------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
    ...     _ = f.write("seed: 1\\nout: !ref results/<seed>\\nlr: 0.1\\n")
    >>> declared_yaml_keys(f.name)
    ['out', 'lr']
    """
    keys = []
    with open(hparam_file) as handle:
        for line in handle:
            if len(line) <= 1 or line.startswith("#") or "parameter_transfer.Pretrainer" in line:
                continue
            line = line.rstrip()
            if ":" not in line and "!ref" not in line:
                continue
            name = line[: line.find(":")]
            if name[:1] not in (" ", "\t") and "!!" not in line and "!apply" not in line:
                keys.append(name)
            if "!ref" in line:
                for piece in line.split("<")[1:]:
                    referenced = piece[: piece.find(">")].split("[")[0]
                    if referenced in keys:
                        keys.remove(referenced)
    return keys


def script_names_key(script_lines, key):
    """Whether a script line names ``key`` the way upstream's check accepts.

    Arguments
    ---------
    script_lines : list of str
        The script's lines.
    key : str
        A yaml key.

    Returns
    -------
    bool

    Example
    -------
    >>> script_names_key(['lr = hparams["lr"]'], "lr")
    True
    >>> script_names_key(["brain = Brain(hparams=hparams)"], "lr")
    False
    """
    patterns = [naming.format(key) for naming in SCRIPT_NAMINGS]
    return any(pattern in line for line in script_lines for pattern in patterns)


def run_option_keys():
    """SpeechBrain's run options (yaml keys that the core ``Brain`` reads itself)."""
    return set(RunOptions().as_dict()) | set(EXEMPT_KEYS)


def unused_yaml_keys(hparam_file, script_file):
    """Keys of ``hparam_file`` that neither a later ``!ref`` nor ``script_file`` names.

    Arguments
    ---------
    hparam_file : str
        The recipe yaml.
    script_file : str
        The recipe script that loads it.

    Returns
    -------
    list of str
        Empty when upstream's ``check_yaml_vs_script`` passes.
    """
    with open(script_file) as handle:
        lines = handle.readlines()
    exempt = run_option_keys()
    return [
        key
        for key in declared_yaml_keys(hparam_file)
        if key not in exempt and not script_names_key(lines, key)
    ]


def undeclared_modules(hparam_file, script_file):
    """``self.modules.<name>`` of the script missing from the yaml's ``modules:`` block.

    Arguments
    ---------
    hparam_file : str
        The recipe yaml.
    script_file : str
        The recipe script.

    Returns
    -------
    list of str
        Empty when upstream's ``check_module_vars`` passes.
    """
    declared, in_block = set(), False
    with open(hparam_file) as handle:
        for line in handle:
            if "modules:" in line:
                in_block = True
                continue
            if line[:1] not in (" ", "\t"):
                in_block = False
            if in_block:
                declared.add(line.strip().split(":")[0])
    with open(script_file) as handle:
        text = handle.read()
    used = set(re.findall(r"self\.modules\.([^\s,()\[\]{}.:\"]+)", text))
    optional = set(re.findall(r'if hasattr\(self\.(?:modules|hparams), "([^"]+)"', text))
    used -= {"parameters", "keys", "eval", "train"} | optional
    return sorted(used - declared)


def read_recipe_rows(csv_file):
    """The rows of a recipe CSV (``tests/recipes/<Dataset>.csv``) as dicts.

    Arguments
    ---------
    csv_file : str
        The CSV file.

    Returns
    -------
    list of dict
    """
    with open(csv_file, newline="") as handle:
        return list(csv.DictReader(handle, delimiter=",", skipinitialspace=True))


def unlisted_recipe_yamls(root):
    """Recipe yamls under ``recipes/<Dataset>`` missing from ``tests/recipes/<Dataset>.csv``.

    Arguments
    ---------
    root : str
        A SpeechBrain-style checkout (``recipes/`` and ``tests/recipes/``).

    Returns
    -------
    list of str
        Repository-relative paths; empty when upstream's ``test_recipe_list`` passes
        for its listing part (datasets without a CSV are not looked at, as upstream).
    """
    unlisted = []
    for csv_name in sorted(os.listdir(os.path.join(root, "tests", "recipes"))):
        if not csv_name.endswith(".csv"):
            continue
        dataset = csv_name[: -len(".csv")]
        rows = read_recipe_rows(os.path.join(root, "tests", "recipes", csv_name))
        listed = {row["Hparam_file"].strip() for row in rows}
        for folder, _, files in os.walk(os.path.join(root, "recipes", dataset)):
            for name in files:
                path = os.path.relpath(os.path.join(folder, name), root)
                if path.endswith(".yaml") and not any(p in "/" + path for p in NOT_RECIPE_PATHS):
                    if path not in listed:
                        unlisted.append(path)
    return sorted(unlisted)


def recipe_row_problems(root):
    """Rows without debug flags and files named by a row that do not exist.

    Arguments
    ---------
    root : str
        A SpeechBrain-style checkout.

    Returns
    -------
    list of str
        One message per problem; empty when upstream's ``test_recipe_list`` (flags),
        ``test_recipe_files`` and ``test_mandatory_files`` pass.
    """
    problems = []
    folder = os.path.join(root, "tests", "recipes")
    for csv_name in sorted(n for n in os.listdir(folder) if n.endswith(".csv")):
        for number, row in enumerate(read_recipe_rows(os.path.join(folder, csv_name))):
            if not row["test_debug_flags"]:
                problems.append(f"{csv_name} row {number}: no test_debug_flags")
            for field in RECIPE_CSV_FIELDS:
                for path in (row[field] or "").split():
                    if not os.path.exists(os.path.join(root, path)):
                        problems.append(f"{csv_name} row {number}: {field} {path} does not exist")
    return problems


def yaml_vs_script_problems(root):
    """Upstream's yaml-vs-script and module checks over every row of every recipe CSV.

    Arguments
    ---------
    root : str
        A SpeechBrain-style checkout.

    Returns
    -------
    list of str
        One message per unused key or undeclared module, and per row whose script or
        yaml is missing (another recipe's, in a partial checkout).
    """
    problems = []
    folder = os.path.join(root, "tests", "recipes")
    for csv_name in sorted(n for n in os.listdir(folder) if n.endswith(".csv")):
        for row in read_recipe_rows(os.path.join(folder, csv_name)):
            hparam_file = os.path.join(root, row["Hparam_file"].strip())
            script_file = os.path.join(root, row["Script_file"].strip())
            missing = [p for p in (script_file, hparam_file) if not os.path.isfile(p)]
            if missing:
                names = [os.path.relpath(p, root) for p in missing]
                problems.append(f"{csv_name}: a row names missing files {names}; not checked")
                continue
            for key in unused_yaml_keys(hparam_file, script_file):
                problems.append(f"{row['Hparam_file']}: {key!r} not used in {row['Script_file']}")
            for name in undeclared_modules(hparam_file, script_file):
                problems.append(f"{row['Script_file']}: self.modules.{name} not in `modules:`")
    return problems


def definitions_without_docstring(python_file):
    """Upstream's line-based docstring rule for one Python file.

    Lines holding ``>>>`` or ``...``, blank lines and comments are skipped. The
    first remaining line must open a docstring (``"`` or ``r"``), and so must the
    line after each one-line ``def name(...):`` whose name does not start with
    ``_``, and after each ``class Name...:``.

    Arguments
    ---------
    python_file : str
        The file.

    Returns
    -------
    list of str
        ``"<file>: <what>"`` per missing docstring (empty: the rule passes).

    Example
    -------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    ...     _ = f.write("'Doc.'\\ndef f(x):\\n    return x\\n")
    >>> [problem.split(": ")[1] for problem in definitions_without_docstring(f.name)]
    ['no module docstring', 'f has no docstring']
    """
    problems, pending = [], f"{python_file}: no module docstring"
    with open(python_file) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#") or ">>>" in line or "..." in line:
                continue
            if pending is not None:
                if not line.startswith(('"', 'r"')):
                    problems.append(pending)
                pending = None
                continue
            function = re.search(r"(def)\s(.*)\(.*\)\:", line)
            if line.startswith("def") and function and not function.group(2).startswith("_"):
                pending = f"{python_file}: {function.group(2)} has no docstring"
            klass = re.search(r"(class)\s(.*)\:", line)
            if line.startswith("class") and klass:
                pending = f"{python_file}: class {klass.group(2)} has no docstring"
    return problems
