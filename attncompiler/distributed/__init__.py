"""Distributed multi-head attention on torch.distributed."""
