"""Backends: the PyTorch implementation of program stages and Triton code generation."""
