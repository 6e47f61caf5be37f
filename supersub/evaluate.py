"""``supersub evaluate``: a bundle's two-stage model and its baselines on any data source.

    supersub evaluate --bundle runs/default/bundle --data runs/default/data
    supersub evaluate --bundle B --data /data/imagenet-parquet --routing soft:2 --json

``--data`` is a manifest folder (as written by ``supersub data build`` or the pipeline) or any
source of the data layer, which is then read with the bundle's own hierarchy (classes outside it
are left out). The split evaluated is ``test`` when there is one (a source's own eval split, e.g.
a ``val-`` Parquet file), else every image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from supersub.errors import DataError


def _manifest_for(data: str, bundle, workdir: Path):
    from supersub.data import build_manifest, load_manifest

    if (Path(data) / "manifest.parquet").is_file():
        manifest = load_manifest(data)
        if manifest.hierarchy.subclass_ids != bundle.hierarchy.subclass_ids:
            raise DataError(
                f"{data} was built with hierarchy {manifest.hierarchy.name!r}, not the bundle's "
                f"{bundle.hierarchy.name!r}: evaluate the source itself instead of this manifest"
            )
        return manifest
    build_manifest(data, bundle.hierarchy, workdir, val_fraction=0.0, test_fraction=0.0, progress=False)
    return load_manifest(workdir)


def evaluate_bundle(bundle_dir: str, data: str, routing: str | None = None, device: str = "auto",
                    split: str | None = None) -> dict[str, Any]:
    """Metrics of the bundle's two-stage model (hard, soft, oracle) and baselines on ``data``."""
    from supersub.bundle import load_bundle
    from supersub.evaluation import evaluate_two_stage, network_probs
    from supersub.loaders import LoaderSpec, make_loader
    from supersub.predictor import RoutingConfig
    from supersub.train import pick_device

    bundle = load_bundle(bundle_dir)
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="supersub-eval-") as tmp:
        manifest = _manifest_for(data, bundle, Path(tmp))
        counts = manifest.counts()
        split = split or ("test" if counts["test"] else "val" if counts["val"] else "train")
        if not counts.get(split):
            raise DataError(f"{data} has no images in split {split!r} (splits: {counts})")

        def loader():
            spec = LoaderSpec(split, "fine", False, 256)
            return make_loader(manifest, spec, image_size=bundle.image_size, mode="auto", device=dev, num_workers=2)

        baselines = {}
        if bundle.resident == "vanilla":
            baselines["vanilla"] = network_probs(bundle.load_base().to(dev), loader(), dev)
        for name in bundle.baseline_names:
            baselines[name] = network_probs(bundle.load_baseline(name).to(dev), loader(), dev)
        r = RoutingConfig.parse(routing) if routing else bundle.routing()
        r.calibrate = False  # calibrated when the bundle was made; never on the evaluation split
        result = evaluate_two_stage(bundle.predictor(dev), bundle.hierarchy, loader(), None, r, baselines)
    return {
        "bundle": str(bundle_dir),
        "data": data,
        "split": split,
        "images": counts[split],
        "routing": result["routing"],
        "models": result["models"],
        "bytes": bundle.manifest["bytes"],
    }


def format_result(result: dict[str, Any]) -> str:
    from supersub.pipeline import format_summary

    head = f"{result['bundle']} on {result['data']} [{result['split']}, {result['images']} images]"
    return head + "\n" + format_summary(result)


def _run(args: argparse.Namespace) -> int:
    result = evaluate_bundle(args.bundle, args.data, args.routing, args.device, args.split)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a bundle on a data source", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--data", required=True, help="manifest folder or data source spec")
    p.add_argument("--routing", help="hard, soft or soft:K (default: the bundle's calibrated routing)")
    p.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate (default: test, else all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
