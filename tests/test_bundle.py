"""Bundles: written atomically, every routing kept, every path inside, every byte hashed, optional
signatures, no pickles; a broken or hostile bundle is refused with one line that names the path."""

import hashlib
import json
import shutil

import pytest
import torch
from test_predictor import make_hierarchy, make_predictor

from supersub.bundle import SIGNATURE_FILE, load_bundle, write_bundle
from supersub.delta import DeltaConfig
from supersub.errors import BundleError
from supersub.networks import NetworkSpec
from supersub.resnet import ModelConfig
from supersub.routing import Routing

ROUTINGS = {"hard": "hard", "soft": "soft:2@0.9", "hard_pooled": "hard+0.5", "soft_pooled": "soft:2@0.9+0.25"}


def write(path, key=None):
    h = make_hierarchy()
    pred, base, deltas = make_predictor(h)
    write_bundle(
        path, base=base, base_spec=NetworkSpec(ModelConfig(backbone="resnet10", width=0.25), h.num_subclasses, 32),
        resident="vanilla", hierarchy=h, deltas=deltas, delta_cfg=DeltaConfig(keep=0.2, bits=4, stages=["layer3", "layer4"]),
        routings=ROUTINGS, serves={"model": "two_stage_soft_pooled", "routing": ROUTINGS["soft_pooled"]},
        evaluation={"batch_size": 64, "top": 3}, key=key,
    )
    return pred


@pytest.fixture()
def bundle_dir(tmp_path):
    pred = write(tmp_path / "bundle")
    return tmp_path / "bundle", pred


def edit_manifest(path, change):
    """Changes manifest.json the way someone with write access would (hashes untouched)."""
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_bundle_round_trip_predicts_the_same_with_every_routing(bundle_dir):
    path, pred = bundle_dir
    bundle = load_bundle(path)
    assert {k: str(v) for k, v in bundle.routings.items()} == ROUTINGS
    assert bundle.routing() == Routing.parse("soft:2@0.9+0.25")  # the one it serves
    x = torch.randn(4, 3, 32, 32)
    for name in ROUTINGS:
        a, _ = pred.predict(x, bundle.routing(name))
        b, _ = bundle.predictor().predict(x, bundle.routing(name))
        assert torch.equal(a, b)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"base.safetensors", "deltas/0.safetensors", "deltas/1.safetensors", "deltas/2.safetensors"}
    assert manifest["bytes"]["per_specialist"]["S0"] == (path / "deltas/0.safetensors").stat().st_size
    assert not list(path.parent.rglob("*.tmp*"))


