"""The block tables over the steps of a run, as an animation: HTML for a notebook, a GIF for a README.

:func:`animate_block_tables` draws one recorded :class:`~pagedlab.viz.snapshot.BlockSnapshot` per
frame on a fixed layout (the largest pool row width, sequence count and table length over all
frames), so allocation, sharing, copy-on-write, swapping and freeing show as changes in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pagedlab.viz.blocks import Layout, draw_block_tables, figure_size, fit_margins
from pagedlab.viz.snapshot import BlockSnapshot


class HTML(str):
    """HTML text that a notebook renders (``_repr_html_``) and that is still a ``str``."""

    def _repr_html_(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's text/plain: not the whole page again
        printer.text(f"<animation: {len(self) / 1e6:.1f} MB of HTML>")


def animate_block_tables(snapshots: Sequence[BlockSnapshot], interval: int = 400, *, max_seqs: int = 32,
                         arrows: bool | None = False, dpi: int = 80) -> Any:
    """A ``matplotlib.animation.FuncAnimation`` with one frame per snapshot, ``interval`` ms apart.

    The figure is not registered with pyplot (so a notebook does not also show its last frame):
    show it with :func:`to_html`, save it with :func:`save_gif` or ``anim.save``."""
    from matplotlib.animation import FuncAnimation
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frames = list(snapshots)
    if not frames:
        raise ValueError("no snapshots to animate: record some with BlockTableRecorder (or record_run) first")
    layout = Layout.of(frames, max_seqs)
    fig = Figure(figsize=figure_size(layout, max(s.num_blocks for s in frames)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fit_margins(fig)

    def draw(i: int) -> list[Any]:
        ax.clear()
        draw_block_tables(frames[i], ax, layout=layout, arrows=arrows, max_seqs=max_seqs)
        return []

    anim = FuncAnimation(fig, draw, frames=len(frames), interval=interval, blit=False, repeat=True)
    anim.snapshots = frames  # type: ignore[attr-defined]
    anim.draw_frame = draw  # type: ignore[attr-defined]
    return anim


def _write(anim: Any, writer: Any, path: Path, dpi: int | None) -> None:
    """Save through ``writer``. An animation of ours is drawn once per frame (``anim.save`` draws each
    frame twice on Agg: once for the frame, once more to grab it)."""
    draw = getattr(anim, "draw_frame", None)
    if draw is None:
        anim.save(path, writer=writer, dpi=dpi)
        return
    fig = anim._fig
    anim._draw_was_started = True  # rendered: no "deleted without rendering" warning
    with writer.saving(fig, path, dpi if dpi is not None else fig.dpi):
        for i in range(len(anim.snapshots)):
            draw(i)
            writer.grab_frame()


def _fps(anim: Any, fps: float | None) -> float:
    return fps if fps is not None else 1000.0 / getattr(anim, "_interval", 400)


def to_html(anim: Any, fps: float | None = None, embed_limit_mb: float = 50.0) -> HTML:
    """The animation as self-contained HTML with play controls (as ``anim.to_jshtml()``), which a
    notebook displays; ``fps`` defaults to 1000 / the animation's interval."""
    import tempfile

    import matplotlib
    from matplotlib.animation import HTMLWriter

    with tempfile.TemporaryDirectory() as tmp, matplotlib.rc_context({"animation.embed_limit": embed_limit_mb}):
        path = Path(tmp, "animation.html")
        _write(anim, HTMLWriter(fps=_fps(anim, fps), embed_frames=True, default_mode="loop"), path, None)
        return HTML(path.read_text())


def save_gif(anim: Any, path: str | Path, fps: float | None = None, dpi: int | None = None) -> Path:
    """Write the animation as a GIF (Pillow); ``fps`` defaults to 1000 / the animation's interval."""
    from matplotlib.animation import PillowWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(anim, PillowWriter(fps=_fps(anim, fps)), path, dpi)
    return path


__all__ = ["HTML", "animate_block_tables", "save_gif", "to_html"]
