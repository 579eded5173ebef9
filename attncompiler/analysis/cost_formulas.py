"""Closed forms of allowed pairs and per-row maxima for the catalogue's mask patterns.

Each entry takes the catalogue constructor's parameters and returns a dict with ``pairs``
and ``row_max`` (sympy, in ``L`` and parameter symbols), the parameter ``values``, and
optionally ``asym`` (the large-L form used for the growth class), ``scale`` (a parameter the
paper ties to sqrt(L)), ``per_head``, ``exact`` (False for upper bounds) and ``assumptions``.
Derivations count, for each key-query distance or block, how many rows contain it; the tests
check every formula against exact counts at several L.
"""

from __future__ import annotations

import sympy as sp

from .symbols import L

w, n, l, c, b, h, g, r, d = sp.symbols("w n l c b h g r d", positive=True, integer=True)


def _half(x):
    return sp.Rational(1, 2) * x


def sliding_window(window: int, causal: bool):
    """Closed forms for a window of ``window`` tokens on each side (one side, self included, when causal)."""
    if causal:
        return {"pairs": L * (w + 1) - _half(w * (w + 1)), "row_max": w + 1, "values": {w: window},
                "assumptions": "L >= window + 1"}
    return {"pairs": L * (2 * w + 1) - w * (w + 1), "row_max": 2 * w + 1, "values": {w: window},
            "assumptions": "L >= 2 * window + 1"}


def causal():
    """Closed forms for the causal mask: ``L (L + 1) / 2`` pairs, at most ``L`` keys per row."""
    return {"pairs": _half(L * (L + 1)), "row_max": L}


def prefix_lm(prefix: int):
    """Closed forms for a prefix LM: bidirectional over the first ``prefix`` tokens, causal after them."""
    return {"pairs": n ** 2 + _half(L * (L + 1)) - _half(n * (n + 1)), "row_max": L, "values": {n: prefix},
            "assumptions": "L >= prefix"}


def document(lengths):
    """Closed forms for block-diagonal document masking with the given document ``lengths`` (tokens);
    the growth class assumes more documents of these lengths."""
    offs = [sum(lengths[:i]) for i in range(len(lengths))]
    seen = [sp.Min(li, sp.Max(0, L - o)) for li, o in zip(lengths, offs)]  # part of each document inside L
    mean_sq = sp.Rational(sum(x * x for x in lengths), sum(lengths))
    return {"pairs": sum(x ** 2 for x in seen), "row_max": sp.Max(*seen), "asym": L * mean_sq,
            "assumptions": "growth class: more documents of these lengths"}


def bigbird(block, window_blocks, global_blocks, random_blocks, seed, causal):
    """Closed forms for BigBird (window, global and random blocks of ``block`` tokens); None when causal.
    Exact without random blocks, an upper bound with them."""
    if causal:
        return None
    hv, gv = (window_blocks - 1) // 2, global_blocks
    # Window blocks inside the global rows/columns (counted once in the global region).
    inside = sum(min(i + hv, 10 ** 9) - max(i - hv, 0) + 1 for i in range(gv)) * 2
    inside -= sum(1 for i in range(gv) for j in range(gv) if abs(i - j) <= hv)
    nb = L / b
    blocks = nb * (2 * h + 1) - h * (h + 1) + 2 * g * nb - g ** 2 - inside + r * (nb - g)
    return {"pairs": b ** 2 * blocks, "row_max": L if gv else b * (2 * h + 1 + r),
            "values": {b: block, h: hv, g: gv, r: random_blocks}, "exact": random_blocks == 0,
            "assumptions": "L a multiple of block, L/block >= global + 2*window + random + 1; "
                           "upper bound when random blocks may coincide with window or global blocks"}


