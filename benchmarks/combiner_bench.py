"""Command line of :mod:`attncompiler.bench.combiner` (see its docstring; ``--help`` lists the options)."""

from attncompiler.bench.combiner import main

if __name__ == "__main__":
    main()
