"""The worked plug-ins of experiments/plugins/ (docs/extending.md): parts outside the package, run from the
CLI with ``-cd`` as a user runs them, from their notebook, and under the block manager's invariant checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

import pagedlab
from pagedlab.app.checks import check_plan
from pagedlab.config import ConfigError, config_dir
from pagedlab.experiment import build

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "experiments" / "plugins"
NOTEBOOK = ROOT / "experiments" / "your_own_part.ipynb"
# a burst of 40 requests on 64 blocks of 16 tokens: the built-in paged allocator must preempt
BURST = ["executor=sim", "model=opt_13b", "workload=uniform", "workload.num_requests=40",
         "kv_cache.num_blocks=64", "max_model_len=256", "logger=none"]


@pytest.fixture(autouse=True)
def plugins_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m pagedlab.run -cd experiments/plugins/conf ARGS`` with the plug-ins on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(PLUGINS), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "pagedlab.run", "-cd", str(PLUGINS / "conf"), *args],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False)


def summary_of(proc: subprocess.CompletedProcess, run: Path) -> dict:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_finished"] + summary["num_rejected"] == summary["num_requests"] == 40
    assert summary["num_finished"] == 40
    return summary


def with_parts(base, **choices: str):
    """``base`` with each group's node loaded from the plug-ins' conf (else pagedlab's), then checked."""
    cfg = base.copy()
    for group, name in choices.items():
        path = PLUGINS / "conf" / group / f"{name}.yaml"
        cfg[group] = OmegaConf.load(path if path.is_file() else config_dir() / group / f"{name}.yaml")
    check_plan(cfg)
    return cfg


@pytest.fixture(scope="module")
def burst():
    return pagedlab.compose(*BURST)


# ------------------------------------------------------------------ the CLI, as a user runs it
def test_cli_runs_the_plugin_allocator_and_victim(tmp_path: Path, burst) -> None:
    """-cd adds the plug-ins' conf to pagedlab's: the plug-in allocator never preempts where the built-in
    paged one does, and the plug-in victim changes which groups a paged run preempts."""
    cons = tmp_path / "conservative"
    s = summary_of(cli(tmp_path, *BURST, "allocator=conservative_paged",
                       "eviction=recompute_fewest_preemptions", f"hydra.run.dir={cons}"), cons)
    config = json.loads((cons / "config.json").read_text())
    assert config["allocator"]["_target_"] == "pagedlab_plugins.allocators.conservative_paged"
    assert s["num_preemptions"] == 0

    paged = tmp_path / "paged"
    s = summary_of(cli(tmp_path, *BURST, "allocator=paged", "eviction=recompute_most_remaining",
                       f"hydra.run.dir={paged}"), paged)
    newest = pagedlab.run_experiment(burst, progress=False).summary  # the same run with the built-in victim
    assert s["num_preemptions"] > 0 and newest["num_preemptions"] > 0
    assert s["normalized_latency_mean"] < newest["normalized_latency_mean"]  # what MostRemaining is for


def test_cli_names_a_bad_plugin_argument(tmp_path: Path) -> None:
    run = tmp_path / "bad"
    proc = cli(tmp_path, *BURST, "allocator=conservative_paged", "allocator.reserve_fraction=2",
               f"hydra.run.dir={run}")
    assert proc.returncode == 2
    assert "allocator.reserve_fraction=2 is not allowed: expected a number in [0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run / "summary.json").exists()


# ------------------------------------------------------------------ invariants and counts, in-process
@pytest.mark.parametrize("allocator, cow, prefix_cache", [
    ("conservative_paged", True, False), ("conservative_paged", False, False),
    ("conservative_paged", True, True), ("contiguous_worst_fit", False, False)])
@pytest.mark.parametrize("sampling", [{}, {"n": 3, "temperature": 1.0}, {"beam_width": 3}],
                         ids=["greedy", "n3", "beam3"])
def test_plugin_allocators_keep_the_invariants(burst, allocator: str, cow: bool, prefix_cache: bool,
                                               sampling: dict) -> None:
    cfg = with_parts(burst, allocator=allocator)
    cfg.cow, cfg.prefix_cache = cow, prefix_cache
    cfg.workload.num_requests, cfg.workload.shared_prefix_len = 16, 24 if prefix_cache else 0
    cfg.sampling.merge_with(sampling)
    built = build(cfg)
    bm = built.engine.bm
    result = built.engine.run(built.requests, on_step=lambda row: bm.check_invariants())
    bm.check_invariants()
    s = result.summary
    assert s["num_finished"] + s["num_rejected"] == s["num_requests"] == 16
    assert bm.stats().used_blocks == 0 and bm.seq_ids() == []
    if allocator == "conservative_paged" and not sampling.get("beam_width"):
        assert s["num_preemptions"] == 0  # every block a sequence takes was counted when it was admitted


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("victim", ["MostRemaining", "FewestPreemptions"])
def test_plugin_victims_do_what_they_promise(burst, mode: str, victim: str) -> None:
    """Every request finishes; against the built-in ``newest`` on the same burst, MostRemaining lowers the
    mean normalized latency and FewestPreemptions spreads preemptions (more requests hit, none more often)."""

    def run(victim_node):
        cfg = burst.copy()
        cfg.eviction = {"_target_": "pagedlab.engine.preemption.Preemption", "mode": mode,
                        "victim": victim_node}
        check_plan(cfg)
        built = build(cfg)
        result = built.engine.run(built.requests, on_step=lambda row: built.engine.bm.check_invariants())
        s = result.summary
        assert s["num_finished"] == s["num_requests"] == 40 and s["num_preemptions"] > 0
        return s, result.requests.groupby("request_id").num_preemptions.max()

    s, per_request = run({"_target_": f"pagedlab_plugins.victims.{victim}"})
    newest, newest_per_request = run("newest")
    if victim == "MostRemaining":
        assert s["normalized_latency_mean"] < newest["normalized_latency_mean"]
    else:
        assert per_request.max() <= newest_per_request.max()
        assert (per_request > 0).sum() > (newest_per_request > 0).sum()


def test_victims_break_ties_by_arrival() -> None:
    from pagedlab_plugins.victims import FewestPreemptions, MostRemaining

    from pagedlab.engine.request import Request, SamplingParams, Sequence, SequenceGroup

    def group(i: int, arrival: float, max_tokens: int, out: int = 0, preempted: int = 0) -> SequenceGroup:
        g = SequenceGroup(Request(i, [1, 2], arrival, SamplingParams(max_tokens=max_tokens)),
                          Sequence(i, [1, 2] + [3] * out, 2))
        g.num_preemptions = preempted
        return g

    a, b, c = group(0, 0.0, 50, out=10), group(1, 1.0, 40), group(2, 1.0, 45, out=5)  # remaining 40, 40, 40
    assert MostRemaining().pick([a, b, c], None) is c  # tie on remaining and arrival: the later id
    assert MostRemaining().pick([a, b, group(3, 0.5, 99)], None).request_id == 3
    x, y, z = group(0, 0.0, 9, preempted=1), group(1, 2.0, 9, preempted=2), group(2, 1.0, 9, preempted=1)
    assert FewestPreemptions().pick([x, y, z], None) is z  # fewest preemptions, then the newest arrival


def test_bad_plugin_arguments_name_the_field(burst) -> None:
    cfg = burst.copy()
    cfg.allocator = {"_target_": "pagedlab_plugins.allocators.conservative_paged", "reserve_fraction": 1.5}
    with pytest.raises(ConfigError, match=r"allocator\.reserve_fraction=1\.5 is not allowed: expected a num"):
        check_plan(cfg)


def test_worst_fit_takes_the_largest_run() -> None:
    from pagedlab_plugins.allocators import worst_fit

    starts, length = [0, 10, 20], {0: 4, 10: 8, 20: 8}
    assert worst_fit(starts, length, 3) == 10 and worst_fit(starts, length, 9) is None


# ------------------------------------------------------------------ the notebook
def test_plugins_notebook_runs() -> None:
    """Runs the notebook's code cells in one namespace at its default size and checks its tables (the notebook
    asserts its own counts too); tests/test_notebooks.py runs it in a Jupyter kernel."""
    import matplotlib

    matplotlib.use("Agg")
    ns: dict = {"display": print}
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), ns)  # noqa: S102 - running the notebook is the point
    table = ns["table"]
    assert table.loc["conservative_paged", "num_preemptions"] == 0
    assert table.loc["paged + newest (built-in)", "num_preemptions"] > 0
    assert ns["fractions"].loc[1.0, "num_preemptions"] == 0  # and 0.0 equals paged: the notebook asserts it
    import matplotlib.pyplot as plt

    plt.close("all")


