"""The paper's figures (pagedlab.figures) at a reduced size: every command runs, writes its CSV and PNG, and each
effect points the paper's way. The full-size numbers are in results/paper/ and the README."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from pagedlab.figures import FIGURES, run_figure
from pagedlab.figures.__main__ import main
from pagedlab.figures.knee import find_knee

matplotlib.use("Agg")


def small(name: str, out: Path, today: bool = False) -> pd.DataFrame:
    output = run_figure(name, small=True, today=today, out=out, quiet=True)
    stem = f"{name}_today" if today else name
    assert output.paths == {"csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    assert output.paths["png"].stat().st_size > 10_000
    data = pd.read_csv(output.paths["csv"])
    assert len(data) == len(output.data) and "ours" in data
    assert len(output.compare) and {"result", "paper", "pagedlab"} <= set(output.compare)
    return data


def test_find_knee_brackets_then_bisects() -> None:
    calls: list[float] = []

    def latency(rate: float) -> float:  # explodes past 3 requests/s
        calls.append(rate)
        return 1.0 if rate <= 3 else 1.0 + 10 * (rate - 3)

    knee = find_knee(latency, threshold=1.5, start=1.0, rel_tol=0.01)
    assert 3.0 <= knee.over and knee.rate <= 3.05 and knee.over / knee.rate <= 1.01 + 1e-9
    assert knee.rate == max(r for r, v in knee.points if v <= 1.5) and calls[:3] == [1.0, 2.0, 4.0]
    down = find_knee(latency, threshold=1.5, start=16.0, rel_tol=0.05)
    assert down.points[1][0] == 8.0 and 2.9 < down.rate <= 3.05
    nan_knee = find_knee(lambda r: math.nan if r > 2 else 0.0, 1.0, 1.0, rel_tol=0.1)  # NaN: nothing finished
    assert 2 / 1.1 <= nan_knee.rate <= 2 < nan_knee.over


def test_fig2_token_share_orders_max_pow2_oracle_paged(tmp_path: Path) -> None:
    data = small("fig2", tmp_path).set_index("system")
    share = data["pool_token_share"]
    assert share["orca_max"] < share["orca_pow2"] < share["orca_oracle"] < share["paged"]
    assert data["paper_token_share"]["paged"] == pytest.approx(0.963)
    shares = data[[c for c in data if c.startswith("pool_") and c.endswith("_share")]].sum(axis=1)
    assert shares.to_numpy() == pytest.approx(1.0, abs=1e-4)  # the CSV keeps 6 digits


def test_fig13_vllm_batches_more_than_oracle_and_max(tmp_path: Path) -> None:
    data = small("fig13", tmp_path)
    assert sorted(data["rate"].unique()) == [2.0, 2.2]  # the paper's rate, and one near our vLLM's knee
    for _, g in data.groupby("rate"):
        batch = g.set_index("system")["batch_size_mean"]
        assert batch["paged"] > batch["orca_oracle"] > batch["orca_max"]


def test_fig15_saving_grows_with_samples_and_beam_width(tmp_path: Path) -> None:
    data = small("fig15", tmp_path)
    for _, g in data.groupby(["workload", "mode"]):
        saving = list(g.sort_values("size")["sharing_saving"])
        assert saving == sorted(saving) and saving[0] > 0
    beam, parallel = (data[data["mode"] == m].set_index(["workload", "size"])["sharing_saving"]
                      for m in ("beam", "parallel"))
    assert (beam > parallel).all()  # beams share more than independent samples


def test_fig18_block_1_is_worse_than_16(tmp_path: Path) -> None:
    data = small("fig18", tmp_path)
    for _, g in data.groupby("workload"):
        latency = g.set_index("block_size")["normalized_latency"]
        assert latency[1] > latency[16]


def test_fig18_and_fig19_rates_sit_below_vllm_knee_from_fig12_csv() -> None:
    from pagedlab.figures import fig18, fig19

    csv = Path(__file__).resolve().parents[1] / "results" / "paper" / "fig12.csv"
    if not csv.exists():
        pytest.skip("no results/paper/fig12.csv")
    knees = pd.read_csv(csv).query("row == 'knee' and system == 'paged' and rule == 'queue' and model == 'opt_13b'")
    for workload, knee in fig18.VLLM_QUEUE_KNEE_AT_16.items():
        assert knee == pytest.approx(knees.set_index("workload").loc[workload, "knee_rate"], rel=1e-4)
        rate, seconds = fig18.WORKLOADS[workload]
        assert rate == pytest.approx(fig18.KNEE_FRACTION * knee, rel=0.01) and rate < knee
        assert seconds == fig18.trace_seconds(workload)
    assert (fig19.E2E_RATE, fig19.E2E_DURATION_S) == fig18.WORKLOADS["sharegpt_like"]


def test_fig19_swap_costs_more_against_recompute_at_small_blocks(tmp_path: Path) -> None:
    data = small("fig19", tmp_path)
    micro = data[data["part"] == "microbenchmark"].set_index("block_size")
    assert micro.loc[4, "swap_over_recompute"] > micro.loc[64, "swap_over_recompute"]
    assert micro.loc[4, "swap_over_recompute"] > 1
    recompute = micro["recompute_s"]
    assert recompute.max() / recompute.min() < 1.01  # recompute hardly depends on the block size
    e2e = data[data["part"] == "end_to_end"].pivot(index="block_size", columns="eviction", values="normalized_latency")
    assert e2e.loc[1, "swap"] / e2e.loc[1, "recompute"] > e2e.loc[64, "swap"] / e2e.loc[64, "recompute"]


def test_kernels_paged_costs_20_to_26_percent_more(tmp_path: Path) -> None:
    data = small("kernels", tmp_path)
    assert data["overhead"].between(0.20, 0.26).all()


@pytest.mark.slow
def test_fig12_vllm_sustains_higher_rates_than_every_orca(tmp_path: Path) -> None:
    data = small("fig12", tmp_path)
    knees = data[data["row"] == "knee"]
    assert set(knees["rule"]) == {"queue", "latency"}  # the paper's capacity and its "similar latency"
    for _, g in knees.groupby("rule"):
        knee = g.set_index("system")["knee_rate"]
        assert knee["paged"] > knee["orca_oracle"] and knee["paged"] > knee["orca_max"]
        assert knee["orca_oracle"] > knee["orca_max"]
    points = data[data["row"] == "point"]
    assert (points["num_requests"] >= 30).all()
    assert not points.duplicated(["system", "rate"]).any()  # a rate both rules evaluate runs once
    light = data[data["row"] == "light_load"].iloc[0]
    assert light["ttft_threshold"] == pytest.approx(10 * light["ttft_p50"])


@pytest.mark.slow
def test_today_scale_is_labelled_ours(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fig2", "--small", "--today", "--out", str(tmp_path)]) == 0
    data = pd.read_csv(tmp_path / "fig2_today.csv")
    assert set(data["scale"]) == {"today (ours)"} and set(data["model"]) == {"llama3_8b"}
    assert "ours" in capsys.readouterr().out


def test_every_figure_is_listed_and_a_bad_name_is_refused(tmp_path: Path) -> None:
    assert {"fig2", "fig12", "fig13", "fig15", "fig18", "fig19", "kernels"} <= set(FIGURES)
    with pytest.raises(ValueError, match="not allowed"):
        run_figure("fig99", out=tmp_path)
    with pytest.raises(ValueError, match="no --today"):
        run_figure("kernels", today=True, out=tmp_path)


def test_the_paper_batching_style_is_set_in_one_place_and_only_when_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedlab.figures import common

    assert common.PAPER_BATCHING == {"batching": "prefill_first"}
    monkeypatch.setattr(common, "scheduler_has_batching_key", lambda: True)
    assert "batching=prefill_first" in common.base_overrides("opt_13b", "a100_40gb", "sharegpt_like")
    assert not any(o.startswith("batching=") for o in common.base_overrides("llama3_8b", "h100_80gb",
                                                                          "sharegpt_like", today=True))
    assert "prefill_first" in common.batching_note()
    monkeypatch.setattr(common, "scheduler_has_batching_key", lambda: False)  # no key: the scheduler's one style
    assert not any(o.startswith("batching=") for o in common.base_overrides("opt_13b", "a100_40gb", "sharegpt_like"))
    assert "mixed" in common.batching_note()
