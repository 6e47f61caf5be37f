"""``supersub evaluate``: a bundle's models on any data source, computed as the pipeline computed them.

    supersub evaluate --bundle runs/default/bundle --data runs/default/data
    supersub evaluate --bundle runs:/<run id>/bundle --data /data/imagenet-parquet --routing soft:2 --json

``--bundle`` is a bundle folder or an MLflow URI (``runs:/<id>/bundle``, ``models:/supersub/3``).
``--data`` is a manifest folder (as written by ``supersub data build`` or the pipeline) or any
source of the data layer, which is then read with the bundle's own hierarchy (classes outside it
are left out). The split evaluated is ``test`` when there is one, else every image.

Every routing the pipeline reported (stored in the bundle) is evaluated the way the pipeline did
(same batch size, same superclasses run per image), so on the pipeline's own data the numbers
equal its ``metrics.json``; ``--routing`` adds one more, reported as ``two_stage_asked``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from supersub.config import ConfigError
from supersub.errors import DataError


def _manifest_for(data: str, bundle, workdir: Path):
    from supersub.data import build_manifest, load_manifest

    if (Path(data) / "manifest.parquet").is_file():
        manifest = load_manifest(data)
        theirs, ours = manifest.hierarchy, bundle.hierarchy
        if theirs.subclass_ids != ours.subclass_ids or theirs.fine_to_coarse != ours.fine_to_coarse:
            only_theirs = sorted(set(theirs.subclass_ids) - set(ours.subclass_ids))
            how = (f"{len(only_theirs)} of its classes are not the bundle's (e.g. {only_theirs[0]})" if only_theirs
                   else "its classes are grouped or ordered differently")
            raise DataError(f"{data} was built with another hierarchy than the bundle's ({how}): "
                            "evaluate the source itself instead of this manifest")
        return manifest
    build_manifest(data, bundle.hierarchy, workdir, val_fraction=0.0, test_fraction=0.0, progress=False)
    return load_manifest(workdir)


def evaluate_bundle(bundle_ref: str, data: str, routing: str | None = None, device: str = "auto",
                    split: str | None = None) -> dict[str, Any]:
    """Metrics of the bundle's models (vanilla, every stored routing, oracle) on ``data``."""
    import torch

    from supersub.data.loaders import LoaderSpec, make_loader
    from supersub.epoch import pick_device
    from supersub.evaluation import collect, network_probs, score_models
    from supersub.remote import open_bundle
    from supersub.routing import HARD, Routing, combine

    bundle = open_bundle(bundle_ref)
    asked = Routing.parse(routing) if routing and routing not in bundle.routings else None
    dev = pick_device(device)
    how = bundle.manifest.get("evaluation") or {}
    batch_size, top = int(how.get("batch_size", 256)), int(how.get("top", 3))
    if asked is not None:
        top = max(top, asked.k)
        if asked.pooled and bundle.stage_one != "vanilla":
            raise ConfigError(f"--routing {routing}: pooling (+α) needs the vanilla network's own answer in stage one; "
                              f"this bundle's stage one is {bundle.stage_one}")
    amp = torch.bfloat16 if how.get("amp") == str(torch.bfloat16) else None  # as the pipeline evaluated
    with tempfile.TemporaryDirectory(prefix="supersub-eval-") as tmp:
        manifest = _manifest_for(data, bundle, Path(tmp))
        counts = manifest.counts()
        split = split or ("test" if counts["test"] else "val" if counts["val"] else "train")
        if not counts.get(split):
            raise DataError(f"{data} has no images in split {split!r} (splits: {counts})")

        def loader():
            spec = LoaderSpec(split, "fine", False, batch_size)
            return make_loader(manifest, spec, image_size=bundle.image_size, mode="auto", device=dev, num_workers=2)

        probs = {"vanilla": network_probs(bundle.load_vanilla().to(dev), loader(), dev)}
        predictor = bundle.predictor(dev, amp=amp, cache_bytes=1 << 30)
        out, oracle, labels = collect(predictor, loader(), min(top, bundle.hierarchy.num_superclasses))
        routings = {f"two_stage_{name}": r for name, r in bundle.routings.items()}
        if asked is not None:
            routings["two_stage_asked"] = asked
        for name, r in routings.items():
            probs[name] = combine(out, r)
        probs["two_stage_oracle"] = combine(oracle, HARD)
        models, _ = score_models(probs, labels, bundle.hierarchy, out, bootstrap=0)
    for name, r in routings.items():
        models[name]["routing"] = str(r)
    return {
        "bundle": str(bundle_ref),
        "data": data,
        "split": split,
        "images": counts[split],
        "serves": bundle.manifest["serves"],
        "routings": {name: str(r) for name, r in routings.items()},
        "models": models,
        "bytes": bundle.manifest["bytes"],
    }


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{result['bundle']} on {result['data']} [{result['split']}, {result['images']} images]",
             f"{'model':<24}{'routing':<18}{'top-1':>8}{'top-5':>8}{'super':>8}{'cross%':>8}"]
    for name, m in result["models"].items():
        if "top1" not in m:
            lines.append(f"{name:<24}{'':<18}{'':>8}{'':>8}{m['superclass_acc']:>8.2f}")
            continue
        lines.append(f"{name:<24}{m.get('routing', ''):<18}{m['top1']:>8.2f}{m['top5']:>8.2f}"
                     f"{m['superclass_acc']:>8.2f}{m['crossing_error_share']:>8.1f}")
    lines.append(f"the bundle serves {result['serves']['model']} ({result['serves']['routing']}); "
                 f"stored: {result['bytes']['total_in_networks']:.3f} networks")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    result = evaluate_bundle(args.bundle, args.data, args.routing, args.device, args.split)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a bundle on a data source", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder, runs:/<id>/bundle or models:/<name>/<version>")
    p.add_argument("--data", required=True, help="manifest folder or data source spec")
    p.add_argument("--routing", help="one more routing to evaluate: a stored family (hard, soft, soft_pooled, ...) "
                   "or an explicit one such as soft:2@0.7+0.5")
    p.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate (default: test, else all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
