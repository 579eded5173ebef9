"""Command line of :mod:`attncompiler.bench.memory` (see its docstring; ``--help`` lists the options)."""

from attncompiler.bench.memory import main

if __name__ == "__main__":
    main()
