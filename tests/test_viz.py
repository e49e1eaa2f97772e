"""pagedlab.viz: snapshots agree with the block manager, and every figure says what it shows."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from pagedlab import compose
from pagedlab.experiment import build
from pagedlab.viz import (
    BlockTableRecorder,
    animate_block_tables,
    draw_block_tables,
    memory_stack,
    metric_vs_key,
    plot_latency,
    plot_timeseries,
    record_run,
    save_gif,
    to_html,
)
from pagedlab.viz.snapshot import CACHED, FREE, USED, config_context

# parallel sampling in a pool small enough that a group is preempted (swapped out) and comes back
OVERRIDES = [
    "executor=sim", "model=opt_13b", "hardware=a100_40gb", "logger=none", "workload=uniform",
    "workload.num_requests=6", "workload.prompt_len=[12,40]", "workload.output_len=[12,40]",
    "sampling=parallel", "sampling.n=3", "kv_cache.num_blocks=24", "max_model_len=128", "seed=3",
]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def record_checked(overrides):
    """Record a run at every step, checking each snapshot against the live block manager then."""
    cfg = compose(*overrides)
    built = build(cfg)
    bm = built.engine.bm
    problems: list[str] = []

    def check(row):
        snap = rec.snapshots[-1]
        live_ref = [bm.ref_count(b) for b in range(bm.num_blocks)]
        if snap.ref_counts != live_ref:
            problems.append(f"step {snap.step}: ref counts differ")
        if bm.allocator == "paged" and snap.table_ref_counts() != live_ref:
            problems.append(f"step {snap.step}: ref counts recomputed from the tables differ")
        st = bm.stats()
        if (snap.states.count(USED), snap.states.count(FREE) + snap.states.count(CACHED),
                snap.states.count(CACHED)) != (st.used_blocks, st.free_blocks, st.cached_blocks):
            problems.append(f"step {snap.step}: states differ from stats {st}")
        for s in snap.seqs:
            table = bm.host_block_table(s.seq_id) if s.swapped else bm.block_table(s.seq_id)
            if list(s.block_table) != list(table) or s.num_tokens != bm.num_tokens(s.seq_id):
                problems.append(f"step {snap.step}: sequence {s.seq_id} differs")
        if {s.seq_id for s in snap.seqs} != set(bm.seq_ids()):
            problems.append(f"step {snap.step}: sequences differ")

    rec = BlockTableRecorder(built.engine, every=1, max_steps=None, context=config_context(cfg), on_step=check)
    result = built.engine.run(built.requests, on_step=rec)
    rec.detach()
    return result, rec.snapshots, problems


@pytest.fixture(scope="module")
def recorded():
    return record_checked(OVERRIDES)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The same run through record_run (config and run keys filled in) and saved as a run dir."""
    result, snaps = record_run(OVERRIDES, max_steps=None)
    d = result.save(tmp_path_factory.mktemp("run"))
    return result, snaps, d


def _suptitle(ax) -> str:
    sup = ax.figure._suptitle
    return sup.get_text() if sup is not None else ""


# -- snapshots ------------------------------------------------------------------------------------------
def test_snapshots_agree_with_the_block_manager(recorded):
    result, snaps, problems = recorded
    assert not problems, problems[:5]
    assert len(snaps) == result.summary["num_steps"]
    assert [s.step for s in snaps] == list(result.steps["step"])


def test_sharing_cow_and_swapping_are_recorded(recorded):
    result, snaps, _ = recorded
    # the n=3 samples of a request share its prompt's blocks
    shared = [(s, b) for s in snaps for b in s.shared_blocks]
    assert shared
    snap, b = shared[0]
    holders = snap.owners()[b]
    assert len(holders) == snap.ref_counts[b] > 1
    assert len({h.request_id for h in holders}) == 1
    # copy-on-write: one snapshot per CoW copy the step table counts; each copy lands in a table
    assert sum(len(s.cow_copies) for s in snaps) == result.summary["cow_copies"] > 0
    for s in snaps:
        held = {b for q in s.resident for b in q.block_table}
        for src, dst in s.cow_copies:
            assert src != dst and s.states[dst] in (USED, FREE)  # FREE: its sequence finished this step
            assert dst in held or s.states[dst] == FREE
    # preemption swaps the group out (several samples): its sequences keep host tables
    assert sum(s.num_preempted for s in snaps) == result.summary["num_preemptions"] > 0
    swapped = [s for s in snaps if s.on_host]
    assert swapped and all(q.block_table for s in swapped for q in s.on_host)
    assert all(set(s.swapped) == {q.request_id for q in s.on_host} for s in swapped)