def longformer(window, dilation, global_indices, causal):
    """Closed forms for Longformer: a window of ``window`` tokens each side at ``dilation``, plus global
    tokens attending and attended everywhere; None when causal."""
    if causal:
        return None
    G = sorted(global_indices)
    rowwin = sum(window + 1 + min(window, i // dilation) for i in G)
    both = sum(1 for i in G for j in G if abs(i - j) <= window * dilation and (i - j) % dilation == 0)
    k = len(G)
    pairs = L * (2 * w + 1) - d * w * (w + 1) + 2 * k * L - k ** 2 - 2 * rowwin + both
    return {"pairs": pairs, "row_max": L if G else 2 * w + 1, "values": {w: window, d: dilation},
            "assumptions": "L > max(global) + window * dilation and L >= 2 * window * dilation + 1"}


def fixed(stride, summary, merged):
    """Closed forms for the Sparse Transformer fixed pattern (``stride``-token blocks, ``summary`` summary
    columns each); both heads merged into one mask, or the mean of the two heads."""
    m = L / l
    own = _half(L * (l + 1))
    summ = c * m * L - _half(c * l * m * (m - 1)) - _half(m * c * (2 * l - c - 1))
    values = {l: stride, c: summary}
    if merged:
        return {"pairs": own + c * (m * L - _half(l * m * (m + 1))), "row_max": l + c * (m - 1), "values": values,
                "scale": l, "assumptions": "L a multiple of stride"}
    return {"pairs": _half(own + summ), "per_head": (own, summ), "row_max": sp.Max(l, c * m),
            "asym": _half(own + summ), "values": values, "scale": l,
            "assumptions": "L a multiple of stride; pairs = mean over the two heads"}


def strided(stride, merged):
    """Closed forms for the Sparse Transformer strided pattern (local ``stride`` tokens plus every
    ``stride``-th key); both heads merged into one mask, or the mean of the two heads."""
    m = L / l
    local = L * (l + 1) - _half(l * (l + 1))
    summ = m * L - _half(l * m * (m - 1))
    values = {l: stride}
    if merged:
        return {"pairs": local + summ - (2 * L - l), "row_max": l + m - 1, "values": values, "scale": l,
                "assumptions": "L a multiple of stride, L >= 2 * stride"}
    return {"pairs": _half(local + summ), "per_head": (local, summ), "row_max": sp.Max(l + 1, m),
            "values": values, "scale": l, "assumptions": "L a multiple of stride, L > stride; mean over two heads"}


def logsparse(local):
    """Closed forms for LogSparse: ``local`` preceding tokens plus keys at power-of-two distances back,
    about ``L log2 L`` pairs."""
    K = sp.floor(sp.log(L - 1, 2))
    if local == 0:
        pairs = L * (K + 2) - (2 ** (K + 1) - 1)
        row = K + 2
    else:
        p = local.bit_length()  # powers of two <= local: 1, 2, ..., 2^(p-1)
        pairs = L * (local + 1) - local * (local + 1) // 2 + (K - p + 1) * L - (2 ** (K + 1) - 2 ** p)
        row = local + 1 + K - p + 1
    asym = pairs.subs(K, sp.log(L, 2))
    return {"pairs": pairs, "row_max": row, "asym": asym,
            "assumptions": "L >= 2" + (f" and L - 1 >= {local}" if local else "")}


def axial(cols, causal):
    """Closed forms for axial attention over an ``(L / cols) x cols`` grid: each query sees its row and
    its column (the earlier part of each when causal)."""
    rr = L / c
    if causal:
        return {"pairs": _half(L * (c + 1)) + rr * L - _half(c * rr * (rr - 1)) - L, "row_max": c + rr - 1,
                "values": {c: cols}, "scale": c, "assumptions": "L a multiple of cols"}
    return {"pairs": L * c + L ** 2 / c - L, "row_max": c + rr - 1, "values": {c: cols}, "scale": c,
            "assumptions": "L a multiple of cols"}


FORMULAS = {"sliding_window": sliding_window, "causal": causal, "prefix_lm": prefix_lm, "document": document,
            "bigbird": bigbird, "longformer": longformer, "fixed": fixed, "strided": strided,
            "logsparse": logsparse, "axial": axial}
