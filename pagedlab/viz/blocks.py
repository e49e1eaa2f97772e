"""Draw one :class:`~pagedlab.viz.snapshot.BlockSnapshot`: the block pool and the block tables.

One axes, two parts. On top the physical block pool as a grid (block id = row x width + column):
free blocks light grey, prefix-cached blocks (unreferenced, evictable) hatched green, used blocks
in the colour of the request that holds them, their filled slots solid and the unfilled tail
light. A block referenced more than once is outlined in black and labelled with its reference
count (``x3``). Below, one row per sequence: its logical blocks left to right, each showing the
physical block it maps to (same colour, the id written in it, an arrow to the pool when there are
few), shared blocks outlined, the unfilled tail of the last block light, and the blocks this step
copied on write outlined in red (copies for an eager fork: dashed orange). Swapped sequences
follow, with their host blocks (``h12``); the waiting queue is listed at the bottom.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pagedlab.viz._context import titled
from pagedlab.viz.snapshot import CACHED, FREE, USED, BlockSnapshot

FREE_COLOUR = "#ececec"
CACHED_COLOUR = "#cfe8d5"
RESERVED_COLOUR = "#b0b0b0"
HOST_COLOUR = "#9fa8b8"
COW_COLOUR = "#d62728"
FORK_COLOUR = "#ff7f0e"
SHARED_COLOUR = "black"
TEXT_LIMIT = 320  # pool cells beyond which block ids are not written
GAP = 1.6  # rows between the pool and the tables


@dataclass(frozen=True)
class Layout:
    """Fixed geometry, so that the frames of an animation line up."""

    width: int  # pool cells per row
    table_rows: int  # sequence rows drawn (more are summarised)
    table_cols: int  # logical blocks per row drawn

    @classmethod
    def of(cls, snapshots: Sequence[BlockSnapshot], max_seqs: int = 32) -> Layout:
        nb = max(s.num_blocks for s in snapshots)
        rows = max((len(s.seqs) for s in snapshots), default=0)
        cols = max((len(q.block_table) for s in snapshots for q in s.seqs), default=1)
        return cls(pool_width(nb), min(rows, max_seqs), max(cols, 1))


def figure_size(layout: Layout, num_blocks: int) -> tuple[float, float]:
    """(width, height) in inches for a layout: 0.42 in per block column, 0.34 in per row, room for
    the row labels, the legend on the right and the two-line title."""
    width_cells = max(layout.width, layout.table_cols)
    height_rows = -(-num_blocks // layout.width) + GAP + max(layout.table_rows, 1) + 1.5
    return min(max(4.5 + 0.42 * width_cells, 10.0), 22.0), min(1.9 + 0.34 * height_rows, 26.0)


def fit_margins(fig: Any) -> None:
    """Fixed margins in inches (row labels left, legend right, title on top), for frames that line up."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=1.45 / w, right=1 - 1.75 / w, top=1 - 0.85 / h, bottom=0.5 / h)


def pool_width(num_blocks: int) -> int:
    for w in (8, 16, 32, 64):
        if num_blocks <= 4 * w * w // 8:
            return w
    return 128


def request_colour(request_id: Any) -> Any:
    """A request's colour, the same in every frame (tab10 by id; other ids by a stable hash)."""
    import zlib

    import matplotlib

    k = request_id if isinstance(request_id, int) else zlib.crc32(str(request_id).encode())
    return matplotlib.colormaps["tab10"](k % 10)


def _colours(snap: BlockSnapshot) -> dict[Any, Any]:
    return {s.request_id: request_colour(s.request_id) for s in snap.seqs}


