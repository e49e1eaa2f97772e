"""Trace files: what loads, and the one TraceError that lists each bad row, column, value and rule."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pagedlab.engine.request import SamplingParams
from pagedlab.workloads import TraceError, trace_requests

VOCAB = 100
DEFAULTS = SamplingParams()


def load(path: Path, defaults: SamplingParams = DEFAULTS, **kw):
    return trace_requests(path, seed=0, vocab_size=VOCAB, defaults=defaults, **kw)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def jsonl(tmp_path: Path, *rows: dict | str) -> Path:
    return write(tmp_path, "t.jsonl", "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def error(path: Path, **kw) -> str:
    with pytest.raises(TraceError) as info:
        load(path, **kw)
    msg = str(info.value)
    assert str(path) in msg.splitlines()[0]
    return msg


# --------------------------------------------------------------------------- what loads
def test_good_jsonl_csv_and_json_load(tmp_path):
    rows = [{"prompt_len": 20, "max_tokens": 10}, {"prompt_token_ids": [1, 2, 3], "request_id": "x",
            "temperature": 0.5, "ignore_eos": False}, {"prompt_len": 30, "arrival_time": 0.5, "top_k": -1, "seed": 3}]
    reqs = load(jsonl(tmp_path, *rows, ""))  # a trailing blank line is fine
    assert [r.request_id for r in reqs] == [0, "x", 2]
    assert [r.prompt_len for r in reqs] == [20, 3, 30]
    assert reqs[0].sampling.max_tokens == 10 and reqs[1].sampling.max_tokens == DEFAULTS.max_tokens
    assert reqs[1].sampling.ignore_eos is False and reqs[2].sampling.top_k == -1 and reqs[2].arrival_time == 0.5
    assert reqs == load(jsonl(tmp_path, *rows))  # the seed fixes the random prompts

    csv = write(tmp_path, "t.csv", 'request_id,prompt_len,prompt_token_ids,max_tokens,ignore_eos,top_p\n'
                '1,5,,8,True,0.9\n2,,"[4, 5]",,false,\n\n3,7,,16.0,1,1\n')
    reqs = load(csv)
    assert [r.request_id for r in reqs] == [1, 2, 3]
    assert reqs[1].prompt_token_ids == [4, 5] and reqs[2].sampling.max_tokens == 16
    assert [r.sampling.ignore_eos for r in reqs] == [True, False, True]
    mixed = write(tmp_path, "m.csv", "request_id,prompt_len\n1,5\nabc,7\n")
    assert [r.request_id for r in load(mixed)] == ["1", "abc"]  # as pandas reads a mixed column

    df = pd.DataFrame({"prompt_len": [3, 4], "max_tokens": [5, None]})
    df.to_json(tmp_path / "cols.json")
    df.to_json(tmp_path / "recs.json", orient="records")
    df.to_csv(tmp_path / "pd.csv", index=False)
    for name in ("cols.json", "recs.json", "pd.csv"):
        reqs = load(tmp_path / name)
        assert [r.prompt_len for r in reqs] == [3, 4], name
        assert [r.sampling.max_tokens for r in reqs] == [5, DEFAULTS.max_tokens], name


def test_trace_error_is_exported_and_a_value_error():
    import pagedlab.workloads as w

    assert "TraceError" in w.__all__ and issubclass(TraceError, ValueError)


# --------------------------------------------------------------------------- the file
def test_missing_file_and_unknown_suffix(tmp_path):
    assert "does not exist" in error(tmp_path / "nope.jsonl")
    msg = error(write(tmp_path, "t.txt", '{"prompt_len": 3}\n'))
    assert "'.txt' is not allowed" in msg and ".jsonl, .json, .csv" in msg


@pytest.mark.parametrize(("name", "text"), [("t.jsonl", ""), ("t.jsonl", "\n\n"), ("t.csv", ""),
                                            ("t.csv", "prompt_len,max_tokens\n"), ("t.json", "[]")])
def test_empty_file(tmp_path, name, text):
    assert "no rows" in error(write(tmp_path, name, text))


def test_no_prompt_column(tmp_path):
    msg = error(jsonl(tmp_path, {"max_tokens": 3}))
    assert "expected a 'prompt_token_ids' or 'prompt_len' column" in msg and "['max_tokens']" in msg


def test_unknown_columns_are_refused_with_did_you_mean(tmp_path):
    msg = error(write(tmp_path, "t.csv", "prompt_len,max_token,colour\n3,4,red\n"))
    assert "unknown columns 'max_token' (did you mean 'max_tokens'?), 'colour'" in msg
    assert "allowed columns: prompt_token_ids, prompt_len, max_tokens" in msg
    msg = error(jsonl(tmp_path, {"prompt_len": 3}, {"prompt_len": 3, "temprature": 1}))
    assert "'temprature' (did you mean 'temperature'?) from row 2" in msg
    assert "index=False" in error(write(tmp_path, "i.csv", ",prompt_len\n0,3\n"))  # pandas' index column


def test_bad_jsonl_line_and_ragged_csv_row_are_reported_with_their_line(tmp_path):
    msg = error(jsonl(tmp_path, {"prompt_len": 3}, "", '{"prompt_len": 4,', "[1, 2]", {"prompt_len": 0}))
    assert "row 2 (line 3): not valid JSON" in msg
    assert "row 3 (line 4): expected a JSON object" in msg
    assert "row 4 (line 5): prompt_len=0 is not allowed" in msg
    msg = error(write(tmp_path, "t.csv", "prompt_len,max_tokens\n3,4\n5\n6,7,8\n"))
    assert "row 2 (line 3): has 1 fields, expected 2" in msg and "row 3 (line 4): has 3 fields" in msg
    assert "name the file .jsonl" in error(write(tmp_path, "t.json", '{"prompt_len": 3}\n{"prompt_len": 4}\n'))
    assert "expected a JSON list of row objects" in error(write(tmp_path, "s.json", '{"prompt_len": 3}'))


# --------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("value", ["abc", "-3", "0", "NaN", "1.5", "inf", "99999999999999999999", "true"])
def test_bad_prompt_len_in_csv(tmp_path, value):
    msg = error(write(tmp_path, "t.csv", f"prompt_len\n4\n{value}\n"))
    assert f'row 2 (line 3): prompt_len="{value}" is not allowed: expected an integer >= 1' in msg


@pytest.mark.parametrize("value", [-3, 0, 1.5, float("nan"), True, 2**64, "x", [3]])
def test_bad_prompt_len_in_jsonl(tmp_path, value):
    msg = error(jsonl(tmp_path, {"prompt_len": 4}, {"prompt_len": value}))
    assert f"row 2: prompt_len={json.dumps(value)} is not allowed: expected an integer >= 1" in msg


def test_prompt_len_missing_in_a_row_without_tokens(tmp_path):
    msg = error(write(tmp_path, "t.csv", 'prompt_len,prompt_token_ids\n3,\n,"[1]"\n,\n'))
    assert "row 3 (line 4): prompt_token_ids and prompt_len are both empty" in msg
    assert "row 1" not in msg and "row 2" not in msg
    msg = error(jsonl(tmp_path, {"prompt_len": 3}, {"prompt_len": None, "max_tokens": 5}))
    assert "row 2: prompt_token_ids and prompt_len are both empty" in msg


@pytest.mark.parametrize(("cell", "why"), [
    ('"[1, 2"', "not valid JSON"), ('"[[1], [2]]"', "item 0 is [1]"), ('"[1, 1.5]"', "item 1 is 1.5"),
    ('"[1, ""a""]"', 'item 1 is "a"'), ('"[1, true]"', "item 1 is true"), ('"[]"', "the list is empty"),
    ("7", None), ('"[1, -1]"', "item 1 is -1"), ('"[99, 100]"', "item 1 is 100"), ("'{}'", None),
])
def test_bad_prompt_token_ids_in_csv(tmp_path, cell, why):
    msg = error(write(tmp_path, "t.csv", f'prompt_token_ids\n"[1]"\n{cell}\n'))
    assert "row 2 (line 3): prompt_token_ids=" in msg
    assert "expected a non-empty list of integer token ids in 0..99 (vocab_size=100)" in msg
    assert why is None or why in msg


@pytest.mark.parametrize("value", [[[1, 2]], [1.5], ["a"], [True], [], [VOCAB], [-1], 3, "[1, 2"])
def test_bad_prompt_token_ids_in_jsonl(tmp_path, value):
    msg = error(jsonl(tmp_path, {"prompt_token_ids": value}))
    assert f"row 1: prompt_token_ids={json.dumps(value)} is not allowed" in msg and "vocab_size=100" in msg


def test_prompt_len_must_match_the_tokens(tmp_path):
    msg = error(jsonl(tmp_path, {"prompt_token_ids": [1, 2], "prompt_len": 3}))
    assert "row 1: prompt_len=3 is not allowed: expected the length of prompt_token_ids (2)" in msg
    assert load(jsonl(tmp_path, {"prompt_token_ids": [1, 2], "prompt_len": 2}))[0].prompt_len == 2


# --------------------------------------------------------------------------- sampling and arrival
BAD = [
    ("max_tokens", ["0", "-1", "2.5", "x", "NaN", "9223372036854775808"], [0, 2.5, True, 2**63, "x", None]),
    ("n", ["0", "1.5", "two"], [0, 1.5, False]),
    ("beam_width", ["0", "-2"], [0, True]),
    ("top_k", ["-2", "1.5", "k"], [-2, 0.5, True]),
    ("seed", ["-1", "1.5", "99999999999999999999"], [-1, 2**63, 1.5, True]),
    ("temperature", ["-0.1", "NaN", "hot", "inf"], [-1, float("nan"), True, "hot"]),
    ("top_p", ["0", "1.5", "-1", "NaN"], [0, 1.01, float("nan"), False]),
    ("ignore_eos", ["yes", "2", "1.0"], [2, 0.5, "maybe"]),
    ("arrival_time", ["-1", "NaN", "inf", "-inf", "soon"], [-0.5, float("nan"), float("inf"), True, "soon"]),
]
RULE = {"max_tokens": "an integer >= 1", "n": "an integer >= 1", "beam_width": "an integer >= 1",
        "top_k": "an integer >= 0, or -1", "seed": "an integer in 0..2**63-1", "temperature": "a finite number >= 0",
        "top_p": "a number in (0, 1]", "ignore_eos": "a boolean: true, false, 1 or 0",
        "arrival_time": "a finite number >= 0"}


@pytest.mark.parametrize(("col", "text"), [(c, t) for c, texts, _ in BAD for t in texts])
def test_bad_csv_cells(tmp_path, col, text):
    msg = error(write(tmp_path, "t.csv", f"prompt_len,{col}\n3,\n3,{text}\n"))
    assert f'row 2 (line 3): {col}="{text}" is not allowed: expected {RULE[col]}' in msg


@pytest.mark.parametrize(("col", "value"), [(c, v) for c, _, values in BAD for v in values if v is not None])
def test_bad_jsonl_values(tmp_path, col, value):
    msg = error(jsonl(tmp_path, {"prompt_len": 3, col: value}))
    assert f"row 1: {col}={json.dumps(value)} is not allowed: expected {RULE[col]}" in msg


def test_numbers_and_booleans_that_are_accepted(tmp_path):
    rows = [{"prompt_len": 3, "max_tokens": 4.0, "ignore_eos": 0, "top_k": 0, "seed": 0, "temperature": 0},
            {"prompt_len": "5", "max_tokens": "1e2", "ignore_eos": "TRUE", "top_p": "0.5", "arrival_time": 2}]
    a, b = load(jsonl(tmp_path, *rows))
    assert a.sampling.max_tokens == 4 and a.sampling.ignore_eos is False and b.prompt_len == 5
    assert b.sampling.max_tokens == 100 and b.sampling.ignore_eos is True and b.arrival_time == 2.0


def test_n_with_beam_width_in_one_row(tmp_path):
    msg = error(jsonl(tmp_path, {"prompt_len": 3, "n": 2, "beam_width": 4}))
    assert "row 1: n=2 with beam_width=4 is not allowed: expected n=1 or beam_width=1" in msg
    msg = error(jsonl(tmp_path, {"prompt_len": 3, "n": 2}), defaults=SamplingParams(beam_width=3))
    assert "row 1: n=2 with beam_width=3 (the sampling default) is not allowed" in msg


def test_duplicate_request_ids_name_both_rows(tmp_path):
    msg = error(write(tmp_path, "t.csv", "request_id,prompt_len\n7,3\n8,3\n7,3\n"))
    assert "row 3 (line 4): request_id=7 is not allowed: expected a unique id; row 1 has it too" in msg
    msg = error(jsonl(tmp_path, {"prompt_len": 3}, {"prompt_len": 3, "request_id": 0}))
    assert "row 2: request_id=0 is not allowed: expected a unique id; row 1 has it too (a row without" in msg
    assert "request_id=1.5 is not allowed" in error(jsonl(tmp_path, {"prompt_len": 3, "request_id": 1.5}))


def test_prompt_plus_max_tokens_longer_than_max_model_len(tmp_path):
    path = jsonl(tmp_path, {"prompt_len": 10, "max_tokens": 6}, {"prompt_token_ids": [1] * 10},
                 {"prompt_len": 10, "max_tokens": 7})
    msg = error(path, max_model_len=16)
    assert "row 1" not in msg
    assert ("row 2: prompt (10 tokens) + max_tokens=64, the sampling default = 74 is not allowed: "
            "expected at most max_model_len=16") in msg
    assert "row 3: prompt_len=10 + max_tokens=7 = 17 is not allowed" in msg
    assert len(load(path)) == 3  # no limit given: as before


# --------------------------------------------------------------------------- all problems at once
def test_every_problem_is_listed_once_and_long_lists_are_cut(tmp_path):
    msg = error(write(tmp_path, "t.csv", "prompt_len,max_tokens,colr\n0,1,\n3,0,\n"))
    assert msg.startswith(f"Invalid trace file {str(tmp_path / 't.csv')!r} (workload.path), 3 problems:")
    assert "'colr'" in msg and "row 1 (line 2): prompt_len" in msg and "row 2 (line 3): max_tokens" in msg
    path = jsonl(tmp_path, *[{"prompt_len": -i} for i in range(1, 31)])
    with pytest.raises(TraceError) as info:
        load(path)
    lines = str(info.value).splitlines()
    assert "30 problems" in lines[0] and len(info.value.problems) == 30
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip() == "... and 10 more"


def test_a_large_trace_loads(tmp_path):
    n = 20_000
    df = pd.DataFrame({"prompt_token_ids": [[i % VOCAB] * 8 for i in range(n)], "max_tokens": 4,
                       "arrival_time": [i / 100 for i in range(n)]})
    df.to_json(tmp_path / "big.jsonl", orient="records", lines=True)
    df.to_csv(tmp_path / "big.csv", index=False)
    for name in ("big.jsonl", "big.csv"):
        reqs = load(tmp_path / name)
        assert len(reqs) == n and reqs[-1].prompt_token_ids == [(n - 1) % VOCAB] * 8


def test_trace_error_pickles(tmp_path):
    import pickle

    with pytest.raises(TraceError) as info:
        load(jsonl(tmp_path, {"prompt_len": 0}))
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.problems == info.value.problems
