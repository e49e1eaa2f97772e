"""Every notebook in experiments/ runs top to bottom in a Jupyter kernel (nbclient) at a small size and draws its
figures, each with a title and labelled axes.

The size is set the way papermill sets it: the cell tagged ``parameters`` is replaced by one that assigns the
notebook's own defaults with the test's values on top (a name the cell does not define is an error). A hook
installed in the kernel before the first cell checks every figure as it is rendered: it has a title, and every
axes that plots data labels its axes (the labels name their units)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

# notebook -> (parameters at test size, images it must show at least, animations it must show at least)
NOTEBOOKS: dict[str, tuple[dict, int, int]] = {
    "quickstart": ({"N": 30, "BLOCK_SIZES": [8, 16], "CLI_REQUESTS": 4}, 4, 0),
    "memory_waste": ({"N": 40, "PICTURE_REQUESTS": 4}, 5, 0),
    "block_size": ({"N": 30, "BLOCK_SIZES": [4, 16, 64]}, 3, 0),
    "sharing": ({"N": 8, "WIDTHS": [2, 4], "ANIMATION_STEPS": 6}, 4, 2),
    "preemption": ({"N": 40, "BLOCK_SIZES": [4, 16], "VICTIMS": ["newest", "largest"], "ANIMATION_STEPS": 6}, 4, 1),
    "prefix_caching": ({"N": 40, "PREFIX_LENS": [0, 80], "PICTURE_REQUESTS": 3}, 3, 0),
    "kernels": ({"CONTEXTS": [64, 128], "BATCH": 4, "ITERS": 2, "TRITON_CONTEXTS": [32], "E2E_REQUESTS": 2,
                 "TRITON_REQUESTS": 1, "REPEATS": 2}, 4, 0),
    "request_rate": ({"N": 40, "RATES": [1, 4], "ALLOCATORS": ["paged", "contiguous_max"]}, 3, 0),
    "your_own_part": ({}, 2, 0),
}

# runs in the kernel first: every figure rendered (shown inline or saved) is checked once
FIGURE_CHECK = '''
import matplotlib.backend_bases as _mbb

_FIGURE_PROBLEMS, _FIGURES_CHECKED = [], []


def _check_figure(fig):
    sup = fig._suptitle.get_text() if fig._suptitle is not None else ""
    axes = [ax for ax in fig.axes if ax.get_visible()]
    title = sup or next((ax.get_title() for ax in axes if ax.get_title()), "")
    if not title:  # the figure's title: a suptitle, or its (first) panel's title over a shared x axis
        _FIGURE_PROBLEMS.append(f"figure {len(_FIGURES_CHECKED)}: no title")
    for i, ax in enumerate(axes):
        where = f"figure {len(_FIGURES_CHECKED)} ({title!r:.60}), axes {i}"
        if not (ax.axison and ax.has_data()):
            continue
        shared_x = ax.get_shared_x_axes().get_siblings(ax)
        if not any(a.get_xlabel() for a in shared_x):
            _FIGURE_PROBLEMS.append(f"{where}: no x-axis label")
        if not ax.get_ylabel():
            _FIGURE_PROBLEMS.append(f"{where}: no y-axis label")


_print_figure = _mbb.FigureCanvasBase.print_figure


def _checked_print_figure(self, *args, **kwargs):
    fig = self.figure
    if not getattr(fig, "_pagedlab_checked", False):
        fig._pagedlab_checked = True
        _FIGURES_CHECKED.append(fig)
        _check_figure(fig)
    return _print_figure(self, *args, **kwargs)


_mbb.FigureCanvasBase.print_figure = _checked_print_figure
'''
REPORT = "import json\nprint(json.dumps({'problems': _FIGURE_PROBLEMS, 'figures': len(_FIGURES_CHECKED)}))"


def parameters(source: str) -> dict:
    """The ``NAME = literal`` assignments of a parameters cell."""
    values = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), \
            f"a parameters cell holds only NAME = literal lines, not {ast.unparse(node)!r}"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def with_parameters(nb, overrides: dict):
    """nb with its ``parameters`` cell's source replaced: the cell's own values, then ``overrides``."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "a notebook has exactly one cell tagged 'parameters'"
    values = parameters(cells[0].source)
    unknown = set(overrides) - set(values)
    assert not unknown, f"the parameters cell does not define {sorted(unknown)}"
    values.update(overrides)
    cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nb


def execute(name: str, overrides: dict, cwd: Path, monkeypatch: pytest.MonkeyPatch):
    nb = with_parameters(nbformat.read(EXPERIMENTS / f"{name}.ipynb", as_version=4), overrides)
    nb.cells.insert(0, nbformat.v4.new_code_cell(FIGURE_CHECK))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    # the kernel imports this checkout's pagedlab, writes nothing outside tmp, never touches the network
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("PAGEDLAB_RESULTS", str(cwd / "results"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_every_notebook_is_listed() -> None:
    assert sorted(p.stem for p in EXPERIMENTS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_and_draws_its_figures(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides, min_images, min_animations = NOTEBOOKS[name]
    if name == "quickstart":
        overrides = {**overrides, "RESULTS": str(tmp_path / "results")}
    nb = execute(name, overrides, tmp_path, monkeypatch)
    outs = outputs(nb)
    assert not [o for o in outs if o.get("output_type") == "error"]
    images = [o for o in outs if "image/png" in o.get("data", {})]
    animations = [o for o in outs if "Animation(frames" in o.get("data", {}).get("text/html", "")]
    assert len(images) >= min_images, f"{name}: {len(images)} figures shown, expected at least {min_images}"
    assert len(animations) >= min_animations, f"{name}: {len(animations)} animations, expected {min_animations}"
    report = json.loads(nb.cells[-1].outputs[0]["text"])
    assert report["figures"] >= min_images
    assert report["problems"] == [], report["problems"]


def test_parameters_are_replaced_not_edited() -> None:
    nb = nbformat.read(EXPERIMENTS / "quickstart.ipynb", as_version=4)
    defaults = parameters(next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source)
    cell = next(c for c in with_parameters(nb, {"N": 3}).cells if "parameters" in c.metadata.get("tags", []))
    assert parameters(cell.source) == {**defaults, "N": 3}
    with pytest.raises(AssertionError, match="does not define"):
        with_parameters(nbformat.read(EXPERIMENTS / "quickstart.ipynb", as_version=4), {"NOT_A_PARAMETER": 1})
