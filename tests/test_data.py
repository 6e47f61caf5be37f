"""Tests of the data layer: sources, bad-data accounting, manifests, splits, datasets, CLI."""

from __future__ import annotations

import argparse
import io
import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from supersub.cli.data import register
from supersub.data import (
    IMAGENET_MEAN,
    ManifestDataset,
    SyntheticSpec,
    assign_splits,
    build_manifest,
    build_transforms,
    decode_image,
    decode_split,
    load_manifest,
    open_image_store,
    open_source,
    render,
    synthetic_hierarchy,
)
from supersub.data.parallel import Progress
from supersub.data.store import ParquetStore
from supersub.errors import DataError
from supersub.hierarchy.core import Hierarchy, Subclass, Superclass

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def encode(arr: np.ndarray | Image.Image, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise_image(seed: int, size: int = 16) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def bad_images() -> dict[str, bytes]:
    """One encoded file per bad-data kind, keyed by the event it should report."""
    big = encode(noise_image(99, 64))
    return {
        "skipped_truncated": big[: len(big) // 2],
        "skipped_unreadable": np.random.default_rng(5).bytes(500),
        "skipped_empty": b"",
        "converted_grayscale": encode(noise_image(1), mode="L"),
        "converted_cmyk": encode(noise_image(2), mode="CMYK"),
        "format_mismatch": encode(noise_image(3), "PNG"),  # PNG bytes under a .JPEG name
    }


def two_level(classes: dict[str, list[str]], name: str = "test") -> Hierarchy:
    return Hierarchy(
        name,
        tuple(Superclass(s, s, tuple(Subclass(c, c) for c in subs)) for s, subs in classes.items()),
    )


HIER = two_level({"animal": ["n01", "n02"], "thing": ["n03"]})


def make_folder(root: Path, per_class: int = 10, val_per_class: int = 3, bad: bool = False) -> Path:
    """``root/train/<wnid>/*.JPEG`` (plus a nested .png, an upper-case .JPG and a .txt) and ``root/val``."""
    for ci, wnid in enumerate(["n01", "n02", "n03"]):
        for split, n in (("train", per_class), ("val", val_per_class)):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{wnid}_{i}.JPEG").write_bytes(encode(noise_image(100 * ci + i)))
        (root / "train" / wnid / "boxes.txt").write_text("not an image")
        (root / "train" / wnid / "images").mkdir()
        (root / "train" / wnid / "images" / "extra.png").write_bytes(encode(noise_image(7 + ci), "PNG"))
        (root / "train" / wnid / "UPPER.JPG").write_bytes(encode(noise_image(17 + ci)))
    if bad:
        for kind, data in bad_images().items():
            (root / "train" / "n01" / f"bad_{kind}.JPEG").write_bytes(data)
    return root


def write_shard(path: Path, rows: list[tuple[bytes | None, str, str | None]], labels: list[str], row_group: int = 4) -> None:
    """A Parquet shard in the DESIGN schema; ``rows`` = (bytes, image path, wnid)."""
    ordered = sorted(labels)
    table = pa.table(
        {
            "image": pa.array(
                [None if b is p is None else {"bytes": b, "path": p} for b, p, _ in rows],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "label": pa.array([ordered.index(w) if w else -1 for _, _, w in rows], pa.int64()),
            "wnid": pa.array([w for _, _, w in rows], pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)


def make_shards(root: Path, bad: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    wnids = ["n01", "n02", "n03"]
    for shard in range(2):
        rows = [
            (encode(noise_image(1000 * shard + 10 * wi + i)), f"train/{w}/{w}_{shard}_{i}.JPEG", w)
            for wi, w in enumerate(wnids)
            for i in range(6)
        ]
        if bad and shard == 1:
            rows += [(data, f"train/n02/bad_{kind}.JPEG", "n02") for kind, data in bad_images().items()]
            rows.append((None, "train/n02/null.JPEG", "n02"))  # null bytes
            rows.append((None, None, "n02"))  # a null image struct
        write_shard(root / f"train-0000{shard}-of-00002.parquet", rows, wnids)
    val_rows = [(encode(noise_image(5000 + i)), f"val/{w}_{i}.JPEG", w) for i, w in enumerate(wnids * 2)]
    write_shard(root / "val-00000-of-00001.parquet", val_rows, wnids)
    return root


def build(source, hierarchy, out: Path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    return build_manifest(source, hierarchy, out, **kw)


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_per_image() -> None:
    spec = SyntheticSpec(superclasses=2, subclasses=3, per_class=4, size=24, seed=3)
    a = render(spec, np.arange(spec.num_images))
    assert a.shape == (24, 24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(render(spec, [17, 2]), a[[17, 2]])  # independent of the batch
    other = render(SyntheticSpec(superclasses=2, subclasses=3, per_class=4, size=24, seed=4), [2])
    assert np.abs(other.astype(int) - a[2].astype(int)).mean() > 5
    assert len({a[i].tobytes() for i in range(len(a))}) == len(a)


@pytest.mark.parametrize("size", [16, 45, 224])
def test_synthetic_any_size(size: int) -> None:
    img = render(SyntheticSpec(superclasses=1, subclasses=1, per_class=2, size=size), [0, 1])
    assert img.shape == (2, size, size, 3)
    assert img.std() > 10  # a pattern, not a flat field


def test_synthetic_subclasses_of_a_superclass_look_alike() -> None:
    spec = SyntheticSpec(superclasses=4, subclasses=3, per_class=40, size=32, seed=1)
    imgs = render(spec, np.arange(spec.num_images)).astype(np.float32)
    cls = spec.class_of(np.arange(spec.num_images))
    # Class signature: mean colour histogram (position-free, as the patterns move around).
    bins = (imgs // 64).astype(int)  # 4 levels per channel
    codes = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    hist = np.stack([np.bincount(c.ravel(), minlength=64) for c in codes]).astype(np.float32)
    sig = np.stack([hist[cls == c].mean(0) for c in range(spec.num_classes)])
    sig /= sig.sum(1, keepdims=True)
    dist = np.abs(sig[:, None] - sig[None]).sum(-1)
    sup = np.arange(spec.num_classes) // spec.subclasses
    same = (sup[:, None] == sup[None]) & ~np.eye(spec.num_classes, dtype=bool)
    across = sup[:, None] != sup[None]
    assert dist[same].mean() * 2 < dist[across].mean()
    assert dist[same].max() < dist[across].min()


def test_synthetic_hierarchy_and_spec_errors() -> None:
    h = synthetic_hierarchy(2, 3)
    assert h.subclass_ids == ["s0c0", "s0c1", "s0c2", "s1c0", "s1c1", "s1c2"]
    assert h.subclasses[4].name == "super1/class1" and h.superclass_ids == ["super0", "super1"]
    for bad in ("synthetic:size=8", "synthetic:colour=3", "synthetic:superclasses=x", "synthetic:nokeyvalue"):
        with pytest.raises(DataError):
            open_source(bad)


def test_synthetic_test_split_and_build(tmp_path: Path) -> None:
    info = build("synthetic:superclasses=2,subclasses=2,per_class=20,test_per_class=5,size=16", "synthetic", tmp_path / "m")
    assert info.images == {"train": 72, "val": 8, "test": 20}  # own test split → no test held out
    m = load_manifest(tmp_path / "m")
    assert m.meta["source"]["kind"] == "synthetic" and m.meta["source"]["params"]["test_per_class"] == 5
    img = m.store().read(m.uris[-1])
    assert img.size == (16, 16) and img.mode == "RGB"
    with pytest.raises(DataError, match="own hierarchy"):
        build(str(make_folder(tmp_path / "f", 2, 0)), "synthetic", tmp_path / "x")


# ---------------------------------------------------------------- decoding
def test_decode_events_and_no_global_truncation_flag() -> None:
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    for kind, data in bad_images().items():
        d = decode_image(data, "x.JPEG", draft_size=8)
        assert kind in d.events, kind
        assert d.ok == (not kind.startswith("skipped")), kind
        if d.ok:
            assert d.image.mode == "RGB"
    rgba = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    d = decode_image(rgba, "x.png")
    assert d.events == ("converted_other_mode",) and d.image.getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(encode(noise_image(0)), "a.jpeg").events == ()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before


def test_draft_decodes_large_jpeg_small() -> None:
    d = decode_image(encode(noise_image(0, 256)), "x.jpg", draft_size=40)
    assert d.events == () and d.image.size == (64, 64)  # 1/4 scale is the smallest >= 40


# ---------------------------------------------------------------- sources
def test_folder_source_listing_and_detection(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=4, val_per_class=2)
    src = open_source(str(root))
    lst = src.list_images()
    assert src.kind == "folder" and src.has_eval_split
    assert len(lst) == 3 * (4 + 2 + 2)  # + nested .png and .JPG per class, no .txt
    assert Counter(lst.splits) == {"train": 18, "test": 6}
    assert "train/n01/images/extra.png" in lst.uris and all(not u.endswith(".txt") for u in lst.uris)
    store = open_image_store(src.store_meta())
    assert store.read("train/n02/UPPER.JPG").mode == "RGB"
    with pytest.raises(DataError):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "flat" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="class folders"):
        open_source(str(tmp_path / "flat")).list_images()


def test_parquet_source_folder_glob_and_store(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "pq")
    for spec in (str(root), str(root / "*.parquet"), f"parquet:{root}"):
        lst = open_source(spec).list_images()
        assert Counter(lst.splits) == {"train": 36, "test": 6}  # val- shard → test
    src = open_source(str(root / "train-*.parquet"))
    lst = src.list_images()
    assert len(lst) == 36 and lst.keys[0] == "train/n01/n01_0_0.JPEG"
    store = open_image_store(src.store_meta())
    # Row 9 of shard 1 is the 4th image of n02 (6 per class), in row group 2 (4 rows a group).
    uri = f"{(root / 'train-00001-of-00002.parquet').resolve()}#9"
    assert uri in lst.uris
    np.testing.assert_array_equal(np.asarray(store.read(uri)), np.asarray(Image.open(io.BytesIO(encode(noise_image(1013))))))
    clone = pickle.loads(pickle.dumps(store))  # as a DataLoader worker gets it: no cache, works
    assert clone.read(uri).size == (16, 16)
    with pytest.raises(DataError, match="no Parquet files"):
        open_source(str(root / "nothing-*.parquet"))
    (tmp_path / "pq" / "misc.parquet").write_bytes((root / "val-00000-of-00001.parquet").read_bytes())
    with pytest.raises(DataError, match="split"):
        open_source(str(root)).list_images()


def test_parquet_unlabelled_rows_and_label_only_shards(tmp_path: Path) -> None:
    root = tmp_path / "pq"
    root.mkdir()
    rows = [(encode(noise_image(i)), f"x{i}.JPEG", w) for i, w in enumerate(["a", "b", None, "a"])]
    write_shard(root / "test-00000.parquet", rows, ["a", "b"])
    lst = open_source(str(root)).list_images()
    assert lst.labels == ["a", "b", "a"] and lst.unlabelled == 1 and set(lst.splits) == {"test"}
    # No wnid column: class ids from wnids.txt beside the shards (label indexes sorted ids).
    table = pq.read_table(root / "test-00000.parquet").drop(["wnid"])
    pq.write_table(table, root / "test-00000.parquet")
    (root / "wnids.txt").write_text("a\nb\n")
    assert open_source(str(root)).list_images().labels == ["a", "b", "a"]


def test_parquet_store_cache_is_bounded(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "pq")
    store = ParquetStore(cache_mb=0.001)
    path = (root / "train-00000-of-00002.parquet").resolve()
    for row in range(18):
        store.read(f"{path}#{row}")
    assert len(store._cache) == 1
    with pytest.raises(DataError, match="past the end"):
        store.read(f"{path}#18")


def test_cifar100_from_a_fake_on_disk_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar

    from supersub.hierarchy import cifar100

    names = sorted(cifar100().subclass_ids)
    base = tmp_path / "cifar" / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per in (("train", 2), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(base / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": []}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # fake files, fake md5
    info = build(f"cifar100:{tmp_path / 'cifar'}", "cifar100", tmp_path / "m", val_fraction=0.5)
    assert info.images == {"train": 100, "val": 100, "test": 100}
    m = load_manifest(tmp_path / "m")
    row = m.uris.index(f"cifar100:{(tmp_path / 'cifar').resolve()}#test:7")
    assert m.table.column("wnid")[row].as_py() == names[7]
    np.testing.assert_array_equal(np.asarray(m.store().read(m.uris[row])), data[7].reshape(3, 32, 32).transpose(1, 2, 0))
    with pytest.raises(DataError, match="CIFAR-100 not found"):
        open_source(f"cifar100:{tmp_path / 'nowhere'}")


# ---------------------------------------------------------------- splits
def test_split_is_stratified_deterministic_and_order_free() -> None:
    n_per = [40, 11, 3, 1]
    fine = np.repeat(np.arange(4), n_per)
    keys = [f"img{i}" for i in range(len(fine))]
    src = ["train"] * len(fine)
    a = assign_splits(keys, fine, src, val_fraction=0.1, test_fraction=0.2, seed=0)
    for c, n in enumerate(n_per):
        got = Counter(a[fine == c])
        want_val, want_test = int(np.floor(n * 0.1 + 0.5)), int(np.floor(n * 0.2 + 0.5))
        want_test = min(want_test, n - 1)
        assert got["val"] == min(want_val, n - 1 - want_test) and got["test"] == want_test and got["train"] >= 1
    perm = np.random.default_rng(1).permutation(len(fine))
    b = assign_splits([keys[i] for i in perm], fine[perm], src, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert dict(zip(keys, a)) == dict(zip([keys[i] for i in perm], b))
    c = assign_splits(keys, fine, src, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert (c != a).any() and Counter(c) == Counter(a)
    own = assign_splits(keys, fine, ["test"] * 5 + src[5:], val_fraction=0.1, test_fraction=0.0, seed=0)
    assert (own[:5] == "test").all() and "test" not in set(own[5:])


# ---------------------------------------------------------------- builds
def test_build_folder_with_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder(tmp_path / "imgs", per_class=10, val_per_class=3, bad=True)
    info = build(str(root), HIER, tmp_path / "m", num_workers=2, progress=True)
    expected = {k: 1 for k in bad_images()}
    assert {k: v for k, v in info.counts.items() if v} == expected
    m = load_manifest(tmp_path / "m")
    assert len(m) == 3 * (10 + 3 + 2) + 3  # 3 bad ones skipped, 3 converted ones kept
    assert m.counts()["test"] == 9 and m.meta["counts"] == info.counts
    assert not any("bad_skipped" in u for u in m.uris)
    for u in [u for u in m.uris if "bad_" in u]:
        assert m.store().read(u).mode == "RGB"
    out = capsys.readouterr()
    assert "skipped_truncated" in out.out and "animal" in out.out and "verify:" in out.err


def test_build_parquet_with_bad_data(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "pq", bad=True)
    info = build(str(root / "*.parquet"), HIER, tmp_path / "m", val_fraction=0.2)
    assert info.counts["skipped_empty"] == 3  # b"", null bytes and a null image struct
    assert {k: v for k, v in info.counts.items() if v and k != "skipped_empty"} == {
        k: 1 for k in bad_images() if k != "skipped_empty"
    }
    assert info.num_images == 36 + 3 + 6 and info.images["test"] == 6
    m = load_manifest(tmp_path / "m")
    assert m.meta["source"]["kind"] == "parquet"
    assert set(m.table.column("wnid").to_pylist()) == {"n01", "n02", "n03"}


def test_build_without_verify_lists_everything(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "pq", bad=True)
    info = build(str(root), HIER, tmp_path / "m", verify=False)
    assert info.num_images == 36 + 8 + 6 and not any(info.counts.values())
    bad_uri = next(u for u in load_manifest(tmp_path / "m").uris if u.endswith("00001-of-00002.parquet#18"))
    with pytest.raises(DataError, match="skipped|truncated|unreadable|empty"):
        load_manifest(tmp_path / "m").store().read(bad_uri)


def test_hierarchy_class_without_images_is_an_error(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=2, val_per_class=0)
    with pytest.raises(DataError, match="n99"):
        build(str(root), two_level({"a": ["n01", "n02"], "b": ["n03", "n99"]}), tmp_path / "m")
    for f in (root / "train" / "n03").rglob("*.*"):
        f.write_bytes(b"")  # every image of n03 is bad: no usable image left
    with pytest.raises(DataError, match="n03"):
        build(str(root), HIER, tmp_path / "m")


def test_leftover_drop_and_other(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=4, val_per_class=0)
    small = two_level({"a": ["n01"], "b": ["n02"]})
    dropped = build(str(root), small, tmp_path / "d")
    assert dropped.dropped_classes == ["n03"] and dropped.dropped_images == 6 and dropped.num_images == 12
    other = build(str(root), small, tmp_path / "o", leftover="other")
    assert other.num_images == 18 and other.hierarchy.superclass_ids == ["a", "b", "other"]
    kept = build(str(root), small, tmp_path / "c", classes=["n01"], leftover="other")
    assert kept.hierarchy.subclass_ids == ["n01"] and kept.num_images == 6  # classes= restricts the hierarchy too
    with pytest.raises(DataError, match="not in the source"):
        build(str(root), small, tmp_path / "c", classes=["n01", "n77"])


def test_hierarchy_spec_file_through_load_hierarchy(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=3, val_per_class=0)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"n01": "pets", "n02": "pets"}))  # n03 not in the user's file
    info = build(str(root), str(mapping), tmp_path / "m")
    assert info.hierarchy.subclass_ids == ["n01", "n02"] and info.dropped_classes == ["n03"]
    assert load_manifest(tmp_path / "m").hierarchy.subclass_ids == ["n01", "n02"]


# ---------------------------------------------------------------- manifest folder
def test_manifest_schema_metadata_and_atomic_rebuild(tmp_path: Path) -> None:
    spec = "synthetic:superclasses=2,subclasses=2,per_class=10,size=16"
    build(spec, "synthetic", tmp_path / "m")
    first = (tmp_path / "m" / "manifest.parquet").read_bytes()
    table = pq.read_table(tmp_path / "m" / "manifest.parquet")
    assert [str(t) for t in table.schema.types] == ["string", "string", "int32", "int32", "string"]
    meta = json.loads(table.schema.metadata[b"supersub"])
    assert meta["format_version"] == 1 and meta["hierarchy"] == "synthetic-2x2"
    assert meta["images"] == {"train": 32, "val": 4, "test": 4} and "skipped_truncated" in meta["counts"]
    build(spec, "synthetic", tmp_path / "m")  # same inputs → same bytes; no temp files left
    assert (tmp_path / "m" / "manifest.parquet").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["hierarchy.json", "manifest.parquet"]
    build(spec, "synthetic", tmp_path / "m", seed=5)
    assert (tmp_path / "m" / "manifest.parquet").read_bytes() != first


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(DataError, match="not a manifest folder"):
        load_manifest(tmp_path)
    pq.write_table(pa.table({"uri": ["x"]}), tmp_path / "manifest.parquet")
    with pytest.raises(DataError, match="not written by supersub"):
        load_manifest(tmp_path)
    build("synthetic:superclasses=1,subclasses=2,per_class=5,size=16", "synthetic", tmp_path / "m")
    (tmp_path / "m" / "hierarchy.json").unlink()
    with pytest.raises(DataError, match="hierarchy.json"):
        load_manifest(tmp_path / "m" / "manifest.parquet")


def test_bad_fractions_and_leftover(tmp_path: Path) -> None:
    for kw in ({"val_fraction": 0.6, "test_fraction": 0.4}, {"val_fraction": -0.1}, {"leftover": "keep"}):
        with pytest.raises(DataError):
            build("synthetic:superclasses=1,subclasses=2,per_class=5,size=16", "synthetic", tmp_path / "m", **kw)


# ---------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def syn_manifest(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("syn") / "m"
    build("synthetic:superclasses=3,subclasses=2,per_class=12,size=24,seed=2", "synthetic", out)
    return load_manifest(out)


def test_dataset_targets_and_superclass_restriction(syn_manifest) -> None:
    m = syn_manifest
    fine = ManifestDataset(m, "train", transform=build_transforms(32, train=True))
    x, y = fine[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and fine.num_classes == 6
    assert len(fine) == m.counts()["train"] == 6 * 10 and y == int(m.subclass[m.indices("train")[0]])
    one = ManifestDataset(m, "train", target="local", superclasses=[2])
    assert len(one) == 20 and set(one.coarse) == {2} and sorted(set(one.targets)) == [0, 1]
    np.testing.assert_array_equal(one.targets, one.fine - 4)
    coarse = ManifestDataset(m, "val", target="coarse")
    assert coarse.num_classes == 3 and list(coarse.targets) == list(coarse.fine // 2)
    img, _ = coarse[0]
    assert img.shape == (3, 24, 24) and 0 <= img.min() and img.max() <= 1  # default: ToTensor
    with pytest.raises(DataError):
        ManifestDataset(m, "train", superclasses=[3])
    with pytest.raises(DataError):
        ManifestDataset(m, "holdout")


def test_dataset_in_dataloader_workers(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "pq")
    build(str(root), HIER, tmp_path / "m")
    ds = ManifestDataset(tmp_path / "m", "train", transform=build_transforms(16, train=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=True)
    n = 0
    for x, y in loader:
        assert x.shape[1:] == (3, 16, 16) and y.max() < 3
        n += len(y)
    assert n == len(ds)


@pytest.mark.parametrize("size,train", [(32, True), (32, False), (96, True), (96, False)])
def test_transforms_shapes_and_normalisation(size: int, train: bool) -> None:
    img = Image.new("RGB", (120, 80), tuple(int(255 * m) for m in IMAGENET_MEAN))
    x = build_transforms(size, train)(img)
    assert x.shape == (3, size, size)
    if not train:  # a mean-coloured image normalises to ~0
        assert x.abs().max() < 0.02


def test_decode_split_and_cache(tmp_path: Path, syn_manifest) -> None:
    x, fine, coarse = decode_split(syn_manifest, "val", 16, num_workers=0)
    rows = syn_manifest.indices("val")
    assert x.shape == (len(rows), 3, 16, 16) and x.dtype == torch.uint8
    assert fine.dtype == torch.int64 and torch.equal(coarse, fine // 2)
    root = make_shards(tmp_path / "pq")
    build(str(root), HIER, tmp_path / "m")
    m = load_manifest(tmp_path / "m")
    a, fa, _ = decode_split(m, "train", 12, num_workers=2, cache_dir=tmp_path / "cache")
    first = m.indices("train")[0]
    ref = np.asarray(m.store().read(m.uris[first]).resize((12, 12), Image.BILINEAR))
    np.testing.assert_array_equal(a[0].permute(1, 2, 0).numpy(), ref)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    for shard in root.glob("*.parquet"):
        shard.unlink()  # the second call must come from the cache
    b, fb, _ = decode_split(tmp_path / "m", "train", 12, cache_dir=tmp_path / "cache")
    assert torch.equal(a, b) and torch.equal(fa, fb)


# ---------------------------------------------------------------- CLI, progress, imports
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="supersub")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_build_and_show(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m"
    argv = ["data", "build", "--source", "synthetic:superclasses=2,subclasses=2,per_class=10,size=16"]
    assert _cli([*argv, "--hierarchy", "synthetic", "--out", str(out), "--val-fraction", "0.2", "--seed", "3"]) == 0
    assert load_manifest(out).counts() == {"train": 24, "val": 8, "test": 8}
    assert _cli(["data", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "synthetic-2x2" in shown and "super1" in shown and "train=24" in shown
    assert _cli(["data", "show", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 1
    with pytest.raises(DataError):
        _cli(["data", "build", "--source", str(tmp_path / "missing"), "--hierarchy", "paper10", "--out", str(out)])


def test_progress_tty_and_log() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = io.StringIO()
    bar = Progress(1000, "verify", stream=log)
    for _ in range(100):
        bar.update(10)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and "1000/1000" in lines[-1] and "\r" not in log.getvalue()
    tty = Tty()
    bar = Progress(10, "verify", stream=tty)
    bar.update(10)
    bar.close()
    assert tty.getvalue().startswith("\r") and "eta" in tty.getvalue()


def test_data_layer_imports_neither_ray_nor_mlflow() -> None:
    # torch/torchvision (seconds of import time) load only when a dataset symbol is used.
    code = (
        "import sys, supersub.data, supersub.cli.data; "
        "assert not {'ray', 'mlflow', 'torch', 'torchvision'} & set(sys.modules), sys.modules.keys(); "
        "supersub.data.ManifestDataset; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_tiny_imagenet_auto10_keeps_every_image(shared_data: Path, tmp_path: Path) -> None:
    tiny = shared_data / "tiny-imagenet-200"
    info = build(str(tiny), "auto:10", tmp_path / "m", imagenet_meta=shared_data / "imagenet-meta", leftover="other", verify=False)
    assert info.num_images == 75_000 and info.hierarchy.num_subclasses == 200 and not info.dropped_classes
    m = load_manifest(tmp_path / "m")
    per_class = np.bincount(m.subclass, minlength=200)
    held = int(sum(np.floor(n * 0.1 + 0.5) for n in per_class))
    assert m.counts() == {"train": 75_000 - 2 * held, "val": held, "test": held}
    assert m.store().read(m.uris[123]).size == (64, 64)


@pytest.mark.realdata
def test_tiny_imagenet_shard_with_bad_rows(shared_data: Path, tmp_path: Path) -> None:
    shard = shared_data / "tiny-imagenet-200" / "train-00000-of-00003.parquet"
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    bad = bad_images()
    replaced = {}
    for j, (kind, data) in enumerate(sorted(bad.items())):
        row = 1000 * j + 17
        images[row] = {"bytes": data, "path": images[row]["path"]}
        replaced[kind] = row
    col = pa.array(images, table.schema.field("image").type)
    out = tmp_path / "shards"
    out.mkdir()
    pq.write_table(table.set_column(0, "image", col), out / "train-00000-of-00001.parquet", row_group_size=1000)
    info = build(str(out), "auto:10", tmp_path / "m", imagenet_meta=shared_data / "imagenet-meta", leftover="other", num_workers=2)
    for kind in bad:
        assert info.counts[kind] >= 1, kind
    assert info.counts["converted_grayscale"] > 100  # Tiny-ImageNet's own ~1.6 % grayscale photos
    skipped = info.counts["skipped_truncated"] + info.counts["skipped_unreadable"] + info.counts["skipped_empty"]
    assert skipped == 3 and info.num_images == table.num_rows - 3
