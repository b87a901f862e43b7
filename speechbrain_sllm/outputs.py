"""Writing a run's outputs: JSON files written whole or not at all.

Authors
 * speechbrain-sllm developers 2026
"""

import json
import os


def write_json(data, path):
    """Writes ``data`` as indented JSON atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
    os.replace(tmp, path)
