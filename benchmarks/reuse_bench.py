"""Command line of :mod:`attncompiler.bench.reuse` (see its docstring; ``--help`` lists the options)."""

from attncompiler.bench.reuse import main

if __name__ == "__main__":
    main()
