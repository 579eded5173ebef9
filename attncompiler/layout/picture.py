"""Pictures of patterns and layouts: a text grid for the terminal, a PNG with matplotlib.

A picture is a grid of cells, each covering a rectangle of (query, key) positions and marked
full (every pair allowed), partial (some) or empty (none). A pattern is pictured through its
analytic layout, so a million-token pattern draws as fast as its layout builds: when a cell is
no larger than the layout block, the layout is built with the cell as its block (exact at that
resolution); otherwise the layout's blocks are merged into cells (a cell is full when all its
blocks are full, empty when none is present).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PatternError, UnsupportedError
from .block_sets import EMPTY, FULL, PARTIAL, pairs_from_ranges
from .block_layout import BlockLayout
from ..dsl.pattern import Family, Pattern

# Characters for empty / partial / full cells.
ASCII_CHARS = ".+#"
UNICODE_CHARS = "·▒█"


@dataclass(frozen=True)
class CellGrid:
    """A downsampled picture: ``kinds[r, c]`` is EMPTY, PARTIAL or FULL.

    Attributes:
        kinds: uint8 array ``[rows, cols]``.
        cell_m, cell_n: query / key positions per cell (the last row/column may be shorter).
        q_len, kv_len: the pictured lengths.
    """

    kinds: np.ndarray
    cell_m: int
    cell_n: int
    q_len: int
    kv_len: int


def cell_grid(obj: Pattern | BlockLayout, seq_len: int | None = None, *, kv_len: int | None = None,
              width: int = 64, block: int = 64, batch: int = 0, head: int = 0) -> CellGrid:
    """The full / partial / empty grid of a mask pattern or a layout, at most ``width`` columns.

    Args:
        obj: a mask pattern (then ``seq_len`` is required) or a :class:`BlockLayout`.
        seq_len: query length when ``obj`` is a pattern; ``kv_len`` defaults to it.
        width: the most cells per row (and per column).
        block: layout block used for a pattern when cells are larger than it.
        batch, head: which (batch, head) to draw when the pattern differs across them.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise PatternError(f"width={width!r} must be a positive integer")
    if isinstance(obj, BlockLayout):
        return _merge_blocks(obj, width, batch, head)
    if not isinstance(obj, Pattern):
        raise PatternError(f"cannot draw {type(obj).__name__} {obj!r}; pass a mask pattern or a BlockLayout")
    if obj.family != Family.MASK:
        raise UnsupportedError(
            f"only mask patterns have a picture; {obj!r} is a {obj.family} pattern "
            "(print ac.compile(pattern).program to see its stages)")
    if seq_len is None:
        raise PatternError(f"drawing pattern {obj!r} needs seq_len (the sequence length to draw it at)")
    kv_len = seq_len if kv_len is None else kv_len
    cell_m, cell_n = -(-seq_len // width), -(-kv_len // width)
    heads, batches = head + 1, batch + 1
    if max(cell_m, cell_n) <= block:  # one layout block per cell: exact at this resolution
        lay = obj.layout(seq_len, kv_len, cell_m, cell_n, batch=batches, heads=heads)
        return _merge_blocks(lay, width, batch, head)
    lay = obj.layout(seq_len, kv_len, block, block, batch=batches, heads=heads)
    return _merge_blocks(lay, width, batch, head)


def _merge_blocks(lay: BlockLayout, width: int, batch: int, head: int) -> CellGrid:
    """Merge the layout's blocks into at most ``width`` cells per side."""
    g = lay.geom
    fm, fn = -(-g.nqb // width), -(-g.nkb // width)  # blocks per cell
    rows, cols = -(-g.nqb // fm), -(-g.nkb // fn)
    grp = lay.group_for(batch, head)
    present = np.zeros((rows, cols), dtype=np.int64)
    full = np.zeros((rows, cols), dtype=np.int64)
    # full ranges: each adds its overlap with every cell column it crosses (never expanded)
    s, e = grp.range_start, grp.range_end
    which, cell_c = pairs_from_ranges(np.arange(len(s)), s // fn, (e - 1) // fn)
    overlap = np.minimum(e[which], (cell_c + 1) * fn) - np.maximum(s[which], cell_c * fn)
    np.add.at(full, (grp.range_rows[which] // fm, cell_c), overlap)
    present += full
    np.add.at(present, (grp.part_rows // fm, grp.part_cols // fn), 1)
    # Blocks per cell: the last cell row/column may hold fewer blocks.
    per_r = np.minimum(fm, g.nqb - np.arange(rows) * fm)
    per_c = np.minimum(fn, g.nkb - np.arange(cols) * fn)
    capacity = per_r[:, None] * per_c[None, :]
    kinds = np.where(present == 0, EMPTY, np.where(full == capacity, FULL, PARTIAL)).astype(np.uint8)
    return CellGrid(kinds, fm * g.block_m, fn * g.block_n, g.q_len, g.kv_len)


def render_text(obj: Pattern | BlockLayout, seq_len: int | None = None, *, kv_len: int | None = None,
                width: int = 64, block: int = 64, batch: int = 0, head: int = 0,
                charset: str = ASCII_CHARS, legend: bool = True) -> str:
    """A text picture of a mask pattern or a layout (rows = query positions, columns = keys).

    Args:
        obj: a mask pattern (with ``seq_len``) or a :class:`BlockLayout`.
        seq_len, kv_len: lengths to draw a pattern at.
        width: the most characters per row; the picture is downsampled to fit.
        block: layout block size used for large patterns (see :func:`cell_grid`).
        batch, head: which (batch, head) to draw.
        charset: three characters for empty, partial and full cells (``UNICODE_CHARS`` reads
            better on terminals that support it).
        legend: append a line explaining the characters and the cell size.

    Returns:
        The picture as lines joined by newlines (no trailing newline).
    """
    if not isinstance(charset, str) or len(charset) != 3:
        raise PatternError(f"charset={charset!r} must be three characters: empty, partial, full")
    grid = cell_grid(obj, seq_len, kv_len=kv_len, width=width, block=block, batch=batch, head=head)
    table = np.array(list(charset))
    lines = ["".join(row) for row in table[grid.kinds]]
    if legend:
        e, p, f = charset
        lines.append(f"{f} full  {p} partial  {e} empty; one character = {grid.cell_m} query x {grid.cell_n} key "
                     f"positions; {grid.q_len} queries (rows) x {grid.kv_len} keys (columns)")
    return "\n".join(lines)


def save_png(obj: Pattern | BlockLayout, path: str, seq_len: int | None = None, *, kv_len: int | None = None,
             width: int = 512, block: int = 64, batch: int = 0, head: int = 0, title: str | None = None) -> str:
    """Save a picture of a mask pattern or a layout as a PNG (needs matplotlib).

    Args:
        obj, seq_len, kv_len, block, batch, head: as in :func:`render_text`.
        path: the file to write.
        width: the most cells per side of the image.
        title: figure title (default: the pattern's repr).

    Returns:
        ``path``.

    Raises:
        UnsupportedError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:
        raise UnsupportedError(
            f"saving a PNG needs matplotlib ({e}); install it with `pip install matplotlib` "
            "(or `pip install attncompiler[plot]`), or use render_text() for a text picture") from None
    grid = cell_grid(obj, seq_len, kv_len=kv_len, width=width, block=block, batch=batch, head=head)
    pattern = obj.pattern if isinstance(obj, BlockLayout) else obj
    fig, ax = plt.subplots(figsize=(6, 6 * grid.kinds.shape[0] / max(grid.kinds.shape[1], 1) + 0.6))
    colors = ["#ffffff", "#9ecae1", "#08519c"]  # empty, partial, full
    cmap = ListedColormap(colors)
    ax.imshow(grid.kinds, cmap=cmap, vmin=0, vmax=2, interpolation="nearest",
              extent=(0, grid.kv_len, grid.q_len, 0))
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title if title is not None else repr(pattern)[:80], fontsize=8)
    cell = f"{grid.cell_m} x {grid.cell_n} positions per cell"
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#808080", label=name)
                       for c, name in zip(colors, ("no pair visible", "some pairs visible",
                                                   "every pair visible"))],
              title=cell, title_fontsize=7, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