def test_changed_file_is_refused(bundle_dir):
    path, _ = bundle_dir
    data = bytearray((path / "deltas/1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "deltas/1.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="deltas/1.safetensors was changed"):
        load_bundle(path).load_deltas()


def test_foreign_and_missing_files_are_refused(bundle_dir):
    path, _ = bundle_dir
    (path / "deltas/evil.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BundleError, match="does not list: deltas/evil.pt"):
        load_bundle(path)
    (path / "deltas/evil.pt").unlink()
    (path / "deltas/2.safetensors").unlink()
    with pytest.raises(BundleError, match="missing deltas/2.safetensors"):
        load_bundle(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text('{"kind": "something else"}')
    with pytest.raises(BundleError, match="not a supersub bundle"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text('{"kind": "supersub.bundle", "format_version": 99}')
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("where", ["base", "baseline"])
@pytest.mark.parametrize("target", ["/etc/passwd", "../outside/base.safetensors", "deltas/../../x.safetensors", "./base.safetensors"])
def test_paths_outside_the_bundle_are_refused_with_the_path(bundle_dir, where, target):
    path, _ = bundle_dir
    outside = path.parent / "outside"
    outside.mkdir()
    shutil.copy(path / "base.safetensors", outside / "base.safetensors")  # a loadable network out there

    def point(m):
        if where == "base":
            m["base"]["file"] = target
        else:
            m["baselines"] = {"vanilla": {**m["base"], "file": target}}
        m["files"][target] = m["files"]["base.safetensors"]  # even listed with a right hash

    edit_manifest(path, point)
    with pytest.raises(BundleError, match="points outside the bundle") as e:
        load_bundle(path).load_base()
    assert target in str(e.value)


def test_a_symlink_out_of_the_bundle_is_refused(bundle_dir, tmp_path):
    path, _ = bundle_dir
    (tmp_path / "elsewhere.safetensors").write_bytes((path / "deltas/0.safetensors").read_bytes())
    (path / "deltas/0.safetensors").unlink()
    (path / "deltas/0.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(BundleError, match="points outside the bundle"):
        load_bundle(path)


def test_unlisted_referenced_file_is_refused(bundle_dir):
    path, _ = bundle_dir
    edit_manifest(path, lambda m: m["files"].pop("base.safetensors"))
    with pytest.raises(BundleError, match="base.file 'base.safetensors' is not listed"):
        load_bundle(path)


def test_malformed_manifests_are_one_line_errors(bundle_dir):
    path, _ = bundle_dir
    cases = [
        lambda m: m.update(files=list(m["files"])),  # files as a list
        lambda m: m["routings"].update(soft="soft:2@7"),  # an impossible routing
        lambda m: m["serves"].update(routing="magic"),
        lambda m: m.update(resident="bogus"),
        lambda m: m["base"].update(num_outputs=3),  # a head that does not fit the hierarchy
    ]
    original = (path / "manifest.json").read_text()
    for change in cases:
        (path / "manifest.json").write_text(original)
        edit_manifest(path, change)
        with pytest.raises(BundleError) as e:
            load_bundle(path)
        assert "\n" not in str(e.value)


def test_a_listed_file_that_is_not_safetensors_or_does_not_fit_is_refused(bundle_dir):
    path, _ = bundle_dir
    junk = b"this is not a safetensors file"
    (path / "deltas/1.safetensors").write_bytes(junk)
    edit_manifest(path, lambda m: m["files"]["deltas/1.safetensors"].update(sha256=hashlib.sha256(junk).hexdigest()))
    with pytest.raises(BundleError, match="deltas/1.safetensors: not a safetensors file"):
        load_bundle(path).load_deltas()
    # a real delta under another superclass's name: its head has the wrong number of rows
    shutil.copy(path / "deltas/2.safetensors", path / "deltas/1.safetensors")
    data = (path / "deltas/1.safetensors").read_bytes()
    edit_manifest(path, lambda m: m["files"]["deltas/1.safetensors"].update(sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(BundleError, match="superclass"):
        load_bundle(path).load_deltas()


def test_base_that_does_not_fit_its_spec_is_refused(bundle_dir):
    path, _ = bundle_dir
    edit_manifest(path, lambda m: m["base"]["model"].update(width=0.5))
    with pytest.raises(BundleError, match="base.safetensors does not fit its network spec"):
        load_bundle(path).load_base()


def test_signed_bundles(tmp_path, monkeypatch):
    path = tmp_path / "signed"
    write(path, key="secret")
    assert (path / SIGNATURE_FILE).is_file()
    load_bundle(path, key="secret")
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(path, key="another")
    # tampering that keeps every hash right: a changed delta with its sha256 updated
    data = bytearray((path / "deltas/0.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "deltas/0.safetensors").write_bytes(bytes(data))
    edit_manifest(path, lambda m: m["files"]["deltas/0.safetensors"].update(sha256=hashlib.sha256(data).hexdigest()))
    load_bundle(path).load_deltas()  # without a key, the hashes only guard against corruption
    monkeypatch.setenv("SUPERSUB_BUNDLE_KEY", "secret")
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(path)
    unsigned = tmp_path / "unsigned"
    monkeypatch.delenv("SUPERSUB_BUNDLE_KEY")
    write(unsigned)
    monkeypatch.setenv("SUPERSUB_BUNDLE_KEY", "secret")
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(unsigned)
