"""Sweeps through Hydra's other launchers and sweepers, run as the README shows them: submitit's local
executor (the launcher code SLURM uses), Ray on a local Ray cluster, and Optuna. Each needs its plugin
(``pip install -e ".[cluster,optuna]"``; ``.[test]`` brings them) and is skipped without it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pagedlab.app.results import load_results

TINY = ["executor=sim", "logger=none", "workload.num_requests=4"]
POINTS = ["block_size=8,16"]
LAUNCHERS = {  # the README's commands, less the points and TINY
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher",
                       ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"]),
    "ray": ("hydra_plugins.hydra_ray_launcher", ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"]),
}
# The README's Optuna example: on an A100-40GB, OPT-13B's KV cache holds ~30 ShareGPT-like sequences, so
# throughput climbs with max_num_seqs up to there and then preemptions take over.
OPTUNA = ["executor=sim", "model=opt_13b", "workload=sharegpt_like", "workload.num_requests=200", "logger=none",
          "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=4",
          "+objective=throughput_tok_s", "max_num_seqs=int(interval(4,64))"]


def env(tmp: Path) -> dict[str, str]:
    """The user's environment, minus anything that would change Hydra's or W&B's behaviour; HOME in tmp
    (Ray writes ~/.ray)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_", "RAY_"))}
    e.update(HOME=str(tmp))
    return e


def cli(tmp: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedlab.run", *args], cwd=tmp, env=env(tmp),
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def loaded(path: Path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every job dir must count
        return load_results(path).drop(columns="run_dir").sort_values("job", ignore_index=True)


def only_sweep(tmp: Path) -> Path:
    """The one sweep dir under tmp/results/multirun/<date>/<time>/ (Hydra's default, ${now:...} included)."""
    dirs = list((tmp / "results" / "multirun").glob("*/*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reference: the same points through Hydra's basic launcher (load_results, summary.parquet)."""
    tmp = tmp_path_factory.mktemp("basic")
    ok(cli(tmp, "-m", *TINY, *POINTS))
    sweep = only_sweep(tmp)
    return loaded(sweep), pd.read_parquet(sweep / "summary.parquet").drop(columns="run_dir")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_launcher_sweep_gives_the_basic_launchers_results(tmp_path: Path, launcher: str,
                                                            basic: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    plugin, args = LAUNCHERS[launcher]
    pytest.importorskip(plugin)
    proc = ok(cli(tmp_path, "-m", *TINY, *POINTS, *args))
    sweep = only_sweep(tmp_path)  # the jobs, in their own processes, resolved ${now:...} as the sweep did
    assert all((sweep / str(i) / "finished.json").is_file() for i in range(2))
    summary = pd.read_parquet(sweep / "summary.parquet")
    assert summary["job"].tolist() == [0, 1] and (summary["status"] == "finished").all()
    assert summary["error"].isna().all() and summary["block_size"].tolist() == [8, 16]
    assert "2 runs" in proc.stdout and "could not update summary.parquet" not in proc.stdout + proc.stderr
    runs, table = basic
    pd.testing.assert_frame_equal(loaded(sweep), runs)
    pd.testing.assert_frame_equal(summary.drop(columns="run_dir"), table)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_launcher_sweep_groups_its_wandb_runs_as_the_basic_launcher_does(tmp_path: Path, launcher: str) -> None:
    """With the default logger (W&B, offline), each job, in the launcher's own process, writes one offline
    run grouped by the sweep dir and named by its overrides, as under the basic launcher
    (tests/test_wandb.py)."""
    plugin, args = LAUNCHERS[launcher]
    pytest.importorskip(plugin)
    pytest.importorskip("wandb")
    tiny = [a for a in TINY if a != "logger=none"]
    ok(cli(tmp_path, "-m", *tiny, *POINTS, *args, "hydra.sweep.dir=sweeps/my_study"))
    for job, bs in ((0, 8), (1, 16)):
        (run,) = (tmp_path / "sweeps" / "my_study" / str(job) / "wandb").glob("offline-run-*")
        (records,) = run.glob("*.wandb")
        data = records.read_bytes()
        assert b"my_study" in data and f"block_size={bs}".encode() in data and b"memory_waste" in data


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_failed_job_is_a_row_written_by_the_job_itself(tmp_path: Path, launcher: str) -> None:
    """A failing job stops the sweep before ``on_multirun_end``, so its row can only come from the job's own
    ``on_job_end``, which runs in the launcher's worker (a submitit or Ray process)."""
    plugin, args = LAUNCHERS[launcher]
    pytest.importorskip(plugin)
    (tmp_path / "s" / "1").mkdir(parents=True)
    (tmp_path / "s" / "1" / "summary.json").write_text("{}")  # job 1's dir is occupied: that job fails
    proc = cli(tmp_path, "-m", *TINY, "block_size=8,16,32", "hydra.sweep.dir=s", *args)
    assert proc.returncode != 0 and "already holds results" in proc.stdout + proc.stderr
    df = pd.read_parquet(tmp_path / "s" / "summary.parquet")
    assert df["job"].tolist() == [0, 1, 2] and df["status"].tolist() == ["finished", "failed", "finished"]
    assert df["error"].iloc[1].startswith("RunDirError: pagedlab:") and df["block_size"].tolist() == [8, 16, 32]


@pytest.mark.slow
def test_optuna_search_scores_trials_differently_and_names_the_best(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = ok(cli(tmp_path, "-m", *OPTUNA))
    sweep = only_sweep(tmp_path)
    df = pd.read_parquet(sweep / "summary.parquet")
    assert len(df) == 4 and (df["status"] == "finished").all() and df["max_num_seqs"].between(4, 64).all()
    # the search matters: each value it tries scores its own throughput (the sampler may try a value twice,
    # and the simulator then gives the same number)
    per_value = df.groupby("max_num_seqs")["throughput_tok_s"]
    assert (per_value.nunique() == 1).all(), df[["max_num_seqs", "throughput_tok_s"]]
    assert per_value.first().nunique() == df["max_num_seqs"].nunique() >= 2, df[["max_num_seqs", "throughput_tok_s"]]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    top = df.loc[df["throughput_tok_s"].idxmax()]
    assert best["best_params"] == {"max_num_seqs": int(top["max_num_seqs"])}
    assert best["best_value"] == pytest.approx(top["throughput_tok_s"])
    assert "Best value" in proc.stdout + proc.stderr


def test_the_readme_shows_the_commands_these_tests_run() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line)[3:] for line in text.splitlines()
                if line.strip().startswith("python -m pagedlab.run -m")]
    for _, args in LAUNCHERS.values():
        assert ["-m", *TINY, *POINTS, *args] in commands, args
    assert ["-m", *OPTUNA] in commands
