"""Reading trace files (JSONL, JSON, CSV) into raw rows, and the one error a bad file raises.

Rows come back as raw values (text for CSV); :mod:`pagedlab.workloads.trace` checks every cell.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv")
MAX_LISTED = 20  # problems listed in one TraceError; the rest are counted
_ROW = re.compile(r"row (\d+)")

Row = tuple[int | None, dict[str, Any] | None]  # (line or None, column -> raw value; None: unreadable)


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file and lists every problem."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = sorted(problems, key=_row_of)  # the file's own problems first, then by row
        listed = self.problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            listed.append(f"... and {len(problems) - MAX_LISTED} more")
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"Invalid trace file {self.path!r} (workload.path), {count}:\n  " + "\n  ".join(listed))

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:  # picklable across worker processes
        return TraceError, (self.path, self.problems)


def _row_of(problem: str) -> int:
    match = _ROW.match(problem)
    return int(match.group(1)) if match else 0


def where_in_file(number: int, line: int | None) -> str:
    """``row N``, with ``(line L)`` where the file's line differs."""
    return f"row {number}" + (f" (line {line})" if line is not None and line != number else "")


def show(v: Any) -> str:
    """A value as a message shows it: JSON, cut at 60 characters."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."



def _read_jsonl(path: Path, problems: list[str]) -> list[Row]:
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            line = line.rstrip()
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                where = where_in_file(len(rows) + 1, line_no)
                at = f" at column {exc.pos + 1}" if isinstance(exc, json.JSONDecodeError) else ""
                problems.append(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)}{at}): {line[:60]}{'...' if len(line) > 60 else ''}")
                rows.append((line_no, None))
                continue
            rows.append((line_no, _record(obj, len(rows) + 1, line_no, problems)))
    return rows


def _read_json(path: Path, problems: list[str]) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as exc:
        hint = " (one object per line? then name the file .jsonl)" if "Extra data" in str(exc) else ""
        problems.append(f"not valid JSON: {exc}{hint}")
        return []
    if isinstance(data, list):
        return [(None, _record(obj, i, None, problems)) for i, obj in enumerate(data, 1)]
    if isinstance(data, dict) and data and all(isinstance(c, (list, dict)) for c in data.values()):
        return [(None, r) for r in _columns_to_records(data, problems)]
    problems.append("expected a JSON list of row objects, or an object of columns; got "
                    f"{show(data)}")
    return []


def _columns_to_records(data: dict[str, Any], problems: list[str]) -> list[dict[str, Any]]:
    lengths = {len(c) for c in data.values() if isinstance(c, list)}
    if len(lengths) > 1:
        problems.append(f"the columns have different lengths {sorted(lengths)}; expected one value per row in each")
        return []
    if lengths:
        if any(isinstance(c, dict) for c in data.values()):
            problems.append("expected every column as a list, or every column as an {index: value} object")
            return []
        return [{k: c[i] for k, c in data.items()} for i in range(lengths.pop())]
    index = list(dict.fromkeys(i for c in data.values() for i in c))
    return [{k: c[i] for k, c in data.items() if i in c} for i in index]


def _record(obj: Any, number: int, line: int | None, problems: list[str]) -> dict[str, Any] | None:
    if isinstance(obj, dict):
        return obj
    problems.append(f"{where_in_file(number, line)}: expected a JSON object like {{\"prompt_len\": 16}}; "
                    f"got {show(obj)}")
    return None


def _read_csv(path: Path, problems: list[str]) -> list[Row]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long prompt_token_ids cells
    rows: list[Row] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return rows
            names = [h.strip() for h in header]
            for name in sorted({n for n in names if names.count(n) > 1}):
                problems.append(f"header (line 1): column {name!r} appears more than once")
            last = reader.line_num
            for fields in reader:
                line, last = last + 1, reader.line_num
                if not fields:  # blank line
                    continue
                if len(fields) != len(names):
                    problems.append(f"{where_in_file(len(rows) + 1, line)}: has {len(fields)} fields, expected "
                                    f"{len(names)} as in the header")
                    rows.append((line, None))
                    continue
                rows.append((line, dict(zip(names, fields))))
        except csv.Error as exc:
            problems.append(f"line {reader.line_num}: not valid CSV ({exc})")
    return rows


READERS: dict[str, Callable[[Path, list[str]], list[Row]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}


def read_trace(path: str | Path) -> list[Row]:
    """The rows of a trace file as raw values; raise TraceError if it cannot be read."""
    rows, problems = read_rows(Path(path))
    if problems:
        raise TraceError(path, problems)
    return rows


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """Rows and the problems met reading them; raise TraceError at once for a file with no rows."""
    if not path.is_file():
        raise TraceError(path, ["the file does not exist" if not path.exists() else "not a file"])
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise TraceError(path, [f"file type {path.suffix or '(none)'!r} is not allowed: expected "
                                + ", ".join(SUFFIXES)])
    problems: list[str] = []
    try:
        rows = READERS[suffix](path, problems)
    except UnicodeDecodeError as exc:
        raise TraceError(path, [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise TraceError(path, [f"cannot be read ({exc.strerror})"]) from None
    if not rows:
        raise TraceError(path, problems or ["the file has no rows; expected one request per row"])
    return rows, problems
