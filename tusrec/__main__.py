"""``python -m tusrec <command>``, or ``python -m tusrec --as <command> ...`` for root commands."""

import sys

from tusrec.cli import main

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--as":
        sys.exit(main(sys.argv[3:], prog=sys.argv[2]))
    sys.exit(main())
