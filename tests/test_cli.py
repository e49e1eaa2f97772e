"""The command line as a user drives it: subprocesses, cwd in a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

SIM = ["executor=sim", "model=llama_13b", "workload=uniform", "workload.num_requests=8",
       "workload.prompt_len=[8,32]", "workload.output_len=[4,16]"]
SWEEP_COLUMNS = {"job", "run_dir", "overrides", "block_size", "allocator", "allocator.name", "executor",
                 "model", "kv_cache.budget_gib", "memory_waste", "kv_utilization_mean", "batch_size_mean",
                 "throughput_tok_s", "num_finished", "time_source"}


def env(tmp: Path, **extra: str) -> dict[str, str]:
    """The user's environment, minus anything that would change Hydra's or W&B's behaviour."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    e.update(WANDB_CONFIG_DIR=str(tmp / ".wandb_config"), WANDB_CACHE_DIR=str(tmp / ".wandb_cache"),
             WANDB_DATA_DIR=str(tmp / ".wandb_data"), **extra)
    return e


def pagedlab(tmp: Path, *args: str, cwd: Path | None = None, timeout: int = 300,
             **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedlab.run", *args], cwd=cwd or tmp, env=env(tmp, **extra),
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_default_run(tmp_path: Path) -> None:
    """No overrides but the output dir: tiny_llama on the torch executor (CPU), 32 requests."""
    proc = ok(pagedlab(tmp_path, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", timeout=900))
    assert "executor=torch" in proc.stdout + proc.stderr and "model=tiny_llama" in proc.stdout + proc.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_finished"] == 32 and summary["time_source"] == "wall"
    assert len(pd.read_parquet(run / "requests.parquet")) == 32
    assert len(pd.read_parquet(run / "steps.parquet")) > 0
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["model"]["name"] == "tiny_llama"


def test_single_sim_run_writes_results_under_results_dir(tmp_path: Path) -> None:
    proc = ok(pagedlab(tmp_path, *SIM, "logger=none", "block_size=32"))
    runs = list((tmp_path / "results").glob("*/*/summary.json"))  # results/<date>/<time>/
    assert len(runs) == 1
    summary = json.loads(runs[0].read_text())
    assert summary["block_size"] == 32 and summary["time_source"] == "modelled"
    assert "memory_waste" in proc.stdout and "allocator=paged" in proc.stdout + proc.stderr


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])  # loky: ~7 s
def test_multirun_writes_summary_parquet(tmp_path: Path, launcher: str) -> None:
    sweep_dir = tmp_path / "sweep"
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    proc = ok(pagedlab(tmp_path, "-m", *SIM, "logger=none", "block_size=8,16", "allocator=paged,contiguous_max",
                       f"hydra.sweep.dir={sweep_dir}", *extra))
    df = pd.read_parquet(sweep_dir / "summary.parquet")
    assert len(df) == 4
    assert SWEEP_COLUMNS <= set(df.columns), SWEEP_COLUMNS - set(df.columns)
    assert sorted(zip(df["allocator"], df["block_size"])) == sorted(
        (a, b) for a in ("paged", "contiguous_max") for b in (8, 16))
    assert (df["allocator"] == df["allocator.name"]).all() and df["job"].tolist() == [0, 1, 2, 3]
    assert df.loc[df["allocator"] == "paged", "memory_waste"].max() < df.loc[
        df["allocator"] == "contiguous_max", "memory_waste"].min()
    assert "4 runs" in proc.stdout and "memory_waste" in proc.stdout
    assert all((sweep_dir / str(i) / "steps.parquet").is_file() for i in range(4))


@pytest.mark.slow
def test_parallel_joblib_sweep_gives_each_torch_job_its_share_of_the_cores(tmp_path: Path) -> None:
    """Two jobs at once on this machine: each runs with cores // 2 torch threads (at least 1), as its
    summary says (its config keeps executor.threads=null, which asks for exactly this)."""
    sweep_dir = tmp_path / "sweep"
    ok(pagedlab(tmp_path, "-m", "executor=torch", "model=tiny_llama", "device=cpu", "workload.num_requests=2",
                "workload.prompt_len=[4,8]", "workload.output_len=[2,4]", "logger=none", "block_size=8,16",
                f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))
    df = pd.read_parquet(sweep_dir / "summary.parquet")
    share = max(1, (os.cpu_count() or 1) // 2)
    assert df["status"].tolist() == ["finished", "finished"] and df["cpu_threads"].tolist() == [share, share]


def test_executor_threads_is_checked_before_any_work_and_sets_torch_threads(tmp_path: Path) -> None:
    proc = pagedlab(tmp_path, "executor=torch", "model=tiny_llama", "executor.threads=0", "logger=none")
    assert proc.returncode == 2 and "executor.threads=0 is not allowed" in proc.stderr
    assert not (tmp_path / "results").exists()
    proc = ok(pagedlab(tmp_path, "executor=torch", "model=tiny_llama", "device=cpu", "executor.threads=1",
                       "workload.num_requests=2", "workload.prompt_len=[4,8]", "workload.output_len=[2,4]",
                       "logger=none"))
    summary = json.loads(next((tmp_path / "results").glob("*/*/summary.json")).read_text())
    assert summary["cpu_threads"] == 1 and "1 CPU threads" in proc.stdout


@pytest.mark.slow
def test_experiment_multirun_with_sweeper_params(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    ok(pagedlab(tmp_path, "-m", "+experiment=memory_waste_breakdown", "workload.num_requests=20", "logger=none",
                f"hydra.sweep.dir={sweep_dir}"))
    df = pd.read_parquet(sweep_dir / "summary.parquet").set_index("allocator")
    assert sorted(df.index) == sorted(["paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle"])
    assert (df["experiment"] == "memory_waste_breakdown").all()
    waste = df["memory_waste"]
    assert waste["paged"] < waste["contiguous_oracle"] < waste["contiguous_max"]


BAD = [
    (["block_size=0"], ["block_size=0", "1..256"]),
    (["executor=sim", "executor.host_overhead=x"], ["executor.host_overhead=x", "preset, vllm_2023"]),
    (["allocator=pagd"], ["allocator=pagd", "paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle"]),
    (["cow=maybe"], ["cow=maybe", "true or false"]),
    (["eviction.victim=oldest"], ["eviction.victim=oldest", "newest, longest_resident, lru, largest"]),
    (["foo=1"], ["foo", "not a config key", "block_size"]),
    (["model=hf"], ["model.name_or_path", "model=hf"]),
    (["-m", "block_size=8,0"], ["block_size=0", "1..256"]),
]


@pytest.mark.parametrize(("args", "words"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_exits_nonzero_before_any_work(tmp_path: Path, args: list[str], words: list[str]) -> None:
    proc = pagedlab(tmp_path, *args, *SIM[:1], "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("summary.json")) and not (tmp_path / "run").exists()


def test_help_lists_groups_without_schema_entries(tmp_path: Path) -> None:
    out = ok(pagedlab(tmp_path, "--help")).stdout
    assert ("allocator: contiguous_max, contiguous_oracle, contiguous_pow2, orca_max, orca_oracle, "
            "orca_pow2, paged") in out
    assert "experiment: " in out and "_schema" not in out


@pytest.mark.slow
def test_installed_wheel_runs_from_anywhere_with_shipped_conf(tmp_path: Path) -> None:
    """`pip install .` (not editable): a wheel into a --target dir that shadows the dev checkout."""
    repo = Path(__file__).resolve().parents[1]
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(repo)],
                           capture_output=True, text=True, timeout=300, check=False)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here (no build backend reachable): {build.stderr[-500:]}")
    wheel = next(wheels.glob("pagedlab-*.whl"))
    assert "pagedlab/conf/config.yaml" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    extra = {"PYTHONPATH": str(target)}
    probe = "import pagedlab, pagedlab.config as c; print(pagedlab.__file__); print(c.config_dir())"
    where = subprocess.run([sys.executable, "-c", probe],
                           cwd=elsewhere, env=env(tmp_path, **extra), capture_output=True, text=True, check=True)
    pkg_file, conf = where.stdout.split()
    assert Path(pkg_file).is_relative_to(target) and Path(conf) == target / "pagedlab" / "conf"
    ok(pagedlab(tmp_path, *SIM, "logger=none", "hydra.run.dir=out", cwd=elsewhere, **extra))
    hydra = yaml.safe_load((elsewhere / "out" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert str(target / "pagedlab" / "conf") in {s["path"] for s in hydra["runtime"]["config_sources"]}
    assert json.loads((elsewhere / "out" / "summary.json").read_text())["num_finished"] == 8
    script = subprocess.run([str(target / "bin" / "pagedlab"), "--help"], cwd=elsewhere,
                            env=env(tmp_path, **extra), capture_output=True, text=True, timeout=120, check=False)
    assert script.returncode == 0 and "allocator:" in script.stdout
