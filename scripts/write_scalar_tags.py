"""Rewrite tests/scalar_tags.json (the pinned TensorBoard tags and tracker names) from the sample runs, after
``scripts/make_sample_runs.py`` regenerated them. It prints, per run, the tags that changed: rewrite the file only
when those changes come from the runs' data (new tables, other module names), not from a change of the tag scheme
(check with ``--check`` on the previous sample runs: every run must be unchanged).

    python scripts/write_scalar_tags.py            # print the changes and rewrite the file
    python scripts/write_scalar_tags.py --check    # print the changes only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_scalar_tags_golden as golden  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="print the changes, leave the file as it is")
    args = p.parse_args()
    want = json.loads(golden.GOLDEN.read_text())
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in golden.RUNS:
            out[name] = got = golden.observed(name, Path(tmp))
            changed = [k for k in got if got[k] != want.get(name, {}).get(k)]
            for key in changed:
                if isinstance(got[key], list):
                    old, new = set(map(str, want.get(name, {}).get(key) or [])), set(map(str, got[key]))
                    print(f"{name} {key}: {len(old - new)} removed, {len(new - old)} added, e.g. "
                          f"{sorted(old - new)[:2]} / {sorted(new - old)[:2]}")
                else:
                    print(f"{name} {key}: {want.get(name, {}).get(key)} -> {got[key]}")
            if not changed:
                print(f"{name}: unchanged")
    if not args.check:
        golden.GOLDEN.write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