# ------------------------------------------------------------------ the kernel
TINY_TORCH = ["executor=torch", "model=tiny_llama", "device=cpu", "workload.num_requests=4",
              "workload.prompt_len=[4,12]", "workload.output_len=[4,10]", "kv_cache.num_blocks=16", "block_size=4",
              "max_model_len=32", "warmup_requests=0", "logger=none"]


def test_cli_runs_the_plugin_kernel_with_the_same_tokens(tmp_path: Path) -> None:
    """The user's kernel, chosen from their config dir, generates what pagedlab's gather kernel does (greedy)."""
    tokens = {}
    for kernel in ("reference", "torch_gather"):
        run = tmp_path / kernel
        proc = cli(tmp_path, *TINY_TORCH, f"kernel={kernel}", f"hydra.run.dir={run}")
        assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        config = json.loads((run / "config.json").read_text())
        df = pd.read_parquet(run / "requests.parquet").sort_values(["request_id", "seq_index"])
        tokens[kernel] = [list(t) for t in df["output_token_ids"]]
        assert len(tokens[kernel]) == 4 and config["kernel"]["name"] == kernel
    assert config["kernel"]["_target_"] == "pagedlab.kernels.torch_gather.TorchGatherKernel"
    assert tokens["reference"] == tokens["torch_gather"]


