"""Everything checked before work: the CLI refuses bad plans with exit code 2 and no run dir,
every multirun point is checked first, and compose/sweep apply the same checks in-process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import cpu_kernel_here
import pytest

import pagedlab.config as C
from pagedlab.app import api
from pagedlab.app.preflight import preflight
from pagedlab.experiment import build, kv_num_blocks, model_shapes
from pagedlab.models.presets import spec_from_hf_path

TINY = ["executor=sim", "logger=none", "workload.num_requests=4"]
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama checkpoint config (no weights), a trace with a bad row, a folder without config.json."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("preflight")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=500, max_position_embeddings=512).save_pretrained(root / "ckpt")
    (root / "empty").mkdir()
    (root / "bad.jsonl").write_text('{"prompt_len": 8}\n{"prompt_len": "many"}\n')
    (root / "good.jsonl").write_text('{"prompt_len": 8}\n{"prompt_len": 12}\n')
    return {"ckpt": str(root / "ckpt"), "empty": str(root / "empty"), "bad_trace": str(root / "bad.jsonl"),
            "good_trace": str(root / "good.jsonl")}


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    return subprocess.run([sys.executable, "-m", "pagedlab.run", *args, f"hydra.run.dir={tmp / 'run'}",
                           f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


# args (with {ckpt}/{empty}/{bad_trace} placeholders), words the message must contain
REFUSED = {
    "n-and-beam": (["sampling=parallel", "sampling.beam_width=2"], ["sampling.n=4", "sampling.beam_width=2", "choose one"]),
    "workload-n-and-beam": (["workload.n=2", "workload.beam_width=3"],
                            ["workload.n=2", "workload.beam_width=3", "choose one"]),
    "prefix-cache-contiguous": (["prefix_cache=true", "allocator=contiguous_max"],
                                ["prefix_cache=true", "allocator=contiguous_max", "allocator=paged"]),
    "budget-too-small": (["kv_cache.budget_gib=1e-9"],
                         ["kv_cache.budget_gib=1e-09", "max_model_len=2048", "needs 128 blocks", "kv_cache.num_blocks >= 128"]),
    "contiguous-reserves-per-sequence": (["allocator=contiguous_max", "sampling=parallel", "kv_cache.num_blocks=200"],
                                         ["kv_cache.num_blocks=200", "x 4 sequences", "needs 512 blocks"]),
    "n-beyond-max-num-seqs": (["max_num_seqs=1", "sampling=parallel"],
                              ["sampling.n=4 is not allowed with max_num_seqs=1",
                               "each request runs 4 sequences at once, so none could ever be scheduled",
                               "expected max_num_seqs >= 4 or a smaller n"]),
    "workload-beam-beyond-max-num-seqs": (["max_num_seqs=2", "workload.beam_width=3"],
                                          ["workload.beam_width=3 is not allowed with max_num_seqs=2",
                                           "max_num_seqs >= 3 or a smaller beam_width"]),
    "model-too-big": (["model=opt_175b"], ["model=opt_175b", "hardware=a100_40gb", "325.2 GiB", "36.0 GiB"]),
    "no-cuda-device": (["executor=torch", "device=cuda:7"], ["device=cuda:7", "expected"]),
    "preset-without-weights": (["executor=torch", "model=llama_7b"], ["model=llama_7b", "model.name_or_path"]),
    "hf-missing-path": (["model=hf", "model.name_or_path={empty}"], ["model.name_or_path={empty}", "config.json"]),
    "hf-unknown-id": (["model=hf", "model.name_or_path=nobody/no-such-model-xyz"],
                      ["model.name_or_path=nobody/no-such-model-xyz", "local cache"]),
    "lengths-beyond-max-model-len": (["workload.prompt_len=[16,200]", "workload.output_len=[8,100]", "max_model_len=256"],
                                     ["workload.prompt_len=[16, 200]", "workload.output_len=[8, 100]",
                                      "max_model_len=256", "300"]),
    "shared-prefix-beyond-max-model-len": (["workload.shared_prefix_len=300", "max_model_len=256", "workload=fixed",
                                            "workload.prompt_len=[8,8]", "workload.output_len=[8,8]"],
                                           ["workload.shared_prefix_len=300", "at most 254"]),
    "bad-trace": (["workload=trace", "workload.path={bad_trace}"], ["{bad_trace}", "many"]),
    "triton-on-sim": (["kernel=triton"], ["kernel=triton", "executor=sim"]),
    "cpu-kernel-on-sim": (["kernel=cpu"], ["kernel=cpu", "executor=sim"]),
    "unknown-added-key": (["+kv_cache.num_block=10"], ["kv_cache.num_block", "not a config key", "num_blocks"]),
    "unknown-key": (["kv_cache.num_block=10"], ["kv_cache.num_block", "did you mean 'num_blocks'"]),
    "negative-seed": (["seed=-1"], ["seed=-1", "an integer in 0.."]),
    "experiment-without-plus": (["experiment=smoke"], ["experiment=smoke", "+experiment=smoke"]),
    "unknown-objective": (["+objective=speed"], ["objective=speed", "throughput_tok_s"]),
}
if cpu_kernel_here.problem() is None:  # where it cannot be built, that is what the check says first
    REFUSED["cpu-kernel-bf16"] = (["executor=torch", "kernel=cpu", "model.dtype=bfloat16", "device=cpu"],
                                  ["kernel=cpu", "model.dtype=bfloat16", "float32"])
if HAS_TRITON:
    REFUSED["triton-bf16-on-cpu"] = (["executor=torch", "kernel=triton", "model.dtype=bfloat16", "device=cpu"],
                                     ["kernel=triton", "model.dtype=bfloat16", "bfloat16", "CPU"])


def _fill(items: list[str], files: dict[str, str]) -> list[str]:
    return [s.format(**files) for s in items]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_cli_refuses_before_any_work(tmp_path: Path, files: dict[str, str], case: str) -> None:
    args, words = (_fill(x, files) for x in REFUSED[case])
    proc = cli(tmp_path, *TINY, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "nothing was run" in proc.stderr and "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_compose_applies_the_same_checks(files: dict[str, str], case: str) -> None:
    args, words = (_fill(x, files) for x in REFUSED[case])
    with pytest.raises(C.ConfigError) as info:
        api.compose(*TINY, *args)
    assert words[0] in str(info.value)


def test_cli_multirun_checks_every_point_first(tmp_path: Path) -> None:
    proc = cli(tmp_path, "-m", *TINY, "block_size=8,16", "max_model_len=1024,2048", "kv_cache.num_blocks=100")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "invalid sweep, nothing was run: 3 of 4 jobs" in err and "Traceback" not in err
    assert "job 0 (block_size=8 max_model_len=1024)" in err and "job 3 (block_size=16 max_model_len=2048)" in err
    assert "job 2 (" not in err  # block_size=16, max_model_len=1024: 64 blocks fit in 100
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists()


def test_cli_multirun_checks_the_experiment_sweeper_params(tmp_path: Path) -> None:
    proc = cli(tmp_path, "-m", "+experiment=block_size_sweep", "logger=none", "kv_cache.budget_gib=0.5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "invalid sweep, nothing was run: 9 of 9 jobs" in proc.stderr
    assert "job 8 (block_size=256)" in proc.stderr and "kv_cache.budget_gib=0.5" in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_preflight_accepts_good_plans(files: dict[str, str]) -> None:
    assert preflight([*TINY, "+objective=memory_waste", "hydra.job.chdir=false"], False) is None
    assert preflight([*TINY, "block_size=8,16", "allocator=paged,contiguous_max"], True) is None
    assert preflight(["+experiment=memory_waste_breakdown"], True) is None
    assert preflight([*TINY, "model=hf", f"model.name_or_path={files['ckpt']}", "max_model_len=512"], False) is None
    assert preflight([*TINY, "max_num_seqs=4", "sampling=parallel"], False) is None
    # a trace's rows may set their own n: the engine rejects what does not fit, with a reason, at run time
    assert preflight([*TINY, "workload=trace", f"workload.path={files['good_trace']}", "max_num_seqs=1",
                      "sampling=parallel"], False) is None


def test_preflight_checks_every_point_of_a_48_point_sweep() -> None:
    assert preflight([*TINY, "block_size=1,2,4,8,16,32,64,128", "allocator=paged,contiguous_max,contiguous_pow2",
                      "cow=true,false"], True) is None  # 48 points, one Hydra initialization (tests never time)


def test_hf_config_drives_the_simulator(files: dict[str, str]) -> None:
    spec = spec_from_hf_path(files["ckpt"])
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size,
            spec.dtype) == (2, 64, 4, 2, 16, 500, "float32")
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert spec_from_hf_path(files["ckpt"], "bfloat16").dtype == "bfloat16"
    cfg = api.compose(*TINY, "model=hf", f"model.name_or_path={files['ckpt']}", "max_model_len=512",
                      "workload.prompt_len=[8,16]", "workload.output_len=[4,8]")
    assert model_shapes(cfg) == spec
    result = api.run_experiment(cfg, progress=False)
    assert result.summary["num_finished"] == 4 and result.summary["kv_bytes_per_token"] == spec.kv_bytes_per_token


def test_build_and_the_check_size_the_cache_with_one_function() -> None:
    cfg = api.compose(*TINY, "model=llama_13b", "kv_cache.budget_gib=2")
    spec = model_shapes(cfg)
    assert build(cfg).num_blocks == kv_num_blocks(cfg, spec.kv_bytes_per_token, None, "unused") == 163
    cfg = api.compose(*TINY, "model=llama_13b", "hardware=a100_80gb")
    from pagedlab.experiment import sim_budget

    assert build(cfg).num_blocks == kv_num_blocks(cfg, spec.kv_bytes_per_token, *sim_budget(cfg, spec))


def test_sweep_checks_every_point_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list = []
    monkeypatch.setattr(api, "run_experiment", lambda cfg, progress=False: ran.append(cfg))
    with pytest.raises(C.ConfigError) as info:
        api.sweep(TINY, {"max_model_len": [256, 2048], "kv_cache.num_blocks": [20]}, progress=False)
    assert "point 1 (max_model_len=2048 kv_cache.num_blocks=20)" in str(info.value) and "point 0" not in str(info.value)
    with pytest.raises(C.ConfigError, match="kv_cache.num_block.*did you mean"):
        api.sweep(api.compose(*TINY), {"kv_cache.num_block": [20]}, progress=False)
    with pytest.raises(C.ConfigError, match="choose one"):
        api.sweep(api.compose(*TINY), {"sampling": ["parallel"], "workload.beam_width": [2]}, progress=False)
    assert ran == []


def test_sweep_keeps_going_past_a_failed_point(monkeypatch: pytest.MonkeyPatch) -> None:
    real = api.run_experiment

    def flaky(cfg, progress=False):
        if cfg.block_size == 8:
            raise RuntimeError("boom")
        return real(cfg, progress=progress)

    monkeypatch.setattr(api, "run_experiment", flaky)
    with pytest.warns(RuntimeWarning, match=r"(?s)1 of 3 points failed.*block_size=8.*RuntimeError: boom"):
        df = api.sweep(TINY, {"block_size": [4, 8, 16]}, progress=False)
    assert df["status"].tolist() == ["finished", "failed", "finished"]
    assert df["error"].tolist()[1] == "RuntimeError: boom" and df["error"].isna().tolist() == [True, False, True]
    assert df["num_finished"].tolist()[0] == 4 and df["block_size"].tolist() == [4, 8, 16]


def test_triton_variant_that_cannot_fit_shared_memory_is_refused_before_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU with 99 KB of shared memory per program (A10, L4, RTX 4090), head dim 512 in fp32
    fits no tile size: the preflight says so, with what fits, instead of the first attention call."""
    import torch
    from transformers import LlamaConfig

    from pagedlab.kernels import triton_backend

    LlamaConfig(hidden_size=1024, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=512, vocab_size=500, torch_dtype="float32",
                max_position_embeddings=512).save_pretrained(tmp_path / "wide")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(triton_backend, "shared_memory_limit", lambda device: 99 * 1024)
    overrides = ["executor=torch", "model=hf", f"model.name_or_path={tmp_path / 'wide'}", "model.dtype=float32",
                 "device=cuda", "kernel=triton", "logger=none"]
    with pytest.raises(C.ConfigError, match=r"head dim 512 in float32 .* this GPU allows 99 KB.*fit"):
        api.compose(*overrides)
    api.compose(*overrides[:-1], "kernel=torch_gather")  # the other kernel is fine


def test_cpu_kernel_that_cannot_be_built_here_is_refused_before_work(tmp_path: Path) -> None:
    """The check builds kernel=cpu (once per machine): a compiler that cannot is named, and nothing runs."""
    env = {**os.environ, "CC": "no-such-compiler-xyz", "PAGEDLAB_CACHE_DIR": str(tmp_path / "cache")}
    env = {k: v for k, v in env.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    proc = subprocess.run([sys.executable, "-m", "pagedlab.run", *TINY, "executor=torch", "device=cpu", "kernel=cpu",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "nothing was run" in proc.stderr, proc.stderr[-3000:]
    assert "kernel=cpu is not allowed" in proc.stderr and "no-such-compiler-xyz" in proc.stderr
    assert "kernel=torch_gather" in proc.stderr and not (tmp_path / "run").exists()
