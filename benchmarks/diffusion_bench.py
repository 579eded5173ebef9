"""Command line of :mod:`attncompiler.bench.diffusion` (see its docstring; ``--help`` lists the options)."""

from attncompiler.bench.diffusion import main

if __name__ == "__main__":
    main()
