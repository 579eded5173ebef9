"""Bounded-memory attention (ABC, Peng et al., ACL 2022, arXiv 2110.02488), written with the
public DSL only. Every entry is ``ac.memory(slots, control, causal)`` with one control strategy:
the paper's point is that these attentions differ only in how tokens are written into n slots.
"""

from __future__ import annotations

from attncompiler.dsl.pattern import Pattern
from attncompiler.families.memory.pattern import ClusterControl, LinformerControl, MLPControl, WindowControl, memory


def abc_mlp(slots: int = 64, causal: bool = False) -> Pattern:
    """ABC-MLP, the learned contextualized control (Peng et al. 2022, arXiv 2110.02488, ABC_MLP).

    ``phi_{j,m} = softmax_j(s_{j,m})`` over the visible tokens, ``s = k W`` with a learned
    ``W [D, n]`` (or caller logits: ``attn(q, k, v, control=s)``); causal: normalized over the
    prefix ``j <= i``.

    Args:
        slots: memory size n. Default 64.
        causal: query i reads a memory of tokens j <= i only. Default False.
    """
    return memory(slots, MLPControl(), causal=causal)


def abc_linformer(slots: int = 64, max_len: int = 4096, causal: bool = False) -> Pattern:
    """Linformer as ABC (Wang et al. 2020, arXiv 2006.04768, cast as ABC by Peng et al. 2022).

    ``phi_j = E[:, j]`` with a learned ``E [n, max_len]``; the causal form sums a prefix, the
    ABC paper's observation that Linformer works causally.

    Args:
        slots: memory size n (Linformer's projected length k). Default 64.
        max_len: the longest sequence E covers. Default 4096.
        causal: prefix sums instead of the full sum. Default False.
    """
    return memory(slots, LinformerControl(max_len=max_len), causal=causal)


def abc_window(slots: int = 64) -> Pattern:
    """Sliding-window attention as ABC (Peng et al. 2022): a first-in-first-out memory of the
    last n tokens, exactly causal ``sliding_window(n - 1)`` attention.

    Args:
        slots: memory size n, the window including the query's own token. Default 64.
    """
    return memory(slots, WindowControl(), causal=True)


def abc_cluster(slots: int = 64, causal: bool = False) -> Pattern:
    """Clustering control as ABC (Peng et al. 2022; cf. Clustered Attention, Vyas et al. 2020):
    each key is written to the slot of its nearest of
    n learned centroids and slots hold running means; empty slots are not read.

    Args:
        slots: number of clusters n. Default 64.
        causal: running means over the prefix j <= i. Default False.
    """
    return memory(slots, ClusterControl(), causal=causal)
