"""Benchmark drivers: attention against SDPA and FlexAttention, layouts against ``create_block_mask``,
the Triton sweep (``python -m attncompiler.bench.triton``) and the family benchmarks (``combiner``,
``diffusion``, ``distributed``, ``memory``, ``reuse``: ``python -m attncompiler.bench.<name>`` or
``python benchmarks/<name>_bench.py``; imported only when run)."""

from .attention import CONTENDERS, DTYPES, BenchResult, run_bench
from .layout import LAYOUT_CONTENDERS, LayoutBenchResult, run_layout_bench
from .measure import memory_method, peak_memory

__all__ = ["CONTENDERS", "DTYPES", "LAYOUT_CONTENDERS", "BenchResult", "LayoutBenchResult", "memory_method",
           "peak_memory", "run_bench", "run_layout_bench"]
