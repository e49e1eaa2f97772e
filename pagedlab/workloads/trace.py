"""`workload=trace`: requests from a JSONL, JSON or CSV file.

Columns: `prompt_token_ids` (a list, or a JSON list in CSV) or `prompt_len` (random tokens), and
optionally `max_tokens`, `arrival_time`, `request_id`, `n`, `beam_width`, `temperature`, `top_p`,
`top_k`, `seed`, `ignore_eos`. Missing values (JSON null or an absent key, an empty CSV cell) take
the `sampling` defaults; a row without `request_id` is identified by its 0-based index.

A `.jsonl` file holds one JSON object per line; a `.json` file a list of such objects, or an object
of columns (`{"prompt_len": [5, 7]}` or pandas' `{"prompt_len": {"0": 5, "1": 7}}`); a `.csv` file
a header row of column names. Every cell is checked; a file that breaks any rule raises one
:class:`TraceError` that lists each problem with its row, column, value and rule.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pagedlab.engine.request import Request, SamplingParams
from pagedlab.errors import BadArgument
from pagedlab.workloads.trace_files import Row, TraceError, read_rows, show, where_in_file

COLUMNS = ("prompt_token_ids", "prompt_len", "max_tokens", "arrival_time", "request_id", "n", "beam_width",
           "temperature", "top_p", "top_k", "seed", "ignore_eos")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT_TEXT = re.compile(r"[+-]?\d+")
_NUMBER_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)

class _Bad(Exception):
    """A value its column refuses; the optional text says why beyond the column's rule."""


# --------------------------------------------------------------------------- cell parsers
def _as_int(v: Any) -> int:
    """An int64 from an int, an integral float, or their text; never from a boolean."""
    if isinstance(v, str):
        text = v.strip()
        if _INT_TEXT.fullmatch(text):
            try:
                v = int(text)
            except ValueError:  # more digits than Python converts
                raise _Bad("it has too many digits") from None
        elif _NUMBER_TEXT.fullmatch(text):
            v = float(text)
        else:
            raise _Bad()
    if isinstance(v, bool):
        raise _Bad("a boolean is not a number")
    if isinstance(v, float):
        if not v.is_integer():  # also NaN and infinities
            raise _Bad()
        v = int(v)
    if not isinstance(v, int):
        raise _Bad()
    if not INT64_MIN <= v <= INT64_MAX:
        raise _Bad("it does not fit in 64 bits")
    return v


def _as_float(v: Any) -> float:
    """A float from a number or its text (NaN and infinities pass: the column's rule decides)."""
    if isinstance(v, str):
        if not _NUMBER_TEXT.fullmatch(v.strip()):
            raise _Bad()
        return float(v)
    if isinstance(v, bool):
        raise _Bad("a boolean is not a number")
    if not isinstance(v, (int, float)):
        raise _Bad()
    try:
        return float(v)
    except OverflowError:
        raise _Bad("it is too large") from None


def _as_bool(v: Any) -> bool:
    """true/false, 1/0, or their text in any case."""
    if isinstance(v, str):
        text = v.strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
        raise _Bad()
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise _Bad()


