"""The Triton backend: kernel templates, predicate rendering, launches and the stage implementations."""
