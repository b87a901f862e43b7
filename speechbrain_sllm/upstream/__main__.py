"""``python -m speechbrain_sllm.upstream <recipe folder> <SpeechBrain checkout> [--beside]``:
writes an upstream-ready copy of the recipe (see ``speechbrain_sllm.upstream.export``) and
checks it with upstream's rules (``speechbrain_sllm.upstream.checks``). No file of the
checkout is replaced: the copy stops and lists files that exist with other content, or
with ``--beside`` writes this repository's versions next to them."""

import sys

from speechbrain_sllm.upstream.checks import (
    recipe_row_problems,
    unlisted_recipe_yamls,
    yaml_vs_script_problems,
)
from speechbrain_sllm.upstream.export import ExistingFilesError, export_recipe


def main(argv):
    """Exports, then prints what upstream's checks would flag; returns the exit status."""
    beside = "--beside" in argv
    argv = [arg for arg in argv if arg != "--beside"]
    if len(argv) != 2:
        print(__doc__)
        return 2
    try:
        written = export_recipe(argv[0], argv[1], beside=beside)
    except ExistingFilesError as error:
        print(f"upstream copy: {error}")
        return 1
    for path in written:
        print(f"wrote {path}")
    problems = yaml_vs_script_problems(argv[1]) + recipe_row_problems(argv[1])
    problems += [f"{path}: not listed in its CSV" for path in unlisted_recipe_yamls(argv[1])]
    for problem in problems:
        print(f"upstream check: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
