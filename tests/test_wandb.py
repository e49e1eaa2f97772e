"""W&B mirror: offline by default (no network), one run per job, and never in the way of results."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from pagedlab.app import loggers
from pagedlab.app.api import compose

SIM = ["executor=sim", "model=llama_13b", "workload=uniform", "workload.num_requests=8",
       "workload.prompt_len=[8,32]", "workload.output_len=[4,16]"]
STEP_METRICS = [b"memory_waste", b"kv_utilization", b"batch_size", b"num_waiting", b"num_running", b"used_blocks"]


def run_cli(tmp: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(WANDB_CONFIG_DIR=str(tmp / ".wc"), WANDB_CACHE_DIR=str(tmp / ".wcache"),
               WANDB_DATA_DIR=str(tmp / ".wdata"), WANDB_BASE_URL="http://127.0.0.1:9",  # unreachable
               HOME=str(tmp), **env_extra)
    proc = subprocess.run([sys.executable, "-m", "pagedlab.run", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_records(path: Path):
    """The Records of a run-*.wandb file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks,
    chunks with a 7-byte crc/length/type header), parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_summary(run: Path) -> dict:
    """The W&B run's final summary: its summary records applied in order."""
    (path,) = run.glob("run-*.wandb")
    summary: dict = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                keys = list(item.nested_key) or [item.key]
                node = summary
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(item.value_json)
            for item in record.summary.remove:
                summary.pop(item.key, None)
    return summary


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_default_logger_writes_an_offline_run_with_the_metrics(tmp_path: Path) -> None:
    run_cli(tmp_path, *SIM, "hydra.run.dir=run/2026-01-02/10-11-12", WANDB_MODE="online")
    run_dir = tmp_path / "run" / "2026-01-02" / "10-11-12"
    assert (run_dir / "summary.json").is_file()
    (wb,) = offline_runs(run_dir)
    data = b"".join(p.read_bytes() for p in wb.rglob("*") if p.is_file())
    for word in [*STEP_METRICS, b"throughput_tok_s", b"sharing_saving", b"requests", b"2026-01-02_10-11-12",
                 b"allocator=paged", b"executor=sim", b"model=llama_13b", b"sim-paged"]:
        assert word in data, word
    assert list((wb / "files" / "media" / "table").glob("requests_*.table.json"))