def test_recording_is_opt_in_every_and_max_steps():
    built = build(compose(*OVERRIDES))
    assert "schedule" not in vars(built.engine.scheduler)
    rec = BlockTableRecorder(built.engine, every=3, max_steps=4)
    assert "schedule" in vars(built.engine.scheduler)
    result = built.engine.run(built.requests, on_step=rec)
    assert [s.step for s in rec.snapshots] == [1, 4, 7, 10]
    assert rec.calls == result.summary["num_steps"]
    rec.detach()
    assert "schedule" not in vars(built.engine.scheduler)
    with pytest.raises(ValueError, match="every"):
        BlockTableRecorder(built.engine, every=0)


VARIANTS = {  # what each policy shows: beams (CoW), the prefix cache (cached blocks), eager fork copies,
    # contiguous reservations past the table
    "beam": ["sampling=beam", "sampling.beam_width=3"],
    "prefix_cache": ["prefix_cache=true", "workload.shared_prefix_len=32", "workload.request_rate=20"],
    "no_cow": ["sampling=parallel", "sampling.n=2", "cow=false"],
    "contiguous": ["allocator=contiguous_oracle"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_snapshots_of_other_policies(name):
    base = [o for o in OVERRIDES if not o.startswith(("sampling", "kv_cache", "workload.num_requests"))]
    result, snaps, problems = record_checked([*base, "workload.num_requests=4", "kv_cache.num_blocks=32",
                                              *VARIANTS[name]])
    assert not problems, problems[:5]
    if name == "beam":
        assert any(s.shared_blocks for s in snaps) and sum(len(s.cow_copies) for s in snaps) > 0
    if name == "prefix_cache":
        assert any(s.states.count(CACHED) for s in snaps)
        ax = draw_block_tables(next(s for s in snaps if s.states.count(CACHED)))
        assert "cached" in {c.get_gid() for c in ax.collections} and "prefix cache" in ax.get_title()
    if name == "no_cow":
        assert not any(s.shared_blocks for s in snaps)
        assert sum(len(s.fork_copies) for s in snaps) == result.summary["fork_copies"] > 0
        ax = draw_block_tables(next(s for s in snaps if s.fork_copies))
        assert "fork_copy" in {c.get_gid() for c in ax.collections}
    if name == "contiguous":
        snap = next(s for s in snaps if any(q.reservation and q.reservation[1] > len(q.block_table)
                                           for q in s.resident))
        ax = draw_block_tables(snap)
        assert "reserved" in {c.get_gid() for c in ax.collections} and "contiguous_oracle" in ax.get_title()


# -- block tables and the animation ----------------------------------------------------------------------
def test_draw_block_tables_marks_shared_blocks_and_cow_copies(recorded):
    _, snaps, _ = recorded
    snap = next(s for s in snaps if s.cow_copies and s.shared_blocks)
    ax = draw_block_tables(snap)
    title = ax.get_title()
    assert f"step {snap.step}" in title and "24 blocks" in title and "16 tokens" in title
    assert "opt_13b" in title and "a100_40gb" in title and "6 requests" in title and "n=3" in title
    assert ax.get_xlabel() and ax.get_ylabel()
    by_gid = {c.get_gid(): c for c in ax.collections}
    # every shared block is outlined in the pool and in each table entry pointing at it
    entries = sum(1 for q in snap.resident for b in q.block_table if snap.ref_counts[b] > 1)
    host = sum(1 for q in snap.on_host for h in q.block_table if snap.host_ref_counts[h] > 1)
    assert len(by_gid["shared"].get_paths()) == len(snap.shared_blocks) + entries + host
    cow_dst = {d for _, d in snap.cow_copies}
    cow_entries = sum(1 for q in snap.resident for b in q.block_table if b in cow_dst)
    assert len(by_gid["cow_copy"].get_paths()) == len(cow_dst) + cow_entries
    labels = [t.get_text() for t in ax.texts]
    assert all(f"{b}\n×{snap.ref_counts[b]}" in labels for b in snap.shared_blocks)
    assert len(by_gid["blocks"].get_paths()) == snap.num_blocks + sum(len(q.block_table) for q in snap.seqs)


def test_animation_saves_a_gif_with_one_frame_per_snapshot(recorded, tmp_path):
    from PIL import Image

    _, snaps, _ = recorded
    frames = snaps[:5]
    anim = animate_block_tables(frames, interval=250, dpi=40)
    path = save_gif(anim, tmp_path / "blocks.gif")
    with Image.open(path) as im:
        assert im.n_frames == len(frames)
    html = to_html(animate_block_tables(frames[:2], dpi=30))
    assert "<img" in html or "<script" in html
    assert html._repr_html_() == str(html)


# -- time series, latency ----------------------------------------------------------------------------
def test_timeseries_from_result_run_dir_and_frame(run):
    result, _, d = run
    for source, kw in ((result, {}), (d, {"unit": "percent", "x": "time"}), (result.steps, {"context": d})):
        top, bottom = plot_timeseries(source, **kw)
        title = top.get_title()
        assert "opt_13b" in title and "24 blocks" in title and "6 requests" in title
        assert "blocks" in top.get_ylabel() or "%" in top.get_ylabel()
        assert bottom.get_xlabel() in ("engine step", "time on the run's clock (s)")
        assert "sequences" in bottom.get_ylabel()
        assert any("preemption" in t for t in bottom.get_legend_handles_labels()[1])
    stack = memory_stack(result.steps, 24, 16)
    assert np.allclose(stack.sum(axis=1), 24 * 16)
    assert np.allclose(stack["token"] + stack["reserved"] + stack["internal"], result.steps["allocated_slots"])
    # a bare table still gets the pool size right (from its own columns)
    top, _ = plot_timeseries(result.steps)
    assert top.get_ylim()[1] == 24
    plt.close("all")


def test_latency_distributions(run):
    result, _, d = run
    axes = plot_latency(result)
    assert [ax.get_xlabel() for ax in axes] == ["time to first token (ms)", "time per output token (ms/token)",
                                                "normalized latency = latency / output tokens (ms/token)"]
    assert all(ax.get_ylabel() for ax in axes)
    assert "opt_13b" in _suptitle(axes[0]) and "6 requests" in _suptitle(axes[0])
    axes = plot_latency({"a": result, "b": d}, metrics=["ttft"], kind="hist", unit="s")
    assert axes[0].get_xlabel() == "time to first token (s)"
    assert len(axes[0].get_legend().get_texts()) == 2


# -- a sweep's metric against a key -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_table():
    from pagedlab import sweep

    base = [o for o in OVERRIDES if not o.startswith(("sampling", "kv_cache"))] + ["kv_cache.num_blocks=48"]
    return sweep(base, {"block_size": [8, 16], "sampling": ["greedy", "parallel"]}, progress=False)


def test_metric_vs_key_draws_one_line_per_other_varying_key(sweep_table):
    df = sweep_table
    assert (df["status"] == "finished").all()
    ax = metric_vs_key(df, "memory_waste", "block_size")
    # sampling varies (and sampling.n, sampling.temperature with it): one line per sampling, none per .n
    assert ax.get_legend().get_title().get_text() == "sampling"
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["sampling=greedy", "sampling=parallel"]
    assert len(ax.get_lines()) == 2
    assert ax.get_xlabel() == "block_size (tokens)" and ax.get_ylabel() == "memory_waste (fraction)"
    title = ax.get_title()
    assert "memory_waste against block_size" in title and "opt_13b" in title and "6 requests" in title
    ys = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    want = df[df["sampling"] == "parallel"].sort_values("block_size")["memory_waste"].to_numpy()
    assert np.allclose(ys["sampling=parallel"], want)


def test_metric_vs_key_refuses_to_average_silently(sweep_table):
    df = sweep_table
    # the lines of hue=allocator (a key that does not vary) would each average over sampling
    with pytest.raises(ValueError, match=r"sampling.*also vary"):
        metric_vs_key(df, "memory_waste", "block_size", hue="allocator")
    ax = metric_vs_key(df, "memory_waste", "block_size", hue="allocator", average_over=["sampling", "sampling.n",
                                                                                         "sampling.temperature"])
    assert "mean over sampling" in ax.get_title()
    # repeats of a point are aggregated, and the title says so
    ax = metric_vs_key(pd.concat([df, df]), "memory_waste", "block_size")
    assert "up to 2 runs per point" in ax.get_title()
    # failed runs are left out, with a warning
    bad = df.assign(status=["finished", "failed", "finished", "finished"])
    with pytest.warns(RuntimeWarning, match="failed"):
        ax = metric_vs_key(bad, "memory_waste", "block_size")
    assert "1 failed run left out" in ax.get_title()
    with pytest.raises(KeyError, match="no column"):
        metric_vs_key(df, "nope", "block_size")


def test_metric_vs_key_reads_run_dirs(run, tmp_path):
    result, _, _ = run
    for bs in (8, 16):  # two saved runs that differ in their config's block_size only
        dataclasses.replace(result, config={**result.config, "block_size": bs}).save(tmp_path / f"bs{bs}")
    ax = metric_vs_key(str(tmp_path / "*"), "memory_waste", "block_size")
    assert len(ax.get_lines()) == 1 and list(ax.get_lines()[0].get_xdata()) == [8, 16]
    assert "opt_13b" in ax.get_title()
