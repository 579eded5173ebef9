"""ABC memory analysis: the attention graph with memory-slot nodes, claims, symbolic cost.

Graph (token level): token nodes ``0 .. L-1``, then MEMORY nodes.

* Bidirectional: ``n`` slot nodes; every token may be written to every slot (WRITE edges,
  token -> slot) and every query reads every slot (READ edges, slot -> query).
* Causal: what query i reads is the memory *as of token i*, so there is one MEMORY node per
  query position (standing for its n slots), written by tokens ``j <= i`` (or, for a FIFO
  window, by the last n tokens) and read by query i only. This keeps the graph exactly causal
  (no path from a later key to an earlier query), with as many write edges as a causal mask.

A token -> memory -> token path is one layer (see :mod:`attncompiler.analysis.graph`), so
"every legal key reaches every query in one layer through the memory" is ``hops_to_full == 1``.
*Reach* is not *capacity*: all that information passes through n slots of D numbers, so the
L x L matrix of one ABC layer (``softmax(q K~^T) phi^T``, ``[L, n] @ [n, L]``) has rank <= n.
The notes of the graph say this, with the bottleneck n, so ``attnc analyze`` reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import sympy

from ..errors import UnsupportedError
from ..families.memory.pattern import MEMORY, ClusterControl, LinformerControl, Memory, MLPControl, WindowControl
from .cost import SymbolicCost, asymptotic_class, register_cost
from .symbols import D as D_SYM, L as L_SYM
from .graph import MEMORY as MEMORY_NODE, READ, TOKEN, WRITE, AttentionGraph, register_graph_builder

N_SYM = sympy.Symbol("n", positive=True, integer=True)
C_SYM = sympy.Symbol("C", positive=True, integer=True)

_NAMES = {MLPControl: "abc_mlp", LinformerControl: "abc_linformer", ClusterControl: "abc_cluster",
          WindowControl: "abc_window"}


@register_graph_builder(MEMORY)
def memory_graph(pattern: Memory, seq_len: int, *, level: str = "token", block: int = 64,
                 **_options) -> AttentionGraph:
    """The attention graph of a memory pattern at ``seq_len`` (token or block level).

    At ``level="block"`` token nodes are blocks of ``block`` tokens and there is one memory
    node per query block (causal) or per slot (bidirectional); edge weights count the
    token-level edges they merge.
    """
    if level not in ("token", "block"):
        raise UnsupportedError(f"level={level!r} must be 'token' or 'block'")
    L = int(seq_len)
    unit = 1 if level == "token" else int(block)
    T = -(-L // unit)  # token nodes
    size = np.minimum(unit, L - unit * np.arange(T)).astype(np.float64)  # tokens per node
    n = pattern.slots
    if pattern.is_causal:
        X = T  # one memory node per query (block): the memory as that query reads it
        if isinstance(pattern.control, WindowControl):
            lo = np.maximum(np.arange(L) - (n - 1), 0)  # FIFO: query i's memory holds tokens lo_i .. i
            counts = np.arange(L) - lo + 1
            ii = np.repeat(np.arange(L), counts)
            jj = ii - (np.arange(len(ii)) - np.repeat(np.cumsum(counts) - counts, counts))  # i, i-1, .., lo_i
            w = sp.coo_matrix((np.ones(len(ii)), (ii // unit, jj // unit)), shape=(X, T)).tocsr()  # merged counts
        else:
            # token j -> memory of query i for j <= i, merged per (query block, token block)
            t = _tril_ones(T)
            w = (sp.diags(size) @ t @ sp.diags(size) - sp.diags(size * (size - 1) / 2)).tocsr()
        r = sp.diags(size, format="csr")  # memory node b -> its own queries
    else:
        X = n
        w = sp.csr_matrix(np.ones((n, 1)) * size[None, :])  # every token may enter every slot
        r = sp.csr_matrix(size[:, None] * np.ones((1, n)))  # every query reads every slot
    N = T + X
    adj = sp.bmat([[None, r], [w, None]], format="csr")  # adj[dst, src]: slot->query, token->slot
    adj = sp.csr_matrix(adj, shape=(N, N))
    kinds = sp.bmat([[None, sp.csr_matrix((np.full(r.nnz, READ), r.indices, r.indptr), shape=r.shape)],
                     [sp.csr_matrix((np.full(w.nnz, WRITE), w.indices, w.indptr), shape=w.shape), None]],
                    format="csr")
    node_kind = np.concatenate([np.full(T, TOKEN), np.full(X, MEMORY_NODE)]).astype(np.int8)
    return AttentionGraph(pattern, T, node_kind, adj, kinds, causal=pattern.is_causal, block=unit,
                          notes=memory_notes(pattern, L), seq_len=L)


def _tril_ones(L: int) -> sp.csr_matrix:
    """``[L, L]`` lower-triangular ones (diagonal included) as CSR, built without a dense array."""
    counts = np.arange(1, L + 1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts)  # 0 .. i in row i
    return sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(L, L))


@dataclass(frozen=True)
class MemoryClaims:
    """What one ABC layer can do at ``seq_len``, per head.

    Attributes:
        slots: the bottleneck n (slots every key/value passes through).
        one_layer_reach: every legal key reaches every query in one layer (False for a FIFO
            window shorter than the sequence).
        hops_to_full: layers until every legal key reaches every query.
        rank_bound: the rank of the layer's L x L attention matrix is at most this.
        state_numbers: numbers a decoder keeps per head (``n (D + Dv)`` plus n normalizers).
        kv_cache_numbers: what full attention's KV cache holds per head at ``seq_len``.
    """

    slots: int
    one_layer_reach: bool
    hops_to_full: int
    rank_bound: int
    state_numbers: int
    kv_cache_numbers: int


def memory_claims(pattern: Memory, seq_len: int, head_dim: int = 64) -> MemoryClaims:
    """The claims of :class:`MemoryClaims` in closed form (checked against the graph in tests)."""
    n, L = pattern.slots, int(seq_len)
    if isinstance(pattern.control, WindowControl):
        hops = 1 if n >= L else math.ceil((L - 1) / max(n - 1, 1)) if n > 1 else L - 1
        state = n * 2 * head_dim
    else:
        hops = 1
        state = n * (2 * head_dim + 1) + (n if pattern.control.normalized else 0)
    window = isinstance(pattern.control, WindowControl)  # a band: one slot per recent token, no low rank
    return MemoryClaims(n, hops == 1, max(hops, 1), L if window else min(n, L), state, 2 * L * head_dim)


def memory_notes(pattern: Memory, seq_len: int) -> tuple[str, ...]:
    """Human-readable reach-versus-capacity notes (shown by ``attnc analyze``)."""
    n, L = pattern.slots, int(seq_len)
    c = memory_claims(pattern, L)
    legal = "every earlier-or-equal key" if pattern.is_causal else "every key"
    if c.one_layer_reach:
        reach = f"reach: {legal} reaches every query in one layer (token -> memory slot -> query)"
    else:
        reach = (f"reach: a FIFO memory of {n} slots holds only the last {n} tokens; full reach takes "
                 f"{c.hops_to_full} layers")
    if isinstance(pattern.control, WindowControl):
        capacity = (f"capacity: each query reads {n} slots holding whole (key, value) pairs of the last {n} "
                    "tokens (a banded matrix, no low-rank bottleneck); what is older must be relayed by layers")
    else:
        capacity = (f"capacity: everything a query reads passes through n = {n} slots of D numbers, so the "
                    f"{L} x {L} attention matrix of one layer has rank <= {c.rank_bound}; reach says information "
                    "can flow, capacity bounds how much of it arrives")
    notes = [reach, capacity,
             f"decoding state: {n} slots per head, constant in L (a KV cache grows to {L} rows)"]
    if isinstance(pattern.control, ClusterControl):
        notes.append("cluster control: which slot a key enters depends on the learned centroids; "
                     "the graph shows every slot it could enter")
    if pattern.is_causal:
        notes.append("causal: one memory node per query position stands for the n slots as that query reads them")
    return tuple(notes)


def memory_flops(pattern: Memory, chunked: bool = True) -> sympy.Expr:
    """Forward FLOPs per head of the torch kernel, symbolic in L, n, D (= Dv) and chunk C.

    Write: ``L n (2 D + 1)`` multiply-adds; read, bidirectional: ``2 L n D``; causal chunked:
    ``q S^T``, ``p S_v`` (``2 L n D``) plus the within-chunk ``tril(q k^T)``, ``(.) e``,
    ``p e^T``, ``(.) v`` (``2 L C (D + n)``). ``O(L n D)`` for fixed C.
    """
    if isinstance(pattern.control, WindowControl):
        pairs = N_SYM * L_SYM - N_SYM * (N_SYM - 1) / 2
        return 4 * pairs * D_SYM
    fma = L_SYM * N_SYM * (2 * D_SYM + 1) + 2 * L_SYM * N_SYM * D_SYM
    if pattern.is_causal and chunked:
        fma += 2 * L_SYM * C_SYM * (D_SYM + N_SYM)
    return 2 * fma


@register_cost(MEMORY)
def memory_symbolic_cost(pattern: Memory) -> SymbolicCost:
    """Closed-form cost: ``pairs`` counts token-slot edges (n writes and n reads per token), so
    ``flops = 4 pairs D = 8 L n D`` is the write + read work, ``O(L)`` for fixed n."""
    n = pattern.slots
    if isinstance(pattern.control, WindowControl):
        pairs = N_SYM * L_SYM - N_SYM * (N_SYM - 1) / 2
        assume = "L >= n"
    else:
        pairs = 2 * N_SYM * L_SYM
        assume = "any L"
    params = (("slots", n), ("causal", pattern.is_causal))
    if isinstance(pattern.control, LinformerControl):
        params += (("max_len", pattern.control.max_len),)
        assume = "L <= max_len"
    return SymbolicCost(_NAMES[type(pattern.control)], params, pairs, N_SYM, ((N_SYM, n),),
                        asymptotic_class(pairs.subs(N_SYM, n)), None, True, assume)
