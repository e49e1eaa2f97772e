"""The result of a run: its summary, per-step and per-sequence tables, and its config.

:meth:`RunResult.save` never leaves a half-written run that looks finished: every file is written
under a temporary name, fsynced and renamed into place, and ``finished.json`` (the marker) is
written last. It records the overrides, the sha256 of the resolved config, each file's size and
sha256, and the time; :func:`check_run` verifies a run dir against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pagedlab.engine.metrics import HEADLINE

MARKER = "finished.json"
RESULT_FILES = ("summary.json", "steps.parquet", "requests.parquet", "config.json")


@dataclass
class RunResult:
    """`summary` (keys in docs/metrics.md), `steps` (one row per engine step), `requests` (one row per
    sequence, with `request_id` and `output_token_ids`), and the resolved `config`."""

    summary: dict[str, Any]
    steps: pd.DataFrame
    requests: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path, overrides: Sequence[str] = ()) -> Path:
        """Write summary.json, steps.parquet, requests.parquet, config.json, then finished.json, each
        atomically. A failure part-way leaves no marker: the dir does not count as a finished run."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).unlink(missing_ok=True)
        files = {
            "summary.json": atomic_write(out / "summary.json", _json_writer(self.summary)),
            "steps.parquet": atomic_write(out / "steps.parquet", lambda p: self.steps.to_parquet(p, index=False)),
            "requests.parquet": atomic_write(out / "requests.parquet",
                                             lambda p: self.requests.to_parquet(p, index=False)),
            "config.json": atomic_write(out / "config.json", _json_writer(self.config)),
        }
        marker = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "overrides": list(overrides),
                  "config_sha256": config_hash(self.config), "files": files}
        atomic_write(out / MARKER, _json_writer(marker))
        return out

    def __repr__(self) -> str:
        s = self.summary
        repeats = int(s.get("repeats", 1) or 1)

        def shown(k: str) -> str:  # a timed key measured over repeats carries its spread
            std = s.get(f"{k}_std")
            return f"{_fmt(s[k])} ± {std:.2g}" if repeats > 1 and isinstance(std, float) else _fmt(s[k])

        head = ", ".join(f"{k}={shown(k)}" for k in HEADLINE if k in s)
        more = f", repeats={repeats}" if repeats > 1 else ""
        return f"RunResult({head}; steps={len(self.steps)}, sequences={len(self.requests)}{more})"

    def _repr_html_(self) -> str:
        table = pd.Series(self.summary, name="value").to_frame().to_html()
        return f"<b>RunResult</b> ({len(self.steps)} steps, {len(self.requests)} sequences){table}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _json_writer(obj: Any) -> Callable[[Path], None]:
    return lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def config_hash(config: Any) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> dict[str, Any]:
    """Write via ``write(tmp)`` to a temporary name in path's dir, fsync, rename onto path;
    returns ``{"size", "sha256"}``. On any failure the temporary file is removed, path untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        info = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return info


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def has_results(run_dir: str | Path) -> bool:
    """Whether run_dir holds a finished marker or any result file."""
    d = Path(run_dir)
    return any((d / name).exists() for name in (MARKER, *RESULT_FILES))


def stored_config(run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """(file name, config) of the config a run dir holds: ``.hydra/config.yaml``, else ``config.json``."""
    import yaml

    if (run_dir / ".hydra" / "config.yaml").is_file():
        return ".hydra/config.yaml", yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    if (run_dir / "config.json").is_file():
        return "config.json", json.loads((run_dir / "config.json").read_text())
    return None


def check_run(run_dir: str | Path) -> str | None:
    """Why run_dir is not a valid finished run (no marker, a file missing or of the wrong size or
    content, an unreadable summary, a config that is not the one the marker records), or None."""
    d = Path(run_dir)
    try:
        marker = json.loads((d / MARKER).read_text())
    except FileNotFoundError:
        return f"no {MARKER} (unfinished, interrupted or failed run)"
    except (OSError, ValueError) as exc:
        return f"{MARKER} unreadable ({exc})"
    for name, info in (marker.get("files") or {}).items():
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info.get("size"):
            return f"{name} is {p.stat().st_size} bytes, {MARKER} says {info.get('size')}"
        if "sha256" in info and file_sha256(p) != info["sha256"]:
            return f"{name} does not have the content {MARKER} records (changed after the run)"
    try:
        json.loads((d / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        return f"summary.json unreadable ({exc})"
    try:
        stored = stored_config(d)
    except (OSError, ValueError) as exc:
        return f"config unreadable ({exc})"
    name, config = stored or ("no config", {})
    if config_hash(config) != marker.get("config_sha256"):
        return f"{name} is not the config {MARKER} records (rewritten by a later run?)"
    return None
