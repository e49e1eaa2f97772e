"""Config tree, schema and validation: every choice composes, bad values fail with clear messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import pagedlab.config as C
from pagedlab.app.api import compose, compose_with_choices, format_override
from pagedlab.overrides import check_overrides

CONF = C.config_dir()
README = Path(__file__).resolve().parents[1] / "README.md"
CHOICES = sorted((g, p.stem) for g in C.GROUPS for p in (CONF / g).glob("*.yaml"))
FITS_ONLY = {"llama_70b": ["hardware=h200", "kv_cache.gpu_memory_utilization=0.95"], "opt_66b": ["hardware=h200", "kv_cache.gpu_memory_utilization=0.95"],
             "llama3_70b": ["hardware=h200", "kv_cache.gpu_memory_utilization=0.95"],
             "opt_175b": None}  # None: fits no single device (no tensor parallelism yet)
NEEDS = {("model", "hf"): "model.name_or_path", ("workload", "trace"): "workload.path"}  # required fields


@pytest.fixture(scope="module")
def local_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What NEEDS's fields point at: a tiny Llama checkpoint config (no weights) and a two-row trace."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("needs")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=500).save_pretrained(root / "ckpt")
    (root / "t.jsonl").write_text('{"prompt_len": 8, "max_tokens": 4}\n{"prompt_len": 5, "max_tokens": 2}\n')
    return {"model.name_or_path": str(root / "ckpt"), "workload.path": str(root / "t.jsonl")}


def test_config_dir_is_the_repo_conf_in_editable_mode() -> None:
    assert (CONF / "config.yaml").is_file()
    assert sorted(p.name for p in CONF.iterdir() if p.is_dir()) == sorted([*C.GROUPS, "experiment"])


def test_defaults_match_the_contract() -> None:
    cfg = compose()
    schema = C.schema_defaults()
    assert {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in C.PART_GROUPS} == \
        {k: v for k, v in schema.items() if k not in C.PART_GROUPS}
    assert all(schema[g] == {} and cfg[g]._target_ for g in C.PART_GROUPS)  # free-form; each names a class
    assert (cfg.allocator.name, cfg.executor.name, cfg.model.name, cfg.logger.name) == (
        "paged", "torch", "tiny_llama", "wandb")
    assert (cfg.block_size, cfg.cow, cfg.prefix_cache, cfg.kv_cache.swap_gib) == (16, True, False, 4.0)


@pytest.mark.parametrize(("group", "choice"), CHOICES)
def test_every_choice_composes_and_validates(group: str, choice: str, local_files: dict[str, str]) -> None:
    field = NEEDS.get((group, choice))
    extra = [f"{field}={local_files[field]}"] if field else []
    if group == "model" and choice not in ("tiny_llama", "hf"):
        extra.append("executor=sim")  # shape presets have no weights for executor=torch
        if choice in FITS_ONLY:  # weights beyond a100_40gb x 0.9: refused there, composes where it fits
            with pytest.raises(C.ConfigError, match=f"model={choice} is not allowed with hardware=a100_40gb"):
                compose_with_choices([f"{group}={choice}", *extra])
            if FITS_ONLY[choice] is None:
                with pytest.raises(C.ConfigError, match="325.2 GiB"):
                    compose_with_choices([f"{group}={choice}", *extra, "hardware=h200"])
                return
            extra += FITS_ONLY[choice]
    cfg, choices = compose_with_choices([f"{group}={choice}", *extra])
    assert choices[group] == choice
    if "name" in cfg[group]:
        assert cfg[group].name == choice


@pytest.mark.parametrize(("group", "choice", "needs"), [(g, c, n) for (g, c), n in NEEDS.items()])
def test_choices_with_required_fields_say_so(group: str, choice: str, needs: str) -> None:
    with pytest.raises(C.ConfigError, match=re.escape(needs)):
        compose(f"{group}={choice}")


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose_and_their_sweeps_are_valid(name: str) -> None:
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = compose(f"+experiment={name}")
    params = yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    assert params and check_overrides([f"{k}={v}" for k, v in params.items()]) == []
    for key, values in params.items():  # each sweep point composes on top of the experiment
        compose(f"+experiment={name}", f"{key}={values.split(',')[-1]}")
    assert cfg.logger.name == "wandb"


def test_parallel_and_beam_sampling() -> None:
    assert (compose("sampling=parallel").sampling.n, compose("sampling=parallel").sampling.temperature) == (4, 1.0)
    assert compose("sampling=beam").sampling.beam_width == 4


BAD = [  # override, words the message must contain
    ("block_size=0", ["block_size", "0", "1..256"]),
    ("block_size=300", ["block_size", "300", "1..256"]),
    ("allocator=pagd", ["allocator", "pagd", "paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle"]),
    ("cow=maybe", ["cow", "maybe", "true or false"]),
    ("foo=1", ["foo", "not a config key", "block_size", "kv_cache"]),
    ("kv_cache.num_block=3", ["kv_cache.num_block", "num_blocks", "did you mean"]),
    ("kv_cache.gpu_memory_utilization=1.5", ["kv_cache.gpu_memory_utilization", "1.5", "(0, 1]"]),
    ("kv_cache.num_blocks=0", ["kv_cache.num_blocks", "0", ">= 1"]),
    ("workload.prompt_len=[9,3]", ["workload.prompt_len", "[9, 3]", "lo <= hi"]),
    ("device=gpu", ["device", "gpu", "auto, cpu, cuda"]),
    ("hardware.name=h300", ["hardware.name", "h300", "a100_40gb"]),
    ("sampling.top_p=0", ["sampling.top_p", "0", "(0, 1]"]),
    ("max_num_seqs=abc", ["max_num_seqs", "abc", "an integer"]),
    ("block_size=8,16,0", ["block_size", "0", "1..256"]),
    ("+experiment=nope", ["experiment", "nope", "memory_waste_breakdown"]),
    ("model.forward=fast", ["model.forward", "fast", "auto", "compact", "hf"]),
    ("repeats=0", ["repeats", "0", ">= 1"]),
    ("warmup_requests=-1", ["warmup_requests", "-1", ">= 0"]),
]


@pytest.mark.parametrize(("override", "words"), BAD)
def test_bad_overrides_name_field_value_and_allowed(override: str, words: list[str]) -> None:
    errors = check_overrides([override])
    assert len(errors) == 1, errors
    for w in words:
        assert w in errors[0], (w, errors[0])
    if "," not in override:
        with pytest.raises(C.ConfigError, match=re.escape(words[0])):
            compose(override)


PART_BAD = [  # a part's own argument: its class refuses it when the checks build it, naming the field
    ("eviction.victim=oldest", ["eviction.victim=oldest", "newest, longest_resident, lru, largest"]),
    ("allocator.order=random", ["allocator.order=random", "lifo, fifo"]),
    ("eviction.mode=drop", ["eviction.mode=drop", "recompute, swap"]),
    ("workload.lengths=zipf", ["workload.lengths=zipf", "sharegpt_like"]),
    ("allocator=contiguous_pow2 allocator.place=worst", ["allocator.place=worst", "first_fit, best_fit"]),
]


@pytest.mark.parametrize(("overrides", "words"), PART_BAD)
def test_bad_part_arguments_name_field_value_and_allowed(overrides: str, words: list[str]) -> None:
    with pytest.raises(C.ConfigError) as info:
        compose("executor=sim", *overrides.split())
    assert len(info.value.problems) == 1, info.value.problems
    for w in words:
        assert w in info.value.problems[0], (w, info.value.problems)


@pytest.mark.parametrize("override", [
    "block_size=1", "block_size=256", "cow=false", "kv_cache.budget_gib=null", "kv_cache.budget_gib=12",
    "workload.request_rate=inf", "device=cuda:1", "+objective=memory_waste", "hydra.run.dir=x",
    "hydra/launcher=joblib", "block_size=range(8,33,8)", "allocator=glob(contiguous_*)",
    "workload.prompt_len=[8,8]", "logger.tags=[a,b]", "model.dtype=bfloat16",
    "model.forward=hf", "repeats=3", "warmup_requests=0",
])
def test_good_overrides_pass(override: str) -> None:
    assert check_overrides([override]) == []


def test_validate_checks_a_composed_config_and_reports_every_problem() -> None:
    cfg = compose("executor=sim")
    cfg.block_size = 0
    cfg.kv_cache.watermark = 1.0
    cfg.workload.num_requests = 0
    with pytest.raises(C.ConfigError) as info:
        C.validate(cfg)
    msg = str(info.value)
    assert "block_size=0" in msg and "kv_cache.watermark=1.0" in msg and "workload.num_requests=0" in msg


def test_schema_types_are_enforced_by_omegaconf() -> None:
    cfg = compose()
    with pytest.raises(Exception, match="block_size"):
        cfg.block_size = "big"
    with pytest.raises(Exception, match="bogus"):
        cfg.bogus = 1


def test_prefix_cache_needs_paged() -> None:
    with pytest.raises(C.ConfigError, match="prefix_cache=true.*contiguous_pow2"):
        compose("allocator=contiguous_pow2", "prefix_cache=true")


def test_compose_works_from_any_directory_and_inside_a_hydra_app(tmp_path: Path, monkeypatch) -> None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(tmp_path)
    assert compose("block_size=8").block_size == 8
    other = tmp_path / "other"
    other.mkdir()
    (other / "cfg.yaml").write_text("x: 1\n")
    with initialize_config_dir(str(other), version_base="1.3"):
        assert compose("executor=sim").executor.name == "sim"
        assert GlobalHydra.instance().is_initialized()
        from hydra import compose as hydra_compose

        assert hydra_compose("cfg").x == 1  # the enclosing app's Hydra is intact


def test_format_override_round_trips() -> None:
    assert format_override("cow", False) == "cow=false"
    assert format_override("kv_cache.budget_gib", None) == "kv_cache.budget_gib=null"
    assert format_override("workload.prompt_len", [8, 16]) == "workload.prompt_len=[8,16]"
    assert format_override("workload.path", "/tmp/a b.jsonl") == "workload.path='/tmp/a b.jsonl'"
    assert compose(format_override("logger.project", "my lab's runs")).logger.project == "my lab's runs"


def _readme_groups() -> dict[str, set[str]]:
    text = README.read_text()
    m = re.search(r"<!-- config-groups:start -->(.*?)<!-- config-groups:end -->", text, re.DOTALL)
    assert m, "README.md needs the config-groups table between <!-- config-groups:start/end --> markers"
    groups: dict[str, set[str]] = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        groups[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", cells[1]))
    return groups


def test_readme_config_groups_table_matches_conf() -> None:
    on_disk = {g: {p.stem for p in (CONF / g).glob("*.yaml")} for g in [*C.GROUPS, "experiment"]}
    assert _readme_groups() == on_disk
