"""Bundles: written atomically, hashes checked, tampered or foreign files refused, no pickles."""

import json

import pytest
import torch
from test_predictor import make_hierarchy, make_predictor

from supersub.bundle import NetworkSpec, load_bundle, write_bundle
from supersub.delta import DeltaConfig
from supersub.errors import BundleError
from supersub.models import ModelConfig
from supersub.predictor import RoutingConfig


@pytest.fixture()
def bundle_dir(tmp_path):
    h = make_hierarchy()
    pred, base, deltas = make_predictor(h)
    write_bundle(
        tmp_path / "bundle",
        base=base,
        base_spec=NetworkSpec(ModelConfig(backbone="resnet10", width=0.25), h.num_subclasses, 32),
        resident="vanilla",
        hierarchy=h,
        deltas=deltas,
        delta_cfg=DeltaConfig(keep=0.2, bits=4, stages=["layer3", "layer4"]),
        routing={"mode": "soft", "k": 2},
    )
    return tmp_path / "bundle", pred


def test_bundle_round_trip_predicts_the_same(bundle_dir):
    path, pred = bundle_dir
    bundle = load_bundle(path)
    x = torch.randn(4, 3, 32, 32)
    routing = bundle.routing()
    assert routing.k == 2
    a, _ = pred.predict(x, routing)
    b, _ = bundle.predictor().predict(x, routing)
    assert torch.equal(a, b)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"base.safetensors", "deltas/0.safetensors", "deltas/1.safetensors", "deltas/2.safetensors"}
    sizes = manifest["bytes"]["per_specialist"]
    assert sizes["S0"] == (path / "deltas/0.safetensors").stat().st_size
    assert not list(path.rglob("*.tmp*"))


def test_changed_file_is_refused(bundle_dir):
    path, _ = bundle_dir
    data = bytearray((path / "deltas/1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "deltas/1.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="deltas/1.safetensors was changed"):
        load_bundle(path)


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


def test_routing_from_manifest_must_be_valid(bundle_dir):
    path, _ = bundle_dir
    assert isinstance(load_bundle(path).routing(), RoutingConfig)
