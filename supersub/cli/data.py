"""``supersub data build|show``: make a manifest folder from an image source, or summarise one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from supersub.data.build import build_manifest
from supersub.data.images import EVENTS
from supersub.data.manifest import load_manifest, summary_table
from supersub.data.sources import SOURCE_SPECS_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``data build`` and ``data show`` to the ``supersub`` command."""
    parser = subparsers.add_parser(
        "data", help="build or show a data manifest", description="Build or show a data manifest."
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    build = sub.add_parser(
        "build",
        help="list, verify and split an image source into a manifest folder",
        description="Write DIR/manifest.parquet and DIR/hierarchy.json from an image source.",
    )
    build.add_argument("--source", required=True, metavar="SRC", help=SOURCE_SPECS_HELP)
    build.add_argument(
        "--hierarchy",
        required=True,
        metavar="NAME|FILE",
        help="paper10, cifar100, auto:K, synthetic (the source's own), or a hierarchy/mapping file",
    )
    build.add_argument("--out", required=True, type=Path, metavar="DIR", help="manifest folder to (over)write")
    build.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="share of each class's train images held out as val (default 0.1)")
    build.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        metavar="F",
        help="share held out as test (default: the val fraction if the source has no eval split, else 0)",
    )
    build.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the split (default 0)")
    build.add_argument("--imagenet-meta", type=Path, default=None, metavar="DIR", help="folder with wordnet.is_a.txt and words.txt (default: $SUPERSUB_IMAGENET_META)")
    build.add_argument("--classes", type=Path, default=None, metavar="FILE", help="text file of class ids to keep, one a line")
    build.add_argument("--no-verify", dest="verify", action="store_false", help="do not decode every image once (bad images are then neither skipped nor counted)")
    build.add_argument("--workers", type=int, default=None, metavar="N", help="verification processes (default: all cores)")
    build.add_argument(
        "--leftover",
        choices=["drop", "other"],
        default="drop",
        help="source classes outside the hierarchy: drop them, or gather them in a superclass 'other'",
    )
    build.add_argument("--download", action="store_true", help="CIFAR-100: download into the given root if missing")
    build.set_defaults(func=cmd_build)

    show = sub.add_parser("show", help="summarise a manifest folder")
    show.add_argument("dir", type=Path, metavar="DIR", help="manifest folder")
    show.add_argument("--json", action="store_true", help="print the manifest metadata as JSON")
    show.set_defaults(func=cmd_show)


def cmd_build(args: argparse.Namespace) -> int:
    build_manifest(
        args.source,
        args.hierarchy,
        args.out,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        classes=args.classes,
        imagenet_meta=args.imagenet_meta,
        verify=args.verify,
        num_workers=args.workers,
        progress=True,
        leftover=args.leftover,
        download=args.download,
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest.meta, indent=2, sort_keys=True))
        return 0
    meta, h = manifest.meta, manifest.hierarchy
    source = meta.get("source", {})
    params = source.get("params") or {}
    print(f"manifest {manifest.path}")
    print(f"source:    {source.get('kind')} {source.get('root') or ''}{' ' + json.dumps(params) if params else ''}")
    print(f"hierarchy: {h.name}: {h.num_superclasses} superclasses, {h.num_subclasses} subclasses")
    print(f"images:    {len(manifest)}  " + "  ".join(f"{k}={v}" for k, v in manifest.counts().items()))
    build = meta.get("build", {})
    if build:
        print("build:     " + ", ".join(f"{k}={v}" for k, v in build.items()))
    counts = meta.get("counts", {})
    if any(counts.values()):
        print("bad data:  " + ", ".join(f"{k}={counts[k]}" for k in EVENTS if counts.get(k)))
    elif build.get("verify", True):
        print("bad data:  none")
    print()
    print(summary_table(h, manifest.subclass, manifest.split))
    return 0