def _tokens(v: Any, vocab_size: int) -> list[int]:
    """A non-empty list of ints in the vocabulary, from a list or its JSON text."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError) as exc:
            raise _Bad(f"not valid JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(v, list):
        raise _Bad(f"got a {type(v).__name__}" if not isinstance(v, (int, float)) else None)
    if not v:
        raise _Bad("the list is empty")
    if set(map(type, v)) != {int}:  # C-speed check; bools and floats fail it too
        i, t = next((i, t) for i, t in enumerate(v) if type(t) is not int)
        raise _Bad(f"item {i} is {show(t)}")
    if min(v) < 0 or max(v) >= vocab_size:
        i, t = next((i, t) for i, t in enumerate(v) if not 0 <= t < vocab_size)
        raise _Bad(f"item {i} is {t}")
    return v


Check = tuple[Callable[[Any], Any], Callable[[Any], bool], str]
CHECKS: dict[str, Check] = {
    "prompt_len": (_as_int, lambda v: v >= 1, "an integer >= 1"),
    "max_tokens": (_as_int, lambda v: v >= 1, "an integer >= 1"),
    "n": (_as_int, lambda v: v >= 1, "an integer >= 1"),
    "beam_width": (_as_int, lambda v: v >= 1, "an integer >= 1"),
    "top_k": (_as_int, lambda v: v >= 0 or v == -1, "an integer >= 0, or -1 (no top-k cut)"),
    "seed": (_as_int, lambda v: v >= 0, "an integer in 0..2**63-1"),
    "temperature": (_as_float, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "top_p": (_as_float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "arrival_time": (_as_float, lambda v: 0 <= v < math.inf, "a finite number >= 0 (seconds)"),
    "ignore_eos": (_as_bool, lambda v: True, "a boolean: true, false, 1 or 0"),
}
SAMPLING = ("max_tokens", "n", "beam_width", "temperature", "top_p", "top_k", "seed", "ignore_eos")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


# --------------------------------------------------------------------------- validation
def _check_columns(rows: list[Row], problems: list[str]) -> set[str]:
    first: dict[str, int] = {}
    for number, (_, record) in enumerate(rows, 1):
        for key in record or ():
            first.setdefault(key, number)
    unknown = [k for k in first if k not in COLUMNS]
    if unknown:
        def name(k: str) -> str:
            close = difflib.get_close_matches(k, COLUMNS, n=1)
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    " (an unnamed column: a pandas index? write the file with index=False)" if not k else "")
            return repr(k) + hint + (f" from row {first[k]}" if first[k] > 1 else "")
        problems.append(f"unknown column{'s' if len(unknown) > 1 else ''} " + ", ".join(map(name, unknown))
                        + "; allowed columns: " + ", ".join(COLUMNS))
    if "prompt_token_ids" not in first and "prompt_len" not in first:
        problems.append(f"expected a 'prompt_token_ids' or 'prompt_len' column; found {list(first)}")
    return set(first)


def _check_row(record: dict[str, Any], where: str, vocab_size: int, problems: list[str]) -> dict[str, Any] | None:
    values: dict[str, Any] = {}
    ok = True
    for col, raw in record.items():
        if _missing(raw) or (col not in CHECKS and col != "prompt_token_ids"):
            continue
        try:
            if col == "prompt_token_ids":
                values[col] = _tokens(raw, vocab_size)
                continue
            parse, allowed, _ = CHECKS[col]
            v = parse(raw)
            if not allowed(v):
                raise _Bad()
            values[col] = v
        except _Bad as bad:
            ok = False
            rule = (f"a non-empty list of integer token ids in 0..{vocab_size - 1} (vocab_size={vocab_size})"
                    if col == "prompt_token_ids" else CHECKS[col][2])
            why = f"; {bad.args[0]}" if bad.args and bad.args[0] else ""
            problems.append(f"{where}: {col}={show(raw)} is not allowed: expected {rule}{why}")
    return values if ok else None


def _request_id(raw: Any, int_text: bool) -> int | str:
    if isinstance(raw, str):
        text = raw.strip()
        return int(text) if int_text else text
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise _Bad()


def trace_requests(path: str | Path, *, seed: int, vocab_size: int, defaults: SamplingParams,
                   max_model_len: int | None = None) -> list[Request]:
    """The requests of a trace file; raise TraceError listing every problem (prompts longer than
    `max_model_len` together with max_tokens are one)."""
    rows, problems = read_rows(Path(path))
    columns = _check_columns(rows, problems)
    has_prompt_column = bool(columns & {"prompt_token_ids", "prompt_len"})
    ids = [r["request_id"] for _, r in rows if r and not _missing(r.get("request_id"))]
    int_text = (Path(path).suffix.lower() == ".csv"  # CSV ids are numbers if all of them are, as in pandas
                and all(_INT_TEXT.fullmatch(i.strip()) and len(i.strip()) < 100 for i in ids))
    seen: dict[int | str, tuple[int, bool]] = {}  # request id -> (row number, given in the file)
    parsed: list[tuple[int | str, list[int] | int, float, SamplingParams]] = []
    cache: dict[tuple[Any, ...], SamplingParams] = {}  # rows with equal settings share their (frozen) params
    for number, (line, record) in enumerate(rows, 1):
        if record is None:  # unreadable: already reported
            continue
        where = where_in_file(number, line)
        values = _check_row(record, where, vocab_size, problems)
        rid, given = number - 1, False
        raw_id = record.get("request_id")
        if not _missing(raw_id):
            try:
                rid, given = _request_id(raw_id, int_text), True
            except _Bad:
                values = None
                problems.append(f"{where}: request_id={show(raw_id)} is not allowed: expected an integer "
                                "or a string")
        if rid in seen:
            other, other_given = seen[rid]
            note = "" if given and other_given else " (a row without request_id takes its 0-based index)"
            problems.append(f"{where}: request_id={show(rid)} is not allowed: expected a unique id; row "
                            f"{other} has it too{note}")
        else:
            seen[rid] = (number, given)
        if values is None:
            continue
        tokens, plen = values.get("prompt_token_ids"), values.get("prompt_len")
        if tokens is None and plen is None:
            if has_prompt_column:
                problems.append(f"{where}: prompt_token_ids and prompt_len are both empty; expected one of them")
            continue
        if tokens is not None and plen is not None and plen != len(tokens):
            problems.append(f"{where}: prompt_len={plen} is not allowed: expected the length of "
                            f"prompt_token_ids ({len(tokens)})")
            continue
        sampling = _row_sampling(values, defaults, where, problems, cache)
        if sampling is None:
            continue
        length = len(tokens) if tokens is not None else plen
        if max_model_len is not None and length + sampling.max_tokens > max_model_len:
            prompt = f"prompt_len={plen}" if tokens is None else f"prompt ({length} tokens)"
            source = "" if "max_tokens" in values else ", the sampling default"
            problems.append(f"{where}: {prompt} + max_tokens={sampling.max_tokens}{source} = "
                            f"{length + sampling.max_tokens} is not allowed: expected at most "
                            f"max_model_len={max_model_len}")
            continue
        parsed.append((rid, tokens if tokens is not None else plen, values.get("arrival_time", 0.0), sampling))
    if problems:
        raise TraceError(path, problems)
    rng = np.random.default_rng(seed)
    return [Request(rid, p if isinstance(p, list) else rng.integers(0, vocab_size, p).tolist(), arrival, s)
            for rid, p, arrival, s in parsed]


def _row_sampling(values: dict[str, Any], defaults: SamplingParams, where: str, problems: list[str],
                  cache: dict[tuple[Any, ...], SamplingParams]) -> SamplingParams | None:
    overrides = {k: values[k] for k in SAMPLING if k in values}
    key = tuple(overrides.items())
    if key in cache:
        return cache[key]
    n, beam = values.get("n", defaults.n), values.get("beam_width", defaults.beam_width)
    if n > 1 and beam > 1:
        shown = [f"{k}={v}" + ("" if k in values else " (the sampling default)") for k, v in (("n", n),
                                                                                            ("beam_width", beam))]
        problems.append(f"{where}: {' with '.join(shown)} is not allowed: expected n=1 or beam_width=1")
        return None
    try:
        sampling = cache[key] = defaults.updated(**overrides)
    except ValueError as exc:  # SamplingParams' own checks; the ones above should cover them
        problems.append(f"{where}: {exc}")
        return None
    return sampling


class TraceWorkload:
    """``workload=trace``: the requests of a JSONL/JSON/CSV file (``path``), every row checked (the first
    ``num_requests`` rows only, when set; null: all); ``seed``
    (None: the run's) draws prompt tokens for ``prompt_len`` rows; ``n`` / ``beam_width`` (None: the
    sampling group's) are the defaults of rows that do not set them."""

    def __init__(self, path: str | None = None, num_requests: int | None = None, seed: int | None = None,
                 n: int | None = None, beam_width: int | None = None) -> None:
        if not path:
            raise BadArgument("path", path, "a .jsonl, .json or .csv file (workload.path=FILE)")
        if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, int)
                                         or num_requests < 1):
            raise BadArgument("num_requests", num_requests, "an integer >= 1, or null for every row")
        self.path, self.num_requests, self.seed, self.n, self.beam_width = str(path), num_requests, seed, n, beam_width

    def requests(self, *, vocab_size: int, max_model_len: int, defaults: SamplingParams, seed: int) -> list[Request]:
        requests = trace_requests(self.path, seed=seed if self.seed is None else self.seed, vocab_size=vocab_size,
                                  defaults=defaults.updated(n=self.n, beam_width=self.beam_width),
                                  max_model_len=max_model_len)
        return requests if self.num_requests is None else requests[: self.num_requests]
