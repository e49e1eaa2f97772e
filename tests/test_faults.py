"""Faults a run must survive without lying: disk full, Ctrl-C, unusable or busy run dirs, failed jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from pagedlab.app.results import load_results
from pagedlab.app.rundir import FileLock

TINY = ["executor=sim", "logger=none", "workload.num_requests=4", "model=llama_7b"]


def env(tmp: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    e.update(HOME=str(tmp), **extra)
    return e


def cli(tmp: Path, *args: str, prefix: tuple[str, ...] = (), **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "pagedlab.run", *args], cwd=tmp, env=env(tmp, **extra),
                          capture_output=True, text=True, timeout=300, check=False)


def start(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pagedlab.run", *args], cwd=tmp, env=env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def loaded(path: Path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_results(path)


def test_disk_full_mid_save_leaves_no_finished_marker(tmp_path: Path) -> None:
    cmd = " ".join([sys.executable, "-m", "pagedlab.run", *TINY, "hydra.run.dir=run"])
    proc = subprocess.run(["bash", "-c", f"ulimit -f 8; {cmd}"], cwd=tmp_path, env=env(tmp_path),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "could not write the results" in proc.stderr, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "finished.json").exists() and not list(run.glob(".*.tmp"))
    with pytest.warns(RuntimeWarning, match="no finished.json"), pytest.raises(FileNotFoundError):
        load_results(run)


def test_a_finished_run_dir_is_refused_and_keeps_its_labels_unless_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(tmp_path, *TINY, "block_size=16", "hydra.run.dir=run").returncode == 0
    before = {p.name: p.read_bytes() for p in [*run.iterdir(), *(run / ".hydra").iterdir()] if p.is_file()}
    proc = cli(tmp_path, *TINY, "block_size=32", "hydra.run.dir=run")
    assert proc.returncode == 2 and "already holds results" in proc.stderr and "overwrite=true" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in [*run.iterdir(), *(run / ".hydra").iterdir()] if p.is_file()} == before
    assert loaded(run)["block_size"].tolist() == [16]
    assert cli(tmp_path, *TINY, "block_size=32", "hydra.run.dir=run", "overwrite=true").returncode == 0
    assert loaded(run)["block_size"].tolist() == [32]


def test_a_refused_rerun_hydra_got_to_first_is_not_counted_under_new_labels(tmp_path: Path) -> None:
    """Run dir from an interpolation: only task() can refuse, after Hydra rewrote .hydra/config.yaml."""
    run = tmp_path / "run"
    assert cli(tmp_path, *TINY, "block_size=16", "hydra.run.dir=run").returncode == 0
    proc = cli(tmp_path, *TINY, "block_size=32", "hydra.run.dir=${oc.env:RUN_DIR}", RUN_DIR=str(run))
    assert proc.returncode == 2 and "already holds results" in proc.stderr
    assert json.loads((run / "summary.json").read_text())["block_size"] == 16
    with pytest.warns(RuntimeWarning, match="config.yaml is not the config finished.json records"), \
            pytest.raises(FileNotFoundError):
        load_results(run)


def test_a_lock_held_by_a_live_process_refuses_and_a_stale_one_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lock = FileLock(run / ".pagedlab.lock").acquire()  # held by this (live) process
    try:
        proc = cli(tmp_path, *TINY, "hydra.run.dir=run")
    finally:
        lock.release()
    assert proc.returncode == 2 and f"in use by another run (pid {os.getpid()}" in proc.stderr and str(run) in proc.stderr
    assert not (run / ".hydra").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=False)
    (run / ".pagedlab.lock").write_text(dead.stdout)  # left by a run that died: no flock on it
    assert cli(tmp_path, *TINY, "hydra.run.dir=run").returncode == 0
    assert (run / "finished.json").is_file() and not (run / ".pagedlab.lock").exists()


def test_two_runs_into_one_run_dir(tmp_path: Path) -> None:
    first = start(tmp_path, *TINY, "workload=sharegpt_like", "workload.num_requests=1500", "hydra.run.dir=run")
    wait_for(tmp_path / "run" / ".pagedlab.lock", first)
    second = cli(tmp_path, *TINY, "hydra.run.dir=run")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr and "in use by another run" in second.stderr
    assert loaded(tmp_path / "run")["num_finished"].tolist() == [1500]


def test_a_read_only_run_dir_gives_a_clear_message(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="pagedlab-ro-"))
    try:
        base.chmod(0o777)
        (base / "ro").mkdir(mode=0o555)
        (base / "ro").chmod(0o555)
        prefix: tuple[str, ...] = ()
        if os.geteuid() == 0:  # root writes anywhere: run as nobody
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv")
            prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        proc = cli(base, *TINY, f"hydra.run.dir={base / 'ro' / 'run'}", prefix=prefix)
        if "ModuleNotFoundError" in proc.stderr or "Permission denied: '/" in proc.stderr[:200]:
            pytest.skip("this interpreter is not usable as nobody")
        assert proc.returncode == 2 and "cannot write to" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_failed_job_is_a_row_and_the_multirun_exits_non_zero(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    (sweep / "1").mkdir(parents=True)
    (sweep / "1" / "summary.json").write_text("{}")  # job 1's dir is occupied: that job fails
    proc = cli(tmp_path, "-m", *TINY, "block_size=8,16,32", "hydra.sweep.dir=s")
    assert proc.returncode != 0 and "already holds results" in proc.stderr
    df = pd.read_parquet(sweep / "summary.parquet")
    assert df["job"].tolist() == [0, 1, 2] and df["status"].tolist() == ["finished", "failed", "finished"]
    assert df["error"].iloc[1].startswith("RunDirError: pagedlab:") and df["error"].isna().tolist() == [True, False, True]
    assert df["block_size"].tolist() == [8, 16, 32] and df["memory_waste"].notna().tolist() == [True, False, True]


def test_a_sweep_dir_with_results_is_refused(tmp_path: Path) -> None:
    assert cli(tmp_path, "-m", *TINY, "block_size=8", "hydra.sweep.dir=s").returncode == 0
    proc = cli(tmp_path, "-m", *TINY, "block_size=16", "hydra.sweep.dir=s")
    assert proc.returncode == 2 and "already holds results" in proc.stderr
    assert pd.read_parquet(tmp_path / "s" / "summary.parquet")["block_size"].tolist() == [8]


@pytest.mark.slow
def test_sigint_in_a_multirun_keeps_the_finished_jobs_in_summary_parquet(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    proc = start(tmp_path, "-m", *TINY, "workload.num_requests=300", "block_size=8,16,32,64,128,256",
                 "hydra.sweep.dir=s")
    wait_for(sweep / "0" / "finished.json", proc)
    wait_for(sweep / "summary.parquet", proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    df = pd.read_parquet(sweep / "summary.parquet")
    finished = sorted(int(p.parent.name) for p in sweep.glob("*/finished.json"))
    assert len(finished) < 6 and df["job"].tolist() == finished and (df["status"] == "finished").all()


@pytest.mark.slow
def test_joblib_launcher_keeps_summary_parquet_with_a_failed_job(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "s"
    (sweep / "2").mkdir(parents=True)
    (sweep / "2" / "steps.parquet").write_text("old")
    proc = cli(tmp_path, "-m", *TINY, "block_size=8,16,32,64", "hydra.sweep.dir=s", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2")
    assert proc.returncode != 0
    df = pd.read_parquet(sweep / "summary.parquet")
    assert df["job"].tolist() == [0, 1, 2, 3] and df["status"].tolist() == ["finished", "finished", "failed", "finished"]


def test_a_command_line_hydra_refuses_leaves_no_run_dir(tmp_path: Path) -> None:
    """The run dir is locked before Hydra starts; if Hydra then fails to compose, the dir goes too."""
    proc = cli(tmp_path, *TINY, "hydra/launcher=nope", "hydra.run.dir=run")
    assert proc.returncode != 0 and not (tmp_path / "run").exists()
