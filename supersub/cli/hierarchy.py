"""``supersub hierarchy show|save``: look at a hierarchy spec, or write it as the JSON file that
training, evaluation and serving read."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from supersub.hierarchy.builders import SPECS_HELP, load_hierarchy, read_class_list
from supersub.hierarchy.core import Hierarchy

_MEMBERS_WIDTH = 60


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``hierarchy show`` and ``hierarchy save`` to the ``supersub`` command."""
    parser = subparsers.add_parser(
        "hierarchy",
        help="show or save a class hierarchy",
        description="Show or save a two-level class hierarchy.",
    )
    sub = parser.add_subparsers(dest="hierarchy_command", metavar="ACTION")
    sub.required = True

    show = sub.add_parser("show", help="print a hierarchy as a table (or as JSON)")
    _add_spec_args(show)
    show.add_argument("--json", action="store_true", help="print the hierarchy JSON instead of a table")
    show.set_defaults(func=cmd_show)

    save = sub.add_parser("save", help="write a hierarchy JSON file")
    _add_spec_args(save)
    save.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    save.set_defaults(func=cmd_save)


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help=SPECS_HELP)
    p.add_argument(
        "--imagenet-meta",
        type=Path,
        default=None,
        help="folder with wordnet.is_a.txt and words.txt (default: $SUPERSUB_IMAGENET_META)",
    )
    p.add_argument(
        "--classes",
        type=Path,
        default=None,
        help="text file of class ids, one a line (like wnids.txt): the classes to use",
    )
    p.add_argument(
        "--leftover",
        choices=["drop", "other"],
        default="drop",
        help="auto:K: drop the classes under no chosen node, or gather them in 'other'",
    )


def _load(args: argparse.Namespace) -> tuple[Hierarchy, list[str] | None]:
    classes = read_class_list(args.classes) if args.classes else None
    hierarchy = load_hierarchy(
        args.name, classes=classes, imagenet_meta=args.imagenet_meta, leftover=args.leftover
    )
    return hierarchy, classes


def cmd_show(args: argparse.Namespace) -> int:
    hierarchy, classes = _load(args)
    print(hierarchy.to_json() if args.json else format_table(hierarchy, classes))
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    hierarchy, classes = _load(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hierarchy.save(args.out)
    dropped = _dropped(hierarchy, classes)
    print(
        f"wrote {args.out}: {hierarchy.name}, {hierarchy.num_superclasses} superclasses, "
        f"{hierarchy.num_subclasses} subclasses" + (f", {dropped} given classes left out" if dropped else "")
    )
    return 0


def _dropped(hierarchy: Hierarchy, classes: Sequence[str] | None) -> int:
    return len(set(classes) - set(hierarchy.subclass_ids)) if classes else 0


def _members(names: Sequence[str], width: int = _MEMBERS_WIDTH) -> str:
    """As many names as fit in ``width`` characters, then how many more there are."""
    shown: list[str] = []
    for i, n in enumerate(names):
        rest = len(names) - i
        if shown and len(", ".join([*shown, n])) > width and rest > 0:
            return ", ".join(shown) + f", ... (+{rest})"
        shown.append(n)
    return ", ".join(shown)


def format_table(hierarchy: Hierarchy, classes: Sequence[str] | None = None) -> str:
    """One row per superclass: index, name, id, number of subclasses, members; then totals."""
    rows = [("#", "name", "id", "count", "members")]
    for i, sup in enumerate(hierarchy.superclasses):
        rows.append(
            (str(i), sup.name, sup.id, str(len(sup.subclasses)), _members([s.name for s in sup.subclasses]))
        )
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [f"hierarchy {hierarchy.name}"]
    for r in rows:
        lines.append(
            "  ".join(
                [
                    r[0].rjust(widths[0]),
                    r[1].ljust(widths[1]),
                    r[2].ljust(widths[2]),
                    r[3].rjust(widths[3]),
                    r[4],
                ]
            ).rstrip()
        )
    lines.append(f"total: {hierarchy.num_superclasses} superclasses, {hierarchy.num_subclasses} subclasses")
    dropped = _dropped(hierarchy, classes)
    if classes:
        lines.append(f"given classes: {len(set(classes))}, in no superclass: {dropped}")
    return "\n".join(lines)
