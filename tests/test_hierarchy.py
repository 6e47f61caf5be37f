"""Tests of supersub.hierarchy: the Hierarchy type, WordNet builders, specs, learned:K and the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from supersub.cli.hierarchy import register
from supersub.hierarchy import (
    Hierarchy,
    HierarchyError,
    Subclass,
    Superclass,
    WordNet,
    auto_partition,
    build_from_wordnet,
    cifar100,
    derive_paper10,
    from_mapping_file,
    learn_hierarchy,
    load_hierarchy,
    paper10,
)
from supersub.hierarchy.wordnet import parse_is_a, parse_words

PAPER10_COUNTS = {
    "dog": 116,
    "bird": 52,
    "insect": 27,
    "furniture": 21,
    "fish": 16,
    "monkey": 13,
    "car": 10,
    "feline": 8,
    "truck": 7,
    "fruit": 7,
}


def make(spec: dict[str, list[str]], name: str = "h", parents: dict[str, str] | None = None) -> Hierarchy:
    sups = tuple(
        Superclass(s, s.upper(), tuple(Subclass(c, c.upper()) for c in subs)) for s, subs in spec.items()
    )
    return Hierarchy(name, sups, parents or {})


# ---------------------------------------------------------------- synthetic WordNet
#   root ─ animal ─ dog ─ (hound ─ d1 d2) d3
#        │        ├ cat ─ c1 c2
#        │        └ bird ─ b1 b2        (b2 is also under "tool" on an EARLIER line)
#        └ thing ─ tool ─ t1 t2
#                └ box ─ x1
IS_A = """\
root animal
root thing
animal dog
dog hound
hound d1
hound d2
dog d3
animal cat
cat c1
cat c2
tool b2
animal bird
bird b1
bird b2
thing tool
tool t1
tool t2
thing box
box x1
"""
NAMES = {
    "root": "entity",
    "animal": "animal, beast",
    "dog": "dog, domestic dog",
    "hound": "hound",
    "cat": "cat",
    "bird": "bird",
    "thing": "thing",
    "tool": "tool",
    "box": "box, case",
    **{c: f"{c} name, alias" for c in "d1 d2 d3 c1 c2 b1 b2 t1 t2 x1".split()},
}
LEAVES = "d1 d2 d3 c1 c2 b1 b2 t1 t2 x1".split()


@pytest.fixture
def meta_dir(tmp_path: Path) -> Path:
    (tmp_path / "wordnet.is_a.txt").write_text(IS_A)
    (tmp_path / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in NAMES.items()))
    return tmp_path


@pytest.fixture
def wordnet(meta_dir: Path) -> WordNet:
    return WordNet.load(meta_dir)


# ---------------------------------------------------------------- Hierarchy type
def test_index_maps() -> None:
    h = make({"a": ["a1", "a2"], "b": ["b1"], "c": ["c1", "c2", "c3"]})
    assert h.num_superclasses == 3 and h.num_subclasses == 6
    assert h.subclass_ids == ["a1", "a2", "b1", "c1", "c2", "c3"]
    assert h.fine_to_coarse == [0, 0, 1, 2, 2, 2]
    assert h.coarse_to_fine == [[0, 1], [2], [3, 4, 5]]
    assert [h.fine_index(s) for s in ("b1", "c3")] == [2, 5]
    assert [h.local_index(s) for s in ("a2", "b1", "c3")] == [1, 0, 2]
    assert h.superclass_index("c") == 2
    with pytest.raises(HierarchyError, match="not in hierarchy"):
        h.fine_index("zz")


def test_json_round_trip_keeps_order_names_and_parents(tmp_path: Path) -> None:
    h = make({"b": ["b2", "b1"], "a": ["a1"]}, name="x", parents={"b2": "mid", "mid": "b"})
    h.save(tmp_path / "h.json")
    back = Hierarchy.load(tmp_path / "h.json")
    assert back == h and back.parents == h.parents
    assert back.to_json() == h.to_json()
    assert [s.name for s in back.subclasses] == ["B2", "B1", "A1"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"a": ["x"], "b": ["x"]}, "in both a and b"),
        ({"a": ["x", "x"]}, "twice in"),
        ({"a": ["x"], "b": []}, "is empty"),
        ({}, "no superclasses"),
    ],
)
def test_validation_errors(spec: dict[str, list[str]], match: str) -> None:
    with pytest.raises(HierarchyError, match=match):
        make(spec)


def test_check_known_and_format_version() -> None:
    h = make({"a": ["a1"], "b": ["b1"]})
    h.check_known(["a1", "b1"])
    with pytest.raises(HierarchyError, match="2 class id.*q1, zz"):
        h.check_known(["a1", "zz", "q1"])
    data = h.to_dict()
    data["format_version"] = 99
    with pytest.raises(HierarchyError, match="format version 99"):
        Hierarchy.from_dict(data)
    with pytest.raises(HierarchyError, match="not valid JSON"):
        Hierarchy.from_json("{")


def test_lca_severity_without_and_with_parents() -> None:
    flat = make({"a": ["a1", "a2"], "b": ["b1"]})
    assert [flat.lca_height("a1", p) for p in ("a1", "a2", "b1")] == [0, 1, 2]
    # a1, a2 share "m" just above them; a3 meets them only at the superclass node.
    deep = make({"a": ["a1", "a2", "a3"], "b": ["b1"]}, parents={"a1": "m", "a2": "m", "m": "a", "a3": "a"})
    assert deep.ancestors("a1") == ["a1", "m", "a", "<root>"]
    assert deep.lca_height("a1", "a2") == 1
    assert deep.lca_height("a1", "a3") == 2
    assert deep.lca_height("a1", "b1") == 3
    assert deep.lca_height("a3", "a1") == 1


# ---------------------------------------------------------------- WordNet
def test_single_parent_rule_keeps_the_last_is_a_line(tmp_path: Path, meta_dir: Path) -> None:
    assert WordNet.load(meta_dir).parents["b2"] == "bird"
    # The same lines with the two parents of b2 swapped: now "tool" is last.
    swapped = IS_A.replace("tool b2\n", "@@\n").replace("bird b2\n", "tool b2\n").replace("@@\n", "bird b2\n")
    (meta_dir / "wordnet.is_a.txt").write_text(swapped)
    assert WordNet.load(meta_dir).parents["b2"] == "tool"


def test_wordnet_parsing_and_queries(wordnet: WordNet) -> None:
    assert wordnet.name("dog") == "dog" and wordnet.name("box") == "box" and wordnet.name("??") == "??"
    assert wordnet.ancestors("d1") == ["hound", "dog", "animal", "root"]
    assert wordnet.depth("d1") == 4 and wordnet.depth("root") == 0
    assert wordnet.descendants_among("dog", LEAVES) == ["d1", "d2", "d3"]
    assert wordnet.descendants_among("animal", ["x1", "c1", "b2"]) == ["b2", "c1"]
    assert wordnet.covers(["d1", "d3"])["dog"] == ["d1", "d3"]
    with pytest.raises(HierarchyError, match="expected 'parent child'"):
        parse_is_a(["a b c"])
    with pytest.raises(HierarchyError, match=":2: expected 'wnid<TAB>synonyms'"):
        parse_words(["n1\tdog", "n2 dog"])
    with pytest.raises(HierarchyError, match="cycle"):
        WordNet({"a": "b", "b": "a"}).ancestors("a")


def test_build_from_wordnet(wordnet: WordNet) -> None:
    h = build_from_wordnet(wordnet, ["dog", "bird"], LEAVES[::-1], "two", {"dog": "doggo"})
    assert [(s.id, s.name) for s in h.superclasses] == [("dog", "doggo"), ("bird", "bird")]
    assert h.subclass_ids == ["d1", "d2", "d3", "b1", "b2"]  # sorted wnids inside each superclass
    assert h.subclasses[0].name == "d1 name"
    assert h.parents == {
        "d1": "hound",
        "d2": "hound",
        "hound": "dog",
        "d3": "dog",
        "b1": "bird",
        "b2": "bird",
    }
    assert h.lca_height("d1", "d2") == 1 and h.lca_height("d1", "d3") == 2 and h.lca_height("d1", "b1") == 3
    with pytest.raises(HierarchyError, match=r"d1 \(d1 name\) lies under both hound \(hound\) and dog"):
        build_from_wordnet(wordnet, ["dog", "hound"], LEAVES, "bad")
    with pytest.raises(HierarchyError, match="box.*covers none"):
        build_from_wordnet(wordnet, ["dog", "box"], ["d1", "c1"], "bad")


# ---------------------------------------------------------------- auto:K
def test_auto_partition_synthetic(wordnet: WordNet) -> None:
    h = auto_partition(wordnet, LEAVES, 3, min_size=2, max_size=3)
    # Largest first, ties by wnid: dog, thing (3 leaves each), then of bird, cat, hound, tool
    # (2 each; hound and tool lie inside dog and thing) bird.
    assert h.name == "auto:3"
    assert [(s.id, len(s.subclasses)) for s in h.superclasses] == [("dog", 3), ("thing", 3), ("bird", 2)]
    ids = h.subclass_ids
    assert len(ids) == len(set(ids))
    assert all(2 <= len(s.subclasses) <= 3 for s in h.superclasses)
    assert (
        auto_partition(wordnet, sorted(LEAVES, reverse=True), 3, min_size=2, max_size=3).to_json()
        == h.to_json()
    )
    other = auto_partition(wordnet, LEAVES, 3, min_size=2, max_size=3, leftover="other")
    assert other.superclasses[:3] == h.superclasses
    assert other.superclasses[-1].id == "other"
    assert [s.id for s in other.superclasses[-1].subclasses] == ["c1", "c2"]
    assert other.lca_height("c1", "c2") == 1 and other.lca_height("c1", "d1") == 2
    assert other.lca_height("t1", "x1") == 2 and other.lca_height("t1", "t2") == 1  # via "tool"


def test_auto_partition_prefers_the_deepest_of_equal_covers_and_fails_cleanly(wordnet: WordNet) -> None:
    # Over d1, d2 only, hound and dog (and animal, root) cover the same two leaves: hound is named.
    h = auto_partition(wordnet, ["d1", "d2", "c1", "c2"], 2, max_size=2)
    assert h.superclass_ids == ["cat", "hound"]
    with pytest.raises(HierarchyError, match="only 4 disjoint WordNet nodes"):
        auto_partition(wordnet, LEAVES, 5, min_size=2, max_size=3)
    with pytest.raises(HierarchyError, match="not in WordNet: nope"):
        auto_partition(wordnet, ["d1", "nope"], 1)


def test_load_hierarchy_auto_finds_wordnet_via_arg_or_env(
    meta_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUPERSUB_IMAGENET_META", raising=False)
    with pytest.raises(HierarchyError, match="--imagenet-meta"):
        load_hierarchy("auto:3", classes=LEAVES)
    h = load_hierarchy("auto:3", classes=LEAVES, imagenet_meta=meta_dir)
    monkeypatch.setenv("SUPERSUB_IMAGENET_META", str(meta_dir))
    assert load_hierarchy("auto:3", classes=LEAVES) == h
    assert load_hierarchy("auto:3", classes=LEAVES, leftover="other").superclass_ids[-1] == "other"
    with pytest.raises(HierarchyError, match="needs the list of classes"):
        load_hierarchy("auto:2")
    with pytest.raises(HierarchyError, match="positive integer"):
        load_hierarchy("auto:x", classes=LEAVES)


# ---------------------------------------------------------------- shipped hierarchies
def test_paper10_counts_from_shipped_file() -> None:
    h = paper10()
    assert {s.name: len(s.subclasses) for s in h.superclasses} == PAPER10_COUNTS
    assert [s.name for s in h.superclasses] == list(PAPER10_COUNTS)  # the paper's order
    assert h.num_subclasses == 277
    assert h.superclasses[0].id == "n02084071" and h.subclasses[0] == Subclass("n02085620", "Chihuahua")
    for sup in h.superclasses:
        ids = [s.id for s in sup.subclasses]
        assert ids == sorted(ids)
    assert h.ancestors("n02085620")[-2:] == ["n02084071", "<root>"]


@pytest.mark.realdata
def test_paper10_shipped_equals_derived_from_wordnet(shared_data: Path) -> None:
    derived = derive_paper10(shared_data / "imagenet-meta")
    assert derived.to_dict() == paper10().to_dict()


def test_paper10_restricted_to_given_classes() -> None:
    h = load_hierarchy("paper10", classes=["n02085620", "n01530575", "n99999999"])
    assert [(s.name, len(s.subclasses)) for s in h.superclasses] == [("dog", 1), ("bird", 1)]
    with pytest.raises(HierarchyError, match="none of the 1 given classes"):
        load_hierarchy("paper10", classes=["n99999999"])


def test_cifar100_is_20_by_5_in_official_order() -> None:
    h = load_hierarchy("cifar100")
    assert h == cifar100()
    assert h.num_superclasses == 20 and all(len(s.subclasses) == 5 for s in h.superclasses)
    assert h.superclass_ids[:3] == ["aquatic_mammals", "fish", "flowers"]
    assert h.superclass_ids[-2:] == ["vehicles_1", "vehicles_2"]
    assert [s.id for s in h.superclasses[0].subclasses] == ["beaver", "dolphin", "otter", "seal", "whale"]
    assert [s.id for s in h.superclasses[-1].subclasses] == [
        "lawn_mower",
        "rocket",
        "streetcar",
        "tank",
        "tractor",
    ]
    assert len(set(h.subclass_ids)) == 100 and "aquarium_fish" in h.subclass_ids
    assert h.superclasses[9].name == "large man-made outdoor things"


@pytest.mark.realdata
def test_auto10_on_tiny_imagenet(shared_data: Path) -> None:
    wnids = (shared_data / "tiny-imagenet-200" / "wnids.txt").read_text().split()
    h = load_hierarchy("auto:10", classes=wnids, imagenet_meta=shared_data / "imagenet-meta")
    assert [(s.name, len(s.subclasses)) for s in h.superclasses] == [
        ("vertebrate", 27),
        ("device", 25),
        ("invertebrate", 23),
        ("container", 22),
        ("structure", 18),
        ("consumer goods", 17),
        ("matter", 16),
        ("domestic animal", 9),
        ("equipment", 8),
        ("implement", 8),
    ]
    assert set(h.subclass_ids) <= set(wnids) and h.num_subclasses == 173


# ---------------------------------------------------------------- custom files
def test_mapping_files(tmp_path: Path) -> None:
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"x2": "B", "x1": "A", "x3": "B"}))
    h = load_hierarchy(str(flat))
    assert h.name == "flat" and h.superclass_ids == ["B", "A"] and h.subclass_ids == ["x2", "x3", "x1"]

    full = tmp_path / "full.json"
    make({"a": ["a1"], "b": ["b1"]}, name="mine").save(full)
    assert from_mapping_file(full).name == "mine"

    table = tmp_path / "m.csv"
    table.write_text(
        "subclass,superclass,subclass_name,superclass_name\ns1,S,one,Big S\n\ns2,T,two,\ns3,S,three,Big S\n"
    )
    h = from_mapping_file(table)
    assert [(s.id, s.name, [c.name for c in s.subclasses]) for s in h.superclasses] == [
        ("S", "Big S", ["one", "three"]),
        ("T", "T", ["two"]),
    ]
    assert load_hierarchy(str(table), classes=["s3"]).subclass_ids == ["s3"]


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("a.csv", "sub,super\nx,A\n", r"a.csv:1: header must be"),
        ("a.csv", "subclass,superclass,colour\nx,A,red\n", "header must be"),
        ("a.csv", "subclass,superclass\nx,A\ny\n", r"a.csv:3: expected 2 fields, got 1"),
        ("a.csv", "subclass,superclass\nx,A\n\nx,B\n", r"a.csv:4: subclass x is listed twice"),
        ("a.csv", "subclass,superclass\nx, \n", r"a.csv:2: empty subclass or superclass"),
        (
            "a.csv",
            "subclass,superclass,subclass_name,superclass_name\nx,A,,P\ny,A,,Q\n",
            r":3: superclass A is named",
        ),
        ("a.csv", "subclass,superclass\n", "no rows"),
        ("a.json", "[1, 2]", "expected a hierarchy JSON"),
        ("a.json", '{"x": 3}', "subclass 'x' must map to a non-empty superclass id"),
        ("a.json", "{oops", "not valid JSON"),
        ("a.json", '{"superclasses": [{"id": "A"}]}', "malformed"),
    ],
)
def test_malformed_mapping_files(tmp_path: Path, name: str, text: str, match: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(HierarchyError, match=match):
        load_hierarchy(str(tmp_path / name))


def test_unknown_specs(tmp_path: Path) -> None:
    with pytest.raises(HierarchyError, match="unknown hierarchy 'paper11'.*paper10, cifar100, auto:K"):
        load_hierarchy("paper11")
    with pytest.raises(HierarchyError, match="hierarchy file not found"):
        load_hierarchy(str(tmp_path / "nope.csv"))
    with pytest.raises(HierarchyError, match="built by the pipeline"):
        load_hierarchy("learned:5")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(HierarchyError, match=r"must end in \.json or \.csv"):
        from_mapping_file(tmp_path / "m.txt")


# ---------------------------------------------------------------- learned:K
def planted(sizes: list[int], noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A mean-softmax-like matrix: mass on the diagonal, some within the block, noise elsewhere."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(labels))  # blocks are not contiguous in class order
    labels = labels[perm]
    same = labels[:, None] == labels[None, :]
    sim = (
        np.where(same, 0.3, 0.0) + rng.uniform(0, noise, (len(labels), len(labels))) + 2 * np.eye(len(labels))
    )
    return sim / sim.sum(axis=1, keepdims=True), labels


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels)}


def test_learned_hierarchy_recovers_planted_blocks() -> None:
    sim, truth = planted([12, 9, 7, 5, 3], noise=0.1, seed=1)
    ids = [f"c{i}" for i in range(len(truth))]
    h = learn_hierarchy(sim, ids, [f"name {i}" for i in range(len(truth))], 5)
    found = np.array([h.fine_to_coarse[h.fine_index(i)] for i in ids])
    assert partition(found) == partition(truth)
    assert h.name == "learned:5" and h.superclass_ids == [f"learned_{j}" for j in range(5)]
    assert [len(s.subclasses) for s in h.superclasses] == [12, 9, 7, 5, 3]
    first = h.superclasses[0].subclasses
    assert [s.id for s in first] == sorted((s.id for s in first), key=lambda x: int(x[1:]))
    assert h.superclasses[-1].name.count(" / ") == 1 and h.superclasses[-1].name.endswith("+1")
    assert learn_hierarchy(sim, ids, ids, 5).to_json() == learn_hierarchy(sim, ids, ids, 5).to_json()


def test_learned_hierarchy_min_size_and_errors() -> None:
    sim, truth = planted([10, 10, 1], noise=0.05, seed=2)
    ids = [str(i) for i in range(len(truth))]
    sizes = [len(s.subclasses) for s in learn_hierarchy(sim, ids, ids, 3, min_size=4).superclasses]
    assert min(sizes) >= 4 and sum(sizes) == 21
    with pytest.raises(HierarchyError, match="cannot split 21 classes into 3 clusters of at least 8"):
        learn_hierarchy(sim, ids, ids, 3, min_size=8)
    with pytest.raises(HierarchyError, match="must be"):
        learn_hierarchy(sim[:-1], ids, ids, 3)


# ---------------------------------------------------------------- CLI
def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="supersub")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_show_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_cli(["hierarchy", "show", "paper10"], capsys)
    lines = out.splitlines()
    assert lines[0] == "hierarchy paper10"
    assert lines[2].split()[:4] == ["0", "dog", "n02084071", "116"]
    assert "Chihuahua" in lines[2] and "(+" in lines[2]
    assert lines[-1] == "total: 10 superclasses, 277 subclasses"
    assert run_cli(["hierarchy", "show", "cifar100", "--json"], capsys) == cifar100().to_json() + "\n"


def test_cli_save_with_classes_and_leftover(
    tmp_path: Path, meta_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "classes.txt").write_text("# my classes\n" + "\n".join(LEAVES) + "\n")
    common = ["--classes", str(tmp_path / "classes.txt"), "--imagenet-meta", str(meta_dir)]
    out = run_cli(["hierarchy", "show", "auto:3", *common], capsys)
    assert "given classes: 10, in no superclass: 2" in out
    out = run_cli(
        ["hierarchy", "save", "auto:3", *common, "--leftover", "other", "--out", str(tmp_path / "o/h.json")],
        capsys,
    )
    assert out.startswith("wrote ")
    saved = Hierarchy.load(tmp_path / "o" / "h.json")
    assert saved == load_hierarchy("auto:3", classes=LEAVES, imagenet_meta=meta_dir, leftover="other")
    assert saved.superclass_ids[-1] == "other"
    with pytest.raises(HierarchyError, match="unknown hierarchy"):
        run_cli(["hierarchy", "show", "nope"], capsys)


def test_hierarchy_package_imports_no_heavy_frameworks() -> None:
    code = (
        "import sys, supersub.hierarchy, supersub.cli.hierarchy; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
