"""Honest wall-clock: the warm-up is run before, and kept out of, the measured window; repeats give a
mean and a spread; the simulator's repeats are identical and its path runs nothing extra."""

from __future__ import annotations

import time

import pytest

from pagedlab.experiment import SPREAD_KEYS, TIMED_KEYS, aggregate, run_experiment
from pagedlab.run import format_summary
from tests.test_engine import make_cfg

SLOW_FIRST_STEP_S = 1000.0  # on a fake clock: far beyond anything a tiny run takes, and costs no time
TINY = {"executor.name": "torch", "model.name": "tiny_llama", "device": "cpu", "workload.num_requests": 3,
        "workload.prompt_len": [4, 8], "workload.output_len": [2, 4], "kv_cache.num_blocks": 64}


def _slow_first_forward(monkeypatch) -> list[int]:
    """Make the process's first forward pass take SLOW_FIRST_STEP_S (a stand-in for one-time start-up
    costs) on a fake clock: ``time.perf_counter`` jumps by that much, so the test asserts where the
    jump lands, not how fast this machine is."""
    from pagedlab.executors.torch_executor import TorchExecutor

    calls: list[int] = []
    real, real_clock, jump = TorchExecutor.execute, time.perf_counter, [0.0]

    def execute(self, step):
        if not calls:
            jump[0] += SLOW_FIRST_STEP_S
        calls.append(1)
        return real(self, step)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + jump[0])
    monkeypatch.setattr(TorchExecutor, "execute", execute)
    return calls


def test_warmup_is_excluded_from_the_measured_window_and_reported(monkeypatch):
    _slow_first_forward(monkeypatch)
    r = run_experiment(make_cfg(**TINY, warmup_requests=2), progress=False)
    s = r.summary
    assert s["time_source"] == "wall" and s["repeats"] == 1
    assert s["warmup_s"] >= SLOW_FIRST_STEP_S
    assert r.steps["step_time"].max() < SLOW_FIRST_STEP_S
    assert s["ttft_p99"] < SLOW_FIRST_STEP_S and s["makespan_s"] < SLOW_FIRST_STEP_S
    assert s["num_finished"] == s["num_requests"] == 3  # the warm-up's requests are not in the tables
    assert len(r.requests) == 3
    assert "warm-up" in format_summary(s) and "excluded" in format_summary(s)


def test_without_warmup_the_first_step_is_measured(monkeypatch):
    _slow_first_forward(monkeypatch)
    s = run_experiment(make_cfg(**TINY, warmup_requests=0), progress=False).summary
    assert s["warmup_s"] == 0.0
    assert s["ttft_p99"] >= SLOW_FIRST_STEP_S and s["makespan_s"] >= SLOW_FIRST_STEP_S
    assert "no warm-up" in format_summary(s)


def test_wall_repeats_give_mean_and_spread(monkeypatch):
    calls = _slow_first_forward(monkeypatch)
    r = run_experiment(make_cfg(**TINY, warmup_requests=1, repeats=3), progress=False)
    s = r.summary
    assert s["repeats"] == 3 and calls
    for k in TIMED_KEYS:
        assert s[f"{k}_min"] <= s[k] <= s[f"{k}_max"] and s[f"{k}_std"] >= 0
        assert s[f"{k}_max"] < SLOW_FIRST_STEP_S or k in ("throughput_tok_s", "requests_per_s")
    assert len(r.requests) == 3 and r.steps["step"].tolist() == list(range(1, len(r.steps) + 1))
    assert " ± " in format_summary(s) and "wall, 3 repeats" in format_summary(s)


def test_sim_repeats_are_identical_and_keys_are_complete():
    one = run_experiment(make_cfg(**{"workload.num_requests": 8}), progress=False)
    three = run_experiment(make_cfg(**{"workload.num_requests": 8}, repeats=3), progress=False)
    assert one.summary["repeats"] == 1 and three.summary["repeats"] == 3
    assert one.summary["warmup_s"] == three.summary["warmup_s"] == 0.0  # nothing to warm in the simulator
    for k in TIMED_KEYS:
        assert three.summary[k] == three.summary[f"{k}_min"] == three.summary[f"{k}_max"] == one.summary[k]
        assert three.summary[f"{k}_std"] == 0.0
    same = set(one.summary) - {"repeats"}
    assert {k: one.summary[k] for k in same} == {k: three.summary[k] for k in same}
    assert one.steps.equals(three.steps)
    assert set(SPREAD_KEYS) <= set(one.summary)


def test_sim_with_one_repeat_runs_one_engine(monkeypatch):
    """The simulator path stays as it was: with repeats=1 no warm-up and no second engine run."""
    from pagedlab.engine.engine import Engine

    runs: list[int] = []
    real = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, *a, **kw: runs.append(1) or real(self, *a, **kw))
    run_experiment(make_cfg(**{"workload.num_requests": 4}), progress=False)
    assert len(runs) == 1


def test_aggregate_takes_untimed_keys_from_the_first_repeat():
    base = {k: 1.0 for k in TIMED_KEYS} | {"memory_waste": 0.1, "num_steps": 5}
    out = aggregate([base, base | {"throughput_tok_s": 3.0, "num_steps": 6}])
    assert out["throughput_tok_s"] == 2.0 and out["throughput_tok_s_min"] == 1.0
    assert out["throughput_tok_s_max"] == 3.0
    assert out["throughput_tok_s_std"] == pytest.approx(2 ** 0.5)
    assert out["num_steps"] == 5 and out["repeats"] == 2