def test_wandb_summary_equals_summary_json_for_every_key(tmp_path: Path) -> None:
    run_cli(tmp_path, *SIM, "hydra.run.dir=run", "logger.log_every=1")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (wb,) = offline_runs(tmp_path / "run")
    got = wandb_summary(wb)
    assert {k: got.get(k) for k in summary if not same(got.get(k), summary[k])} == {}
    history = [r.history for r in wandb_records(next(wb.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "history"]
    assert len(history) > 5  # per-step metrics were logged, and still did not touch the summary


def test_multirun_makes_one_run_per_job_grouped_by_sweep(tmp_path: Path) -> None:
    run_cli(tmp_path, "-m", *SIM, "block_size=8,16", "hydra.sweep.dir=sweeps/my_study")
    for job, bs in ((0, 8), (1, 16)):
        (wb,) = offline_runs(tmp_path / "sweeps" / "my_study" / str(job))
        data = wb.joinpath(next(p.name for p in wb.iterdir() if p.suffix == ".wandb")).read_bytes()
        assert b"my_study" in data and f"block_size={bs}".encode() in data and b"memory_waste" in data


def test_logger_none_and_disabled_write_no_wandb_dir(tmp_path: Path) -> None:
    run_cli(tmp_path, "-m", *SIM, "logger=none,wandb", "logger.mode=disabled", "hydra.sweep.dir=s")
    assert all((tmp_path / "s" / j / "summary.json").is_file() and not (tmp_path / "s" / j / "wandb").exists()
               for j in ("0", "1"))


@pytest.fixture
def cfg():
    return compose(*SIM)


def test_missing_wandb_warns_and_keeps_going(cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(RuntimeWarning, match="wandb is not installed"):
        logger = loggers.make_logger(cfg, tmp_path, group="g", name="n")
    assert isinstance(logger, loggers.NullLogger)


def test_wandb_init_failure_warns_and_keeps_going(cfg, tmp_path: Path, monkeypatch) -> None:
    import wandb

    def boom(**kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="W&B could not start.*no service"):
        assert isinstance(loggers.make_logger(cfg, tmp_path, group="g", name="n"), loggers.NullLogger)


class FakeRun:
    def __init__(self, fail_log: bool = False, fail_finish: bool = False) -> None:
        self.logged: list[tuple[dict, int | None]] = []
        self.summary: dict = {}
        self.metrics: list[tuple[str, str]] = []
        self.finished = None
        self.fail_log, self.fail_finish = fail_log, fail_finish

    def define_metric(self, name: str, summary: str | None = None) -> None:
        self.metrics.append((name, summary))

    def log(self, data: dict, step: int | None = None) -> None:
        if self.fail_log:
            raise OSError("disk full")
        self.logged.append((data, step))

    def finish(self, exit_code: int = 0) -> None:
        if self.fail_finish:
            raise RuntimeError("service gone")
        self.finished = exit_code


def test_wandb_logger_sends_config_tags_steps_summary_and_table(cfg, tmp_path: Path, monkeypatch) -> None:
    import pandas as pd
    import wandb

    seen: dict = {}
    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or run)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg.logger.mode = "online"
    cfg.logger.log_every = 1
    logger = loggers.make_logger(cfg, tmp_path, group="2026-01-02_10-11-12", name="block_size=8")
    assert seen["mode"] == "online" and seen["group"] == "2026-01-02_10-11-12" and seen["name"] == "block_size=8"
    assert seen["config"] == OmegaConf.to_container(cfg, resolve=True) and seen["dir"] == str(tmp_path)
    assert "allocator=paged" in seen["tags"] and seen["job_type"] == "sim-paged"
    logger.log_step({"step": 3, "memory_waste": 0.1, "batch_size": 4, "name": "x", "flag": True})
    assert run.logged == [({"memory_waste": 0.1, "batch_size": 4}, 3)]

    result = SimpleNamespace(summary={"memory_waste": 0.2, "time_source": "modelled"},
                             requests=pd.DataFrame({"request_id": [0, 1], "output_token_ids": [[1, 2], [3]]}))
    logger.log_result(result)
    logger.finish()
    assert run.summary == result.summary and run.finished == 0 and run.metrics == [("*", "none")]
    table = run.logged[-1][0]["requests"]
    assert "output_token_count" in table.columns and "output_token_ids" not in table.columns


def test_a_wall_clock_run_logs_its_steps_after_the_measured_window(cfg, tmp_path: Path, monkeypatch) -> None:
    """With executor=torch the step rows wait until the run ends (W&B's work stays out of the measured
    window), then go out in order, before the request table; a simulated run logs them live (above)."""
    import pandas as pd
    import wandb

    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    cfg.executor = OmegaConf.create({"_target_": "pagedlab.executors.torch_executor.TorchBackend", "name": "torch"})
    cfg.logger.log_every = 2
    logger = loggers.make_logger(cfg, tmp_path, group="g", name="n")
    for step in range(5):
        logger.log_step({"step": step, "batch_size": step})
    assert run.logged == []
    result = SimpleNamespace(summary={"batch_size_mean": 2.0}, requests=pd.DataFrame({"request_id": [0]}))
    logger.log_result(result)
    logger.finish()
    assert [step for _, step in run.logged[:3]] == [0, 2, 4] and "requests" in run.logged[3][0]
    failed = loggers.make_logger(cfg, tmp_path, group="g", name="n2")
    run.logged.clear()
    failed.log_step({"step": 0, "batch_size": 1})
    failed.finish(exit_code=1)  # a run that failed still shows the steps it made
    assert run.logged == [({"batch_size": 1}, 0)] and run.finished == 1


def test_online_without_a_key_falls_back_to_offline(cfg, tmp_path: Path, monkeypatch) -> None:
    import wandb

    seen: dict = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or FakeRun())
    monkeypatch.setattr(loggers, "has_api_key", lambda: False)
    cfg.logger.mode = "online"
    with pytest.warns(RuntimeWarning, match="no W&B API key"):
        loggers.make_logger(cfg, tmp_path, group="g", name="n")
    assert seen["mode"] == "offline"


def test_a_failing_log_warns_once_and_the_run_still_finishes(cfg, tmp_path: Path, monkeypatch) -> None:
    import wandb

    run = FakeRun(fail_log=True)
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    logger = loggers.make_logger(cfg, tmp_path, group="g", name="n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            logger.log_step({"step": step, "memory_waste": 0.0})
        logger.finish(exit_code=1)
    assert sum("disk full" in str(w.message) for w in caught) == 1 and run.finished == 1


def test_has_api_key_reads_env_and_netrc(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    assert not loggers.has_api_key()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert loggers.has_api_key()


def test_summary_json_is_written_even_when_wandb_breaks(tmp_path: Path) -> None:
    """A W&B that cannot start (bad dir) must not cost the local results."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").write_text("not a directory")
    proc = run_cli(tmp_path, *SIM, "hydra.run.dir=run")
    assert "W&B could not start" in proc.stderr and "local results" in proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_finished"] == 8


def test_log_every_logs_every_nth_step_only(cfg, tmp_path: Path, monkeypatch) -> None:
    import wandb

    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    cfg.logger.log_every = 4
    logger = loggers.make_logger(cfg, tmp_path, group="g", name="n")
    for step in range(10):
        logger.log_step({"step": step, "memory_waste": 0.0})
    assert [s for _, s in run.logged] == [0, 4, 8]


def test_wandb_raising_in_log_summary_or_finish_never_fails_the_run(cfg, tmp_path: Path, monkeypatch) -> None:
    import pandas as pd
    import wandb

    run = FakeRun(fail_log=True, fail_finish=True)
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    logger = loggers.make_logger(cfg, tmp_path, group="g", name="n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log_step({"step": 0, "memory_waste": 0.0})
        logger.log_result(SimpleNamespace(summary={"memory_waste": 0.1}, requests=pd.DataFrame({"request_id": [0]})))
        logger.finish()
    assert any("finish failed" in str(w.message) for w in caught)


def test_a_hanging_init_times_out_and_warns(cfg, tmp_path: Path, monkeypatch) -> None:
    import threading

    import wandb

    release = threading.Event()
    monkeypatch.setattr(wandb, "init", lambda **kw: release.wait(30) and FakeRun())
    monkeypatch.setenv(loggers.INIT_TIMEOUT_ENV, "0.5")
    with pytest.warns(RuntimeWarning, match="W&B could not start.*did not return within 0.5 s"):
        assert isinstance(loggers.make_logger(cfg, tmp_path, group="g", name="n"), loggers.NullLogger)
    release.set()



def test_a_late_init_is_finished_by_the_thread_or_returned_never_both() -> None:
    import threading
    import time

    def settle(runs: list, returned: list) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(r.finished is None and r not in returned for r in runs):
            time.sleep(0.01)

    release, late = threading.Event(), FakeRun()
    with pytest.raises(TimeoutError):
        loggers.call_with_timeout(lambda: release.wait(30) and late, 0.05)
    release.set()
    settle([late], [])
    assert late.finished == 1
    runs, returned = [FakeRun() for _ in range(40)], []  # returns right around the deadline
    for run in runs:
        try:
            returned.append(loggers.call_with_timeout(lambda run=run: time.sleep(0.005) or run, 0.005))
        except TimeoutError:
            pass
    settle(runs, returned)
    for run in runs:
        assert (run in returned) != (run.finished == 1)

HANG = """
import sys, time, wandb
wandb.init = lambda **kw: time.sleep(3600)
from pagedlab.run import main
sys.argv = ["pagedlab", *sys.argv[1:]]
main()
"""


def test_a_hanging_init_neither_fails_nor_blocks_the_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(HOME=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9", PAGEDLAB_WANDB_INIT_TIMEOUT="1")
    proc = subprocess.run([sys.executable, "-c", HANG, *SIM, "hydra.run.dir=run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "did not return within 1 s" in proc.stderr and (tmp_path / "run" / "finished.json").is_file()
