"""The command reference, docs/reference/cli.md, generated from the argparse parsers.

    python scripts/cli_reference.py            # (re)write docs/reference/cli.md
    python scripts/cli_reference.py --check    # exit 1 if the committed file differs

tests/test_cli.py runs the check, so an option added or changed without rerunning this
fails the tests instead of leaving the reference stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference" / "cli.md"
sys.path.insert(0, str(ROOT))

from tusrec.cli import reference_markdown  # noqa: E402  (the checkout's package, not an installed one)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs; write nothing")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