def _tint(colour: Any, amount: float = 0.72) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def draw_block_tables(snapshot: BlockSnapshot, ax: Any = None, *, layout: Layout | None = None,
                      arrows: bool | None = None, max_seqs: int = 32, title: str | None = None) -> Any:
    """Draw ``snapshot`` into ``ax`` (a new figure if None); returns the Axes.

    ``arrows``: draw an arrow from each logical block to its physical block (None: only when there are
    at most 12 of them). ``layout`` fixes the geometry (:meth:`Layout.of` over an animation's frames).
    ``title`` replaces the first title line (the second describes the run)."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle

    snap = snapshot
    layout = layout or Layout.of([snap], max_seqs)
    nb, bs, w = snap.num_blocks, snap.block_size, layout.width
    pool_rows = -(-nb // w)
    seq_rows = snap.seqs[:layout.table_rows]
    if ax is None:
        fig, ax = plt.subplots(figsize=figure_size(layout, nb))
        fit_margins(fig)
    colours = _colours(snap)
    fill = snap.fill()
    owners = snap.owners()
    cow_dst = {d for _, d in snap.cow_copies}
    fork_dst = {d for _, d in snap.fork_copies}

    reserved_by = {b: q for q in snap.resident if q.reservation
                   for b in range(q.reservation[0] + len(q.block_table), sum(q.reservation))}
    tints, solids, cached, reserved, shared, cow, fork, texts = [], [], [], [], [], [], [], []
    pad = 0.06

    def cell(x: float, y: float, frac: float, colour: Any, block: int | None, label: str | None,
             ref: int, hatch_cached: bool = False, hatch_reserved: bool = False) -> None:
        rect = (x + pad, y + pad)
        size = 1 - 2 * pad
        if hatch_cached:
            cached.append(Rectangle(rect, size, size))
        elif hatch_reserved:
            reserved.append((Rectangle(rect, size, size), _tint(colour, 0.8)))
        else:
            tints.append((Rectangle(rect, size, size), _tint(colour) if frac < 1 else colour))
            if 0 < frac < 1:
                solids.append((Rectangle(rect, size * frac, size), colour))
        if ref > 1:
            shared.append(Rectangle(rect, size, size))
        if block is not None and block in cow_dst:
            cow.append(Rectangle(rect, size, size))
        if block is not None and block in fork_dst:
            fork.append(Rectangle(rect, size, size))
        if label is not None:
            texts.append((x + 0.5, y + 0.5, label, ref))

    # -- the pool -----------------------------------------------------------------------------------
    write_ids = nb <= TEXT_LIMIT
    for b in range(nb):
        x, y = b % w, b // w
        state, ref = snap.states[b], snap.ref_counts[b]
        if state == FREE:
            cell(x, y, 1, FREE_COLOUR, b, str(b) if write_ids else None, 0)
        elif state == CACHED:
            cell(x, y, 1, CACHED_COLOUR, b, str(b) if write_ids else None, 0, hatch_cached=True)
        elif b in reserved_by:  # reserved by a contiguous allocator past its owner's table
            cell(x, y, 1, colours[reserved_by[b].request_id], b, str(b) if write_ids else None, 0,
                 hatch_reserved=True)
        else:
            holders = owners.get(b)
            colour = colours[holders[0].request_id] if holders else RESERVED_COLOUR
            frac = fill[b] / bs if holders else 1.0
            label = (f"{b}\n×{ref}" if ref > 1 else str(b)) if write_ids else (f"×{ref}" if ref > 1 else None)
            cell(x, y, frac, colour, b, label, ref)

    # -- the tables ---------------------------------------------------------------------------------
    y0 = pool_rows + GAP
    arrow_pairs = []
    resident_entries = sum(len(s.block_table) for s in seq_rows if not s.swapped)
    draw_arrows = arrows if arrows is not None else resident_entries <= 12
    for r, seq in enumerate(seq_rows):
        y = y0 + r
        for i, b in enumerate(seq.block_table[:layout.table_cols]):
            frac = min(bs, seq.num_tokens - i * bs) / bs
            if seq.swapped:
                ref = snap.host_ref_counts.get(b, 1)
                cell(i, y, frac, HOST_COLOUR, None, f"h{b}" if ref <= 1 else f"h{b}\n×{ref}", ref)
                continue
            ref = snap.ref_counts[b]
            cell(i, y, frac, colours[seq.request_id], b, str(b) if ref <= 1 else f"{b}\n×{ref}", ref)
            if draw_arrows:
                arrow_pairs.append(((i + 0.5, y + 0.1), (b % w + 0.5, b // w + 0.9), colours[seq.request_id]))

    ax.add_collection(PatchCollection([p for p, _ in tints], facecolors=[c for _, c in tints],
                                      edgecolors="white", linewidths=0.5, gid="blocks"))
    if solids:
        ax.add_collection(PatchCollection([p for p, _ in solids], facecolors=[c for _, c in solids],
                                          edgecolors="none", gid="filled"))
    if cached:
        ax.add_collection(PatchCollection(cached, facecolor=CACHED_COLOUR, edgecolor="#4a9a5c", hatch="...",
                                          linewidths=0.5, gid="cached"))
    if reserved:
        ax.add_collection(PatchCollection([p for p, _ in reserved], facecolors=[c for _, c in reserved],
                                          edgecolor="#777777", hatch="//", linewidths=0.4, gid="reserved"))
    if shared:
        ax.add_collection(PatchCollection(shared, facecolor="none", edgecolor=SHARED_COLOUR, linewidths=2.0,
                                          gid="shared"))
    if fork:
        ax.add_collection(PatchCollection(fork, facecolor="none", edgecolor=FORK_COLOUR, linewidths=2.2,
                                          linestyle="--", gid="fork_copy"))
    if cow:
        ax.add_collection(PatchCollection(cow, facecolor="none", edgecolor=COW_COLOUR, linewidths=2.6,
                                          gid="cow_copy"))
    small = 6 if w > 16 or layout.table_cols > 16 else 7
    for x, y, label, ref in texts:
        ax.text(x, y, label, ha="center", va="center", fontsize=small - (1 if "\n" in label else 0),
                fontweight="bold" if ref > 1 else "normal", color="#222222")
    for (x1, y1), (x2, y2), colour in arrow_pairs:
        ax.annotate("", xy=(x2, y2), xytext=(x1, y1),
                    arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.7, "alpha": 0.55,
                                "shrinkA": 0, "shrinkB": 0})

    # -- axes, labels, legend -----------------------------------------------------------------------
    width_cells = max(w, layout.table_cols)
    bottom = y0 + max(layout.table_rows, 1) + 1.2
    ax.set_xlim(-0.2, width_cells + 0.2)
    ax.set_ylim(bottom, -0.9)
    ax.text(0, -0.35, f"physical block pool ({nb} blocks of {bs} token slots; id = row × {w} + column)",
            fontsize=8, va="bottom", ha="left")
    ax.text(0, y0 - 0.35, "block tables: each sequence's logical blocks → physical block id (h = host block)",
            fontsize=8, va="bottom", ha="left")
    notes = []
    if len(snap.seqs) > len(seq_rows):
        notes.append(f"+{len(snap.seqs) - len(seq_rows)} more sequences not drawn")
    if snap.waiting:
        shown = ", ".join(map(str, snap.waiting[:12])) + (" …" if len(snap.waiting) > 12 else "")
        notes.append(f"waiting: req {shown}")
    if snap.swapped:
        notes.append(f"swapped groups: req {', '.join(map(str, snap.swapped))}")
    if snap.num_preempted:
        notes.append(f"{snap.num_preempted} preempted this step")
    if not snap.seqs:
        notes.insert(0, "no sequence holds blocks")
    if notes:
        ax.text(0, y0 + len(seq_rows) + 0.25, "; ".join(notes), fontsize=8, va="top", ha="left", color="#444444")
    ticks = [r + 0.5 for r in range(pool_rows)] + [y0 + r + 0.5 for r in range(len(seq_rows))]
    labels = [f"{r * w}–{min(nb, (r + 1) * w) - 1}" for r in range(pool_rows)]
    labels += [s.label + (" (swapped)" if s.swapped else "") for s in seq_rows]
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xticks([c + 0.5 for c in range(width_cells)], [str(c) for c in range(width_cells)], fontsize=6)
    ax.tick_params(length=0)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(f"column: physical block id mod {w} (pool) · logical block index (tables), in blocks",
                  fontsize=8)
    ax.set_ylabel("pool rows (block ids) · sequences", fontsize=8)
    s = snap.summary()
    what = title or (f"KV blocks at step {snap.step} (t = {snap.time:.3g} s): {s['used']} used, {s['shared']} "
                     f"shared, {s['cached']} cached, {s['free']} free of {nb} blocks × {bs} tokens")
    ax.set_title(titled(what, snap.context), fontsize=9)
    handles = [
        Patch(facecolor=FREE_COLOUR, label="free"),
        Patch(facecolor=CACHED_COLOUR, edgecolor="#4a9a5c", hatch="...", label="cached (prefix LRU)"),
        Patch(facecolor="#4c72b0", label="used (colour: request)"),
        Patch(facecolor=_tint((0.30, 0.45, 0.69)), label="unfilled tail"),
        Patch(facecolor="none", edgecolor=SHARED_COLOUR, linewidth=2, label="shared (×ref count)"),
        Patch(facecolor="none", edgecolor=COW_COLOUR, linewidth=2.4, label="copy-on-write copy"),
        Patch(facecolor="none", edgecolor=FORK_COLOUR, linewidth=2, linestyle="--", label="fork copy"),
        Patch(facecolor=HOST_COLOUR, label="swapped (host)"),
    ]
    if any(s.reservation is not None for s in snap.seqs):  # a contiguous layout reserves past its tables
        handles.insert(3, Patch(facecolor="#dddddd", edgecolor="#777777", hatch="//",
                                label="reserved (contiguous)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    return ax


def draw_step(snapshots: Sequence[BlockSnapshot], step: int, ax: Any = None, **kw: Any) -> Any:
    """Draw the snapshot of engine step ``step`` (the recorded one at or before it)."""
    before = [s for s in snapshots if s.step <= step]
    if not before:
        raise ValueError(f"no snapshot at or before step {step}; recorded steps: "
                         f"{snapshots[0].step}..{snapshots[-1].step}" if snapshots else "no snapshots")
    return draw_block_tables(before[-1], ax, **kw)


__all__ = ["CACHED", "FREE", "USED", "Layout", "draw_block_tables", "draw_step"]
