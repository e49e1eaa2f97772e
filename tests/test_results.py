"""Results in pandas: in-process sweeps, loading run/sweep dirs and globs, comparing groups."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pagedlab.app import api
from pagedlab.app.callbacks import summarize_sweep
from pagedlab.app.results import compare, flatten, format_compare, load_results, make_row
from pagedlab.config import ConfigError
from pagedlab.engine.result import MARKER, RunResult, check_run, config_hash

SIM = ["executor=sim", "model=llama_13b", "workload=uniform", "workload.num_requests=8",
       "workload.prompt_len=[8,32]", "workload.output_len=[4,16]", "logger=none"]


@pytest.fixture(scope="module")
def grid_df() -> pd.DataFrame:
    return api.sweep(SIM, {"allocator": ["paged", "contiguous_max"], "block_size": [8, 32]}, progress=False)


def test_sweep_runs_every_point_with_config_and_metrics(grid_df: pd.DataFrame, tmp_path: Path) -> None:
    df = grid_df
    assert len(df) == 4 and df["job"].tolist() == [0, 1, 2, 3]
    assert sorted(zip(df["allocator"], df["block_size"])) == [("contiguous_max", 8), ("contiguous_max", 32),
                                                               ("paged", 8), ("paged", 32)]
    assert (df["allocator"] == df["allocator.name"]).all() and (df["executor"] == "sim").all()
    assert {"memory_waste", "throughput_tok_s", "time_source", "workload.prompt_len", "overrides"} <= set(df.columns)
    assert df["workload.prompt_len"].iloc[0] == "[8, 32]"  # lists flattened to text: parquet-safe
    df.to_parquet(tmp_path / "x.parquet")


def test_compare_groups_and_pivots(grid_df: pd.DataFrame) -> None:
    table = compare(grid_df, by=["allocator", "block_size"], metrics=["memory_waste", "time_source"])
    assert list(table.index) == [("contiguous_max", 8), ("contiguous_max", 32), ("paged", 8), ("paged", 32)]
    assert table.loc[("paged", 8), "memory_waste"] < table.loc[("contiguous_max", 8), "memory_waste"]
    assert table.loc[("paged", 8), "time_source"] == "modelled"
    assert "runs" not in table and "averaged_over" not in table  # one run per point, nothing averaged
    pivot = compare(grid_df, by="allocator", columns="block_size", metrics="memory_waste")
    assert pivot.shape == (2, 2) and pivot[("memory_waste", 8)].notna().all()
    with pytest.raises(KeyError, match="no column"):
        compare(grid_df, by="alocator")


def test_compare_never_averages_silently_over_a_key_that_varies(grid_df: pd.DataFrame) -> None:
    with pytest.warns(RuntimeWarning, match="block_size also varies within the groups of by=\\['allocator'\\]"):
        grouped = compare(grid_df, by="allocator", metrics="memory_waste")
    assert list(grouped.index.names) == ["allocator", "block_size"] and len(grouped) == 4
    averaged = compare(grid_df, by="allocator", metrics="memory_waste", average_over="block_size")
    assert list(averaged.index) == ["contiguous_max", "paged"]
    assert averaged["averaged_over"].tolist() == ["block_size: 8, 32"] * 2 and averaged["runs"].tolist() == [2, 2]
    paged = grid_df[grid_df["allocator"] == "paged"]["memory_waste"].mean()
    assert averaged.loc["paged", "memory_waste"] == pytest.approx(paged)


def test_compare_shows_the_spread_of_timed_metrics_over_repeats(grid_df: pd.DataFrame) -> None:
    df = grid_df.assign(repeats=3, throughput_tok_s=100.0, throughput_tok_s_std=10.0, throughput_tok_s_min=90.0,
                        throughput_tok_s_max=110.0)
    table = compare(df, by=["allocator", "block_size"], metrics=["memory_waste", "throughput_tok_s"])
    assert list(table.columns) == ["memory_waste", "throughput_tok_s", "throughput_tok_s_std", "throughput_tok_s_min",
                                   "throughput_tok_s_max"]
    assert table["throughput_tok_s_std"].tolist() == [10.0] * 4
    text = format_compare(table)
    assert "100 ± 10 (90–110)" in text and "throughput_tok_s_std" not in text
    # two runs of one point: the spread of all their repeats (pooled), the range of both
    two = pd.concat([df, df.assign(throughput_tok_s=120.0, throughput_tok_s_min=115.0, throughput_tok_s_max=125.0)])
    pooled = compare(two, by=["allocator", "block_size"], metrics="throughput_tok_s")
    values = [100.0 + d for d in (-10, 0, 10)] + [120.0 + d for d in (-10, 0, 10)]  # repeats with these means/stds
    assert pooled["throughput_tok_s"].iloc[0] == pytest.approx(110.0) and pooled["runs"].iloc[0] == 2
    assert pooled["throughput_tok_s_std"].iloc[0] == pytest.approx(pd.Series(values).std())
    assert (pooled["throughput_tok_s_min"].iloc[0], pooled["throughput_tok_s_max"].iloc[0]) == (90.0, 125.0)
    single = compare(grid_df, by=["allocator", "block_size"], metrics="throughput_tok_s")  # repeats=1: no spread
    assert list(single.columns) == ["throughput_tok_s"]


def test_sweep_from_a_composed_config_reloads_group_files() -> None:
    calls = []

    class Fake:
        def __init__(self, cfg) -> None:
            calls.append(cfg)
            self.summary = {"memory_waste": 0.5, "block_size": cfg.block_size}

    base = api.compose(*SIM)
    orig = api.run_experiment
    api.run_experiment = lambda cfg, progress=False: Fake(cfg)
    try:
        df = api.sweep(base, {"eviction": ["swap"], "sampling": ["beam", "parallel"], "kv_cache.num_blocks": [256]},
                       progress=False)
    finally:
        api.run_experiment = orig
    assert [c.eviction.mode for c in calls] == ["swap", "swap"]
    assert [(c.sampling.beam_width, c.sampling.n) for c in calls] == [(4, 1), (1, 4)]
    assert df["sampling"].tolist() == ["beam", "parallel"] and (df["kv_cache.num_blocks"] == 256).all()


def test_sweep_validates_every_point_before_running(monkeypatch) -> None:
    ran = []
    monkeypatch.setattr(api, "run_experiment", lambda cfg, progress=False: ran.append(cfg))
    with pytest.raises(ConfigError, match="block_size=0"):
        api.sweep(SIM, {"block_size": [16, 0]}, progress=False)
    with pytest.raises(ConfigError, match="block_size=0"):
        api.sweep(api.compose(*SIM), {"block_size": [16, 0]}, progress=False)
    assert ran == []


def _fake_job(root: Path, num: int, allocator: str, waste: float) -> Path:
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    RunResult({"memory_waste": waste, "time_source": "modelled"}, pd.DataFrame({"step": [0]}),
              pd.DataFrame({"request_id": [0]}), {"allocator": {"name": allocator}, "block_size": 16}).save(d)
    (d / ".hydra" / "config.yaml").write_text(f"allocator:\n  name: {allocator}\nblock_size: 16\n")
    (d / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    num: {num}\n  overrides:\n    task: [allocator={allocator}]\n"
        f"  runtime:\n    choices:\n      allocator: {allocator}\n      hydra/launcher: basic\n")
    return d


def test_load_results_from_run_dir_sweep_dir_glob_and_list(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "day" / "time"
    for i, (a, w) in enumerate([("paged", 0.04), ("contiguous_max", 0.8), ("paged", 0.06)]):
        _fake_job(sweep, i, a, w)
    (sweep / "10").mkdir()  # a failed job: no summary.json, skipped
    df = load_results(sweep)
    assert df["job"].tolist() == [0, 1, 2] and df["allocator"].tolist() == ["paged", "contiguous_max", "paged"]
    assert "hydra/launcher" not in df.columns and df["overrides"].iloc[1] == "allocator=contiguous_max"
    assert len(load_results(sweep / "1")) == 1
    assert len(load_results(str(tmp_path / "multirun" / "**" / "summary.json"))) == 3
    assert len(load_results([sweep / "0", sweep / "1"])) == 2
    assert compare(df, by="allocator", metrics="memory_waste").loc["paged", "memory_waste"] == pytest.approx(0.05)
    out = summarize_sweep(sweep, quiet=True)
    assert out is not None and len(pd.read_parquet(out)) == 3
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nothing")


def test_load_results_reads_a_run_saved_from_python(tmp_path: Path) -> None:
    from pagedlab.experiment import run_experiment

    run_experiment(api.compose(*SIM), progress=False).save(tmp_path / "nb")
    row = load_results(tmp_path / "nb").iloc[0]
    assert row["executor.name"] == "sim" and row["num_finished"] == 8


def test_flatten_and_make_row() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}
    row = make_row({"memory_waste": 0.1, "block_size": 8}, {"block_size": 8, "allocator": {"name": "paged"}},
                   choices={"allocator": "paged", "hydra/launcher": "joblib"}, overrides=["+objective=x", "block_size=8"])
    assert row["objective"] == "x" and row["block_size"] == 8 and row["allocator"] == "paged"
    assert "hydra/launcher" not in row and list(row)[:3] == ["run_dir", "job", "overrides"]


def test_save_writes_the_marker_last_with_hash_sizes_and_overrides(tmp_path: Path) -> None:
    cfg = {"block_size": 8, "allocator": {"name": "paged"}}
    RunResult({"memory_waste": 0.1}, pd.DataFrame({"step": [0, 1]}), pd.DataFrame({"request_id": [0]}),
              cfg).save(tmp_path, overrides=["block_size=8"])
    marker = json.loads((tmp_path / MARKER).read_text())
    assert marker["overrides"] == ["block_size=8"] and marker["config_sha256"] == config_hash(cfg) and marker["time"]
    assert {n: i["size"] for n, i in marker["files"].items()} == {
        n: (tmp_path / n).stat().st_size for n in ("summary.json", "steps.parquet", "requests.parquet", "config.json")}
    assert check_run(tmp_path) is None and not list(tmp_path.glob(".*.tmp"))


def test_a_save_failing_part_way_leaves_no_marker_and_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    result = RunResult({"memory_waste": 0.1}, pd.DataFrame({"step": [0]}), pd.DataFrame({"request_id": [0]}))
    result.save(tmp_path)
    old_steps = (tmp_path / "steps.parquet").read_bytes()

    def disk_full(self, path, **kw) -> None:
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(OSError, match="No space"):
        RunResult({"memory_waste": 0.9}, pd.DataFrame({"step": [0]}), pd.DataFrame()).save(tmp_path)
    assert not (tmp_path / MARKER).exists() and not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "steps.parquet").read_bytes() == old_steps
    with pytest.warns(RuntimeWarning, match="no finished.json"), pytest.raises(FileNotFoundError):
        load_results(tmp_path)


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / MARKER).unlink(), "no finished.json"),
    (lambda d: (d / "steps.parquet").write_bytes(b"x"), "steps.parquet is 1 bytes"),
    (lambda d: (d / "requests.parquet").unlink(), "requests.parquet is missing"),
    (lambda d: (d / MARKER).write_text("{"), "finished.json unreadable"),
    (lambda d: (d / ".hydra" / "config.yaml").write_text("allocator:\n  name: other\nblock_size: 16\n"),
     ".hydra/config.yaml is not the config"),
])
def test_a_broken_or_mismatched_run_is_skipped_with_a_warning(tmp_path: Path, damage, why: str) -> None:
    good, bad = _fake_job(tmp_path, 0, "paged", 0.1), _fake_job(tmp_path, 1, "paged", 0.2)
    damage(bad)
    with pytest.warns(RuntimeWarning, match=f"skipping {bad}: {why}") as caught:
        df = load_results(tmp_path)
    assert df["run_dir"].tolist() == [str(good)] and df["status"].tolist() == ["finished"]
    with pytest.warns(RuntimeWarning, match=f"skipping {bad}") as caught_list:
        load_results([good, bad])
    assert {w.filename for w in [*caught, *caught_list]} == {__file__}  # points at the user's call


def test_summarize_sweep_lists_failed_jobs_with_status_and_error(tmp_path: Path) -> None:
    _fake_job(tmp_path, 0, "paged", 0.1)
    failed = tmp_path / "1"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  job:\n    num: 1\n  overrides:\n    task: [block_size=0]\n")
    (failed / "failed.json").write_text(json.dumps({"error": "ConfigError: block_size=0"}))
    df = pd.read_parquet(summarize_sweep(tmp_path, quiet=True))
    assert df["job"].tolist() == [0, 1] and df["status"].tolist() == ["finished", "failed"]
    assert df["error"].isna().tolist() == [True, False] and df["block_size"].iloc[1] == "0"
    assert df["error"].iloc[1] == "ConfigError: block_size=0"
