"""The two-level class hierarchy that drives training, evaluation and serving.

A :class:`Hierarchy` is an ordered list of superclasses, each an ordered list of subclasses. The
*fine index* of a subclass is its position in the concatenation of all superclasses' subclasses
(superclass 0's subclasses first); the *local index* is its position inside its superclass. Every
stage (data manifest, vanilla head, specialist heads, serving) uses these same orders, so the
JSON file written here is the single source of truth.

Optionally a hierarchy carries ``parents`` (child id → parent id, e.g. WordNet is-a edges above
the subclasses), which gives mistake severity as the height of the lowest common ancestor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


class HierarchyError(ValueError):
    """A hierarchy that is not a valid two-level partition."""


@dataclass(frozen=True)
class Subclass:
    id: str  # e.g. an ImageNet wnid "n02085620", or a dataset's own class id
    name: str


@dataclass(frozen=True)
class Superclass:
    id: str  # e.g. the WordNet node "n02084071", or a free id such as "learned_3"
    name: str
    subclasses: tuple[Subclass, ...]


@dataclass(frozen=True)
class Hierarchy:
    name: str
    superclasses: tuple[Superclass, ...]
    parents: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "superclasses", tuple(self.superclasses))
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        if not self.superclasses:
            raise HierarchyError(f"hierarchy {self.name!r} has no superclasses")
        seen_super: set[str] = set()
        owner: dict[str, str] = {}
        for sup in self.superclasses:
            if not sup.id:
                raise HierarchyError(f"hierarchy {self.name!r}: a superclass has an empty id")
            if sup.id in seen_super:
                raise HierarchyError(f"hierarchy {self.name!r}: superclass {sup.id} appears twice")
            seen_super.add(sup.id)
            if not sup.subclasses:
                raise HierarchyError(f"hierarchy {self.name!r}: superclass {sup.id} ({sup.name}) is empty")
            for sub in sup.subclasses:
                if not sub.id:
                    raise HierarchyError(f"hierarchy {self.name!r}: superclass {sup.id} has a subclass with an empty id")
                if sub.id in owner:
                    where = "twice in" if owner[sub.id] == sup.id else f"in both {owner[sub.id]} and"
                    raise HierarchyError(f"hierarchy {self.name!r}: subclass {sub.id} is {where} {sup.id}")
                owner[sub.id] = sup.id

    # ---------------------------------------------------------------- orders and maps
    @property
    def num_superclasses(self) -> int:
        return len(self.superclasses)

    @property
    def num_subclasses(self) -> int:
        return sum(len(s.subclasses) for s in self.superclasses)

    @property
    def subclasses(self) -> list[Subclass]:
        """All subclasses in fine-index order."""
        return [sub for sup in self.superclasses for sub in sup.subclasses]

    @property
    def subclass_ids(self) -> list[str]:
        return [s.id for s in self.subclasses]

    @property
    def superclass_ids(self) -> list[str]:
        return [s.id for s in self.superclasses]

    @property
    def fine_to_coarse(self) -> list[int]:
        """``fine_to_coarse[i]`` = superclass index of fine class ``i``."""
        return [si for si, sup in enumerate(self.superclasses) for _ in sup.subclasses]

    @property
    def coarse_to_fine(self) -> list[list[int]]:
        """``coarse_to_fine[s]`` = the fine indices of superclass ``s``, in local order."""
        out, start = [], 0
        for sup in self.superclasses:
            out.append(list(range(start, start + len(sup.subclasses))))
            start += len(sup.subclasses)
        return out

    def fine_index(self, subclass_id: str) -> int:
        try:
            return self._fine_index[subclass_id]
        except KeyError:
            raise HierarchyError(f"class {subclass_id!r} is not in hierarchy {self.name!r}") from None

    def superclass_index(self, superclass_id: str) -> int:
        try:
            return self.superclass_ids.index(superclass_id)
        except ValueError:
            raise HierarchyError(f"superclass {superclass_id!r} is not in hierarchy {self.name!r}") from None

    def local_index(self, subclass_id: str) -> int:
        fine = self.fine_index(subclass_id)
        return fine - self.coarse_to_fine[self.fine_to_coarse[fine]][0]

    def check_known(self, ids: Iterable[str]) -> None:
        """Raises a :class:`HierarchyError` listing the ids that are not subclasses of this hierarchy."""
        unknown = sorted({i for i in ids if i not in self._fine_index})
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise HierarchyError(f"{len(unknown)} class id(s) not in hierarchy {self.name!r}: {shown}")

    @property
    def _fine_index(self) -> dict[str, int]:
        cached = self.__dict__.get("_fine_index_cache")
        if cached is None:
            cached = {sid: i for i, sid in enumerate(self.subclass_ids)}
            object.__setattr__(self, "_fine_index_cache", cached)
        return cached

    # ---------------------------------------------------------------- severity
    def ancestors(self, subclass_id: str) -> list[str]:
        """Path from a subclass up to the root: the subclass, then ``parents`` edges, ending in
        its superclass and the implicit root ``"<root>"``. Without ``parents`` it is
        ``[sub, super, "<root>"]``."""
        path = [subclass_id]
        sup = self.superclasses[self.fine_to_coarse[self.fine_index(subclass_id)]].id
        node = subclass_id
        while node in self.parents and node != sup and len(path) < 64:
            node = self.parents[node]
            path.append(node)
        if path[-1] != sup:
            path.append(sup)
        path.append("<root>")
        return path

    def lca_height(self, true_id: str, pred_id: str) -> int:
        """Mistake severity: steps from the true class up to its lowest common ancestor with the
        prediction (0 when correct; with no ``parents``: 1 inside a superclass, 2 across)."""
        if true_id == pred_id:
            return 0
        pred_anc = set(self.ancestors(pred_id))
        for height, node in enumerate(self.ancestors(true_id)):
            if node in pred_anc:
                return height
        raise AssertionError("every path ends at <root>")

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "superclasses": [
                {
                    "id": sup.id,
                    "name": sup.name,
                    "subclasses": [{"id": s.id, "name": s.name} for s in sup.subclasses],
                }
                for sup in self.superclasses
            ],
            **({"parents": dict(sorted(self.parents.items()))} if self.parents else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hierarchy:
        if not isinstance(data, dict) or "superclasses" not in data:
            raise HierarchyError("hierarchy JSON must be an object with a 'superclasses' list")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise HierarchyError(f"hierarchy format version {version} is not supported (expected {FORMAT_VERSION})")
        try:
            sups = tuple(
                Superclass(
                    id=str(s["id"]),
                    name=str(s.get("name", s["id"])),
                    subclasses=tuple(Subclass(str(c["id"]), str(c.get("name", c["id"]))) for c in s["subclasses"]),
                )
                for s in data["superclasses"]
            )
        except (KeyError, TypeError) as e:
            raise HierarchyError(f"hierarchy JSON is malformed: missing or wrong field {e}") from e
        return cls(name=str(data.get("name", "custom")), superclasses=sups, parents=dict(data.get("parents", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Hierarchy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HierarchyError(f"hierarchy file is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Hierarchy:
        return cls.from_json(Path(path).read_text())

    # ---------------------------------------------------------------- helpers
    def restrict(self, keep_ids: Sequence[str], name: str | None = None) -> Hierarchy:
        """The same hierarchy with only the given subclasses; superclasses left empty are dropped."""
        keep = set(keep_ids)
        sups = []
        for sup in self.superclasses:
            subs = tuple(s for s in sup.subclasses if s.id in keep)
            if subs:
                sups.append(Superclass(sup.id, sup.name, subs))
        return Hierarchy(name or self.name, tuple(sups), self.parents)

    def summary_rows(self) -> list[tuple[str, str, int]]:
        """``(superclass name, id, number of subclasses)`` per superclass."""
        return [(s.name, s.id, len(s.subclasses)) for s in self.superclasses]
