"""Dataclass configs: YAML, key=value overrides, unknown keys rejected, every shipped config loads."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from supersub.config import ConfigError, describe, field, load_config, parse_overrides, save_config, to_dict


@dataclass
class Inner:
    lr: float = field(0.1, help="learning rate")
    stages: list[str] = field(default_factory=lambda: ["a"], help="stages")


@dataclass
class Outer:
    name: str = field("x", help="name")
    epochs: int = field(3, help="epochs")
    flag: bool = field(False, help="a flag")
    maybe: int | None = field(None, help="optional")
    inner: Inner = field(Inner(), help="section")


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\ninner:\n  lr: 1\n")
    cfg = load_config(Outer, f, ["inner.stages=[b, c]", "flag=true", "maybe=4"])
    assert cfg.epochs == 5 and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.stages == ["b", "c"] and cfg.flag is True and cfg.maybe == 4
    assert load_config(Outer).inner is not Outer().inner  # sections are not shared between instances


def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key inner\.lrr \(did you mean inner\.lr\?\)"):
        load_config(Outer, None, ["inner.lrr=3"])
    f = tmp_path / "c.yaml"
    f.write_text("epoch: 5\n")
    with pytest.raises(ConfigError, match="unknown config key epoch"):
        load_config(Outer, f)


@pytest.mark.parametrize(
    "override, message",
    [("epochs=abc", "expected an integer"), ("flag=3", "true or false"), ("inner=3", "mapping"), ("name", "key=value")],
)
def test_type_errors_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["epochs=9"])
    save_config(cfg, tmp_path / "r.yaml")
    assert to_dict(load_config(Outer, tmp_path / "r.yaml")) == to_dict(cfg)


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_describe_lists_every_option_with_help():
    rows = {k: h for k, _, h in describe(Outer)}
    assert rows["inner.lr"] == "learning rate" and "epochs" in rows


CONFIG_FILES = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_file_loads(path):
    """Pipeline configs load as PipelineConfig; study files load with every variant applied."""
    from jobs.study import load_study
    from supersub.pipeline_config import PipelineConfig

    if path.name.startswith("study_"):
        base, variants, _ = load_study(path)
        for v in variants.values():
            load_config(PipelineConfig, base, v["overrides"])
    else:
        load_config(PipelineConfig, path)


def test_config_files_exist():
    names = {p.name for p in CONFIG_FILES}
    assert {"default.yaml", "tiny_imagenet.yaml", "imagenet_paper10.yaml"} <= names


def test_partial_section_keeps_that_sections_own_defaults():
    from supersub.pipeline_config import PipelineConfig

    cfg = load_config(PipelineConfig, None, ["specialist.optim.epochs=2", "model.width=0.5"])
    default = PipelineConfig()
    assert cfg.specialist.optim.epochs == 2
    assert cfg.specialist.optim.lr == default.specialist.optim.lr != 0.1  # not OptimConfig's class default
    assert cfg.specialist.optim.weight_decay == 0.0
    assert cfg.model.backbone == default.model.backbone == "resnet10"


def test_yaml_on_and_off_mean_the_words():
    """YAML 1.1 reads a bare on/off as true/false; an option whose values are on/off takes either."""
    from supersub.pipeline_config import PipelineConfig

    assert load_config(PipelineConfig, None, ["train.channels_last=on"]).train.channels_last == "on"
    assert load_config(PipelineConfig, None, ["train.channels_last=off"]).train.channels_last == "off"


@pytest.mark.parametrize("override,message", [
    ("evaluation.serve=soft:2@7", "routing"),
    ("baselines.ensemble=many", "ensemble"),
    ("resources.specialist_cpus=-1", "specialist_cpus"),
    ("delta.method=lora", "delta.method"),
    ("data.loader=ray_data", "ray_data needs resources.runner=ray"),
])
def test_settings_that_cannot_work_are_refused_at_load(override, message):
    from supersub.pipeline_config import PipelineConfig

    extra = ["resources.runner=local"] if "ray_data" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, None, [override, *extra])


def test_paths_are_made_absolute_once_at_the_entry_point(tmp_path, monkeypatch):
    import os

    from supersub.pipeline_config import PipelineConfig, absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(PipelineConfig, None, [
        "data.source=../data/tiny", "data.hierarchy=h.json", "data.imagenet_meta=meta", "data.cache_dir=cache",
        "resources.storage_path=s3://bucket/ray"]))
    assert cfg.data.source == os.path.abspath(tmp_path / ".." / "data" / "tiny")
    assert cfg.data.hierarchy == str(tmp_path / "h.json") and cfg.data.imagenet_meta == str(tmp_path / "meta")
    assert cfg.resources.storage_path == "s3://bucket/ray"  # URIs untouched
    synthetic = absolute_paths(load_config(PipelineConfig, None, []))
    assert synthetic.data.source.startswith("synthetic:") and synthetic.data.hierarchy == "synthetic"


@pytest.mark.parametrize("hierarchy, build, k", [
    ("learned:4", "auto:10", 4), ("auto:10", "auto:10", None), ("synthetic", "synthetic", None), ("h.json", "h.json", None),
])
def test_the_hierarchy_spec_is_parsed_into_what_builds_the_manifest_and_K(hierarchy, build, k):
    from supersub.pipeline_config import PipelineConfig

    spec = load_config(PipelineConfig, None, [f"data.hierarchy={hierarchy}", "data.learned_from=auto:10"]).data.hierarchy_spec
    assert (spec.build, spec.learned_k, spec.learned) == (build, k, k is not None)


@pytest.mark.parametrize("spec", ["learned:x", "learned:0", "learned:-3"])
def test_a_K_that_is_not_a_positive_integer_is_refused_at_load_in_the_words_hierarchies_use(spec):
    from supersub.hierarchy import HierarchyError, load_hierarchy
    from supersub.pipeline_config import PipelineConfig

    with pytest.raises(ConfigError, match="K in learned:K must be a positive integer"):
        load_config(PipelineConfig, None, [f"data.hierarchy={spec}"])
    with pytest.raises(HierarchyError, match="K in auto:K must be a positive integer"):
        load_hierarchy(spec.replace("learned", "auto"))


@pytest.mark.parametrize("kind, trunk, own, resident, mode", [
    ("own", "frozen", True, "generalist", None),
    ("vanilla", "frozen", False, "vanilla", None),
    ("trunk_router", "frozen", False, "vanilla", "frozen"),
    ("trunk_router", "joint", False, "vanilla", "joint"),
])
def test_the_generalist_section_says_what_stage_one_is(kind, trunk, own, resident, mode):
    from supersub.pipeline_config import GeneralistConfig

    g = GeneralistConfig(kind=kind, router_trunk=trunk)
    assert (g.has_own_network, g.resident, g.router_trunk_mode) == (own, resident, mode)


def test_the_configs_strings_are_tested_only_where_the_config_parses_them():
    """``learned:K`` and ``generalist.kind=own`` are read through the config's typed values
    (``data.hierarchy_spec``, ``generalist.has_own_network`` / ``resident``), not re-parsed where used."""
    import re

    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""startswith\(["']learned:|kind\s*[!=]=\s*["']own["']""")
    found = [f"{p.relative_to(repo)}:{i}" for folder in ("supersub", "jobs") for p in sorted((repo / folder).rglob("*.py"))
             if p.name != "pipeline_config.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
