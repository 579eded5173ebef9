"""The package version (a leaf, so that generated kernel headers can name it without the root)."""

__version__ = "0.1.0"
