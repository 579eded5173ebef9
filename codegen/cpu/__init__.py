"""C kernels of the PyTorch backend's CPU stages, built with the system C compiler on first use."""
