"""Command line of :mod:`attncompiler.bench.grid` (the CPU benchmark grid; ``--help`` lists the options)."""

import sys

from attncompiler.bench.grid import main

if __name__ == "__main__":
    sys.exit(main())
