"""attnc subcommands (placeholder module: its owner adds the commands)."""


def register(subparsers) -> None:
    """Add this module's subcommands to the ``attnc`` parser."""
