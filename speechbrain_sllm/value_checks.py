"""Types and ranges of a recipe's numeric and enumerated settings, checked before anything runs.

A recipe's settings are its yaml's keys after the command line's overrides;
HyperPyYAML reads ``--lr=abc`` as the string ``'abc'`` and ``--number_of_epochs=0``
as ``0``, and nothing complains until the value is used, late in the run. The
rules below go by the key's name (the families every recipe here uses: rates,
epochs, batch sizes, fractions, token counts), at the top level and inside
mappings (``--lora="{rank: 0}"``), and name the key, the value and what is allowed.

Authors
 * speechbrain-sllm developers 2026
"""

import re

DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")


def is_number(value):
    """A real number (not a boolean)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value):
    """An integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


# (name pattern, test, what is allowed); the first matching rule applies
RULES = [
    (r"^number_of_epochs$", lambda v: is_count(v) and v >= 1, "an integer >= 1"),
    (r"epochs$", lambda v: is_count(v) and v >= 0, "an integer >= 0 (0 skips the stage)"),
    (r"batch_size$", lambda v: is_count(v) and v >= 1, "an integer >= 1"),
    (r"^valid_fraction$", lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    (r"(^|_)zeroing_fraction$", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    (r"(^|_)warmup_fraction$", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    (r"(^|_)fraction$", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    (r"(^|_)tokens$", lambda v: is_count(v) and v >= 1, "an integer >= 1"),
    (r"(^|_)lr$", lambda v: is_number(v) and v >= 0, "a number >= 0 (e.g. 0.0001)"),
    (r"^rank$", lambda v: is_count(v) and v >= 1, "an integer >= 1"),
    (r"(^|_)duration$", lambda v: is_number(v) and v >= 0, "a number of seconds >= 0"),
    (r"^grad_accumulation_factor$", lambda v: is_count(v) and v >= 1, "an integer >= 1"),
]


def rule_for(key):
    """The ``(test, allowed)`` of the first rule whose pattern matches ``key`` (None: no rule).

    Example
    -------
    >>> rule_for("ft_lr")[1], rule_for("importance_fraction")[1], rule_for("seed")
    ('a number >= 0 (e.g. 0.0001)', 'a number in (0, 1]', None)
    """
    for pattern, test, allowed in RULES:
        if re.search(pattern, key):
            return test, allowed
    return None


def value_problems(settings, prefix=""):
    """One message per setting whose value breaks its family's rule.

    Arguments
    ---------
    settings : dict
        Plain settings (``config.plain_settings``); mappings are looked into.
    prefix : str
        Name of the enclosing mapping (``lora.`` for ``lora.rank``).

    Returns
    -------
    list of str

    Example
    -------
    >>> value_problems({"lr": "abc", "number_of_epochs": 0, "lora": {"rank": 4}, "x": None})
    ["`lr` = 'abc': must be a number >= 0 (e.g. 0.0001)", '`number_of_epochs` = 0: must be an integer >= 1']
    """
    problems = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            problems += value_problems(value, f"{name}.")
            continue
        rule = rule_for(str(key))
        if rule is None or value is None:  # null: the setting is off, or its default applies
            continue
        test, allowed = rule
        if not test(value):
            problems.append(f"`{name}` = {value!r}: must be {allowed}")
    return problems


def device_problem(device):
    """A message when ``--device`` is not ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (else None).

    Example
    -------
    >>> device_problem("gpu")
    "--device='gpu' is not a device; use cpu, cuda, cuda:N (e.g. cuda:0) or mps."
    """
    if device is None or DEVICE.match(str(device)):
        return None
    return f"--device={device!r} is not a device; use cpu, cuda, cuda:N (e.g. cuda:0) or mps."
