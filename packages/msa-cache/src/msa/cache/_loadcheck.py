"""Test-load entries in a child process for ``msa-cache verify`` (keeps torch/tvm-ffi and crashes out of the CLI).

stdin: one JSON object per line ``{"path", "tier", "writable"}``; stdout: one ``{"digest", "outcome"}`` per entry,
flushed as it goes so the parent knows which entry a crash happened on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    from msa.cache._fsutil import read_json
    from msa.cache.entry import Entry
    from msa.cache.loaders import get_loader
    from msa.cache.tiers import Tier

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        path = Path(req["path"])
        try:
            meta = read_json(path / "manifest.json")
            entry = Entry(path, Tier(Path(req["tier"]), bool(req["writable"]), "verify"), meta)
            loader = get_loader(entry.kind)
            if loader is None:
                outcome = "skipped"
            else:
                loader(entry)
                outcome = "ok"
        except BaseException as e:  # report and go on with the next entry
            outcome = f"load failed: {type(e).__name__}: {e}".splitlines()[0][:500]
        print(json.dumps({"digest": path.name, "outcome": outcome}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
