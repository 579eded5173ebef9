"""The PyTorch backend: every program stage as torch operations (runs on any device, CPU included)."""