def _gather_kernel():
    from pagedlab import kernels

    assert hasattr(kernels, "AttentionKernel")  # the protocol the plug-in kernel implements
    from pagedlab.kernels.torch_gather import TorchGatherKernel

    return TorchGatherKernel()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("compute_dtype", ["float32", "float64"])
def test_reference_kernel_matches_the_gather_kernel(window: int | None, compute_dtype: str) -> None:
    gather = _gather_kernel()
    import torch
    from pagedlab_plugins.kernels import ReferenceKernel

    from pagedlab.kernels import build_metadata

    ref = ReferenceKernel(compute_dtype=compute_dtype)
    gen = torch.Generator().manual_seed(0)
    bs, kv_heads, group, dim = 4, 2, 3, 8
    qlens, ctxs = [1, 6, 1, 9], [13, 6, 3, 17]  # decodes, a prefill, a prefill over a cached prefix
    need = [-(-c // bs) for c in ctxs]
    ids = torch.randperm(sum(need) + 2, generator=gen).tolist()  # scattered blocks, two spare
    tables = [ids[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(need))]
    slots = [t[p // bs] * bs + p % bs for q, c, t in zip(qlens, ctxs, tables) for p in range(c - q, c)]
    meta = build_metadata(qlens, ctxs, tables, slots, bs)
    pool = torch.randn(2, len(ids), bs, kv_heads, dim, generator=gen)  # the cached prefixes (and garbage)
    num_tokens = sum(qlens)
    q = torch.randn(num_tokens, kv_heads * group, dim, generator=gen)
    k, v = torch.randn(2, num_tokens, kv_heads, dim, generator=gen).unbind(0)
    kv_a, kv_b = pool.clone(), pool.clone()
    out = ref.attention(q, k, v, kv_a, meta, dim**-0.5, window)
    expected = gather.attention(q, k, v, kv_b, meta, dim**-0.5, window)
    assert torch.equal(kv_a, kv_b)  # the same write_kv
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert ref.name == "reference" and out.dtype == q.dtype


def test_reference_kernel_refuses_a_bad_dtype() -> None:
    _gather_kernel()
    from pagedlab_plugins.kernels import ReferenceKernel

    from pagedlab.errors import BadArgument

    with pytest.raises(BadArgument, match="compute_dtype=float16 is not allowed"):
        ReferenceKernel(compute_dtype="float16")
