"""The README's and the docs' pictures, from what `make demo` just produced.

    python scripts/docs_figures.py [--demo demo] [--scan sub050__RH_Per_L_PtD]

Run by `make figures` after `make demo`: draws one demo scan with `./evaluate show` (the
ensemble's prediction against the truth) and copies, into docs/img/:

- show-trajectory.png, show-reconstruction.png and show.csv (that scan's numbers, which
  the docs print beside the figures through scripts/docs_tables.py);
- demo-ranking.png (the ranking report's ranks under every normalisation) and
  demo-leaderboard.csv (the leaderboard `./evaluate rank` wrote);
- figures.json: the sha256 of the weights' manifest and error model the pictures were made
  with. tests/test_docs.py compares it with weights/, so a change of the shipped ensemble
  without `make figures` fails the tests instead of leaving old pictures in the docs.

Then it regenerates the docs' tables (scripts/docs_tables.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
# The files whose change makes the pictures stale: what ./predict's ensemble is made of.
PROVENANCE = ("weights/manifest.json", "weights/error_model.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance() -> dict[str, str]:
    """{path: sha256} of the files the pictures depend on (those that exist)."""
    return {p: sha256(ROOT / p) for p in PROVENANCE if (ROOT / p).is_file()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=ROOT / "demo", help="the folder make demo wrote")
    p.add_argument("--scan", default="sub050__RH_Per_L_PtD", help="the demo scan to draw")
    args = p.parse_args(argv)
    demo = args.demo
    needed = [demo / "ensemble", demo / "data", demo / "ranking" / "leaderboard.csv"]
    missing = [str(n) for n in needed if not n.exists()]
    if missing:
        print(f"docs_figures: {', '.join(missing)} missing: run make demo first", file=sys.stderr)
        return 2
    out = ROOT / "build" / "figures" / "show"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [str(ROOT / "evaluate"), "show", str(demo / "ensemble"), "--data", str(demo / "data"),
         "--out", str(out), "--scans", args.scan, "--synthetic"],
        check=True,
    )  # fmt: skip
    IMG.mkdir(parents=True, exist_ok=True)
    copies = {
        out / f"{args.scan}_trajectory.png": IMG / "show-trajectory.png",
        out / f"{args.scan}_reconstruction.png": IMG / "show-reconstruction.png",
        out / "show.csv": IMG / "show.csv",
        demo / "ranking" / "figures" / "sensitivity.png": IMG / "demo-ranking.png",
        demo / "ranking" / "leaderboard.csv": IMG / "demo-leaderboard.csv",
    }
    for src, dst in copies.items():
        shutil.copyfile(src, dst)
    (IMG / "figures.json").write_text(
        json.dumps({"scan": args.scan, "made_with": provenance()}, indent=2) + "\n"
    )
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "docs_tables.py")]).returncode


if __name__ == "__main__":
    sys.exit(main())
