"""Command line of :mod:`attncompiler.bench.distributed` (see its docstring; ``--help`` lists the options)."""

from attncompiler.bench.distributed import main

if __name__ == "__main__":
    main()
