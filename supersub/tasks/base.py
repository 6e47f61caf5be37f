"""A task is the unit of work: it has a name, an identity, and a ``run(ctx)`` that writes its
outputs into its own folder.

* **Identity and fingerprint.** :meth:`Task.identity` is what the task computes — its settings,
  the fingerprint of the manifest it reads and the hashes of the networks it starts from — never
  where files live or how data is read. :meth:`Task.fingerprint` is its sha256. A task's folder
  is named ``<name>-<fingerprint[:10]>``, so a rerun finds exactly the tasks whose identity has
  not changed and trains anew, beside the old ones, the tasks whose identity has (other data, a
  retrained network underneath, other settings). Nothing is ever reused silently and nothing is
  overwritten.
* **Round trip.** :meth:`Task.to_dict` / :func:`task_from_dict` carry a task to a Ray worker.
* **Context.** :class:`TaskContext` says how a task runs (device, DDP, reporting, resuming);
  the same ``run`` works in this process, in a Ray Train worker and in a Tune trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from supersub import atomic
from supersub.config import from_dict, to_dict
from supersub.data.loaders import LoaderSpec, make_loader

TASK_FILE = "task.json"
RESULT_FILE = "metrics.json"
OUTPUTS_KEY = "outputs"  # in metrics.json: {file: {"bytes", "sha256"}} of the task's outputs
LOCK_FILE = ".lock"
# A task's own bookkeeping in its folder, never among its outputs.
_NOT_OUTPUTS = {TASK_FILE, RESULT_FILE, "checkpoint"}


def _why(e: BaseException) -> str:
    return "empty" if isinstance(e, ValueError) and "Expecting value: line 1 column 1 (char 0)" in str(e) else str(e)


@dataclass
class TaskContext:
    """How a task runs. The defaults run it in this process on one device."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m  # e.g. DDP wrapping
    report: Callable[[dict[str, Any], Path | None], None] = lambda metrics, ckpt: None  # every epoch
    log: Callable[[str], None] = print
    make_loader: Callable[..., Any] | None = None  # replaces supersub.data.loaders.make_loader
    resume_dir: Path | None = None  # a checkpoint directory handed back by the runner


@dataclass
class DataOptions:
    """Where a task's manifest is and how to read it. Only ``fingerprint`` and ``image_size``
    are part of a task's identity: the same images read another way are the same data."""

    manifest_dir: str
    fingerprint: str
    image_size: int
    loader: Literal["auto", "tensors", "dataset"] = "auto"
    num_workers: int = 2
    cache_dir: str | None = None
    decode: Literal["auto", "cpu", "cuda"] = "auto"  # where training JPEGs are decoded (data.decode)

    def identity(self) -> dict[str, Any]:
        return {"manifest": self.fingerprint, "image_size": self.image_size}


def digest(data: Any) -> str:
    """sha256 of a JSON-able value, keys sorted: the same value gives the same digest anywhere."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# How an optimiser setting is applied, not what is trained: left out of identities.
EXECUTION_ONLY = ("amp", "channels_last", "compile")


def optim_identity(optim: Any) -> dict[str, Any]:
    return {k: v for k, v in to_dict(optim).items() if k not in EXECUTION_ONLY}


def runner_identity(runner: str) -> dict[str, Any]:
    """The runner's part of a training task's identity: nothing for ``local``, else its name.

    The local runner and Ray Train workers do not compute bit for bit alike (another intra-op
    thread count sums floats in another order), so a folder continued with the other runner must
    not mix their weights. The local runner adds nothing so that its folders — every study's,
    resumed across sessions by fingerprint — keep their fingerprints."""
    return {} if runner == "local" else {"runner": runner}


T = TypeVar("T", bound="Task")


class Task:
    """Base of the task kinds (:data:`TASK_KINDS`); subclasses are dataclasses with ``out_dir``."""

    kind: ClassVar[str]
    resources: ClassVar[str] = "network"  # which group of resources.* a runner gives it
    out_dir: str

    @property
    def name(self) -> str:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError

    def loader_specs(self) -> dict[str, LoaderSpec]:
        """The loaders the task asks for, by split (a Ray Data runner builds its datasets from these)."""
        return {}

    @classmethod
    def under(cls: type[T], root: str | Path, **fields: Any) -> T:
        """The task in its own folder under ``root``, named by its fingerprint (which the folder is
        no part of, so it is known before the folder is)."""
        unplaced = cls(out_dir="", **fields)
        return dataclasses.replace(unplaced, out_dir=folder_for(root, unplaced.name, unplaced.fingerprint()))

    # ------------------------------------------------------------------ identity on disk
    def fingerprint(self) -> str:
        return digest({"kind": self.kind, **self.identity()})

    def stamp(self) -> None:
        """Writes ``task.json`` (kind, name, fingerprint, identity) into the task's folder."""
        doc = {"kind": self.kind, "name": self.name, "fingerprint": self.fingerprint(), "identity": self.identity()}
        atomic.write_text(Path(self.out_dir) / TASK_FILE, json.dumps(doc, indent=2, sort_keys=True))

    def damage(self) -> str | None:
        """Why this folder does not hold this task finished, in one line (None: it does).

        Finished means ``task.json`` with this fingerprint and a readable ``metrics.json`` whose
        recorded outputs (``outputs``: bytes and sha256 of each file) are all on disk unchanged;
        "not run yet" is ``"not finished"``."""
        out = Path(self.out_dir)
        if not (out / RESULT_FILE).is_file() or not (out / TASK_FILE).is_file():
            return "not finished"
        try:
            if json.loads((out / TASK_FILE).read_text()).get("fingerprint") != self.fingerprint():
                return "not finished"
        except (ValueError, OSError) as e:
            return f"{TASK_FILE} is unreadable ({_why(e)})"
        try:
            doc = json.loads((out / RESULT_FILE).read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as e:
            return f"{RESULT_FILE} is unreadable ({_why(e)})"
        return atomic.damaged(out, doc.get(OUTPUTS_KEY, {}))

    def done(self) -> bool:
        """Finished earlier with this very identity, its outputs as recorded (:meth:`damage`)."""
        return self.damage() is None

    def result(self) -> dict[str, Any]:
        doc = json.loads((Path(self.out_dir) / RESULT_FILE).read_text())
        doc.pop(OUTPUTS_KEY, None)
        return doc

    def write_result(self, result: dict[str, Any], outputs: list[str] | None = None) -> None:
        """Writes ``metrics.json`` — the last rename of a task, which makes it done — with the
        bytes and sha256 of each of its ``outputs`` (file or folder names in the task's folder;
        None: every file there but the task's own bookkeeping)."""
        out = Path(self.out_dir)
        names = outputs if outputs is not None else [p.name for p in out.iterdir() if p.name not in _NOT_OUTPUTS and not p.name.startswith(".")]
        doc = {**result, OUTPUTS_KEY: atomic.record(out, names)}
        atomic.write_text(out / RESULT_FILE, json.dumps(doc, indent=2))

    # ------------------------------------------------------------------ round trip
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **to_dict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        kwargs = {}
        for k, v in d.items():
            if k == "kind":
                continue
            if k == "data":
                kwargs[k] = DataOptions(**v)
            elif k in _SECTIONS and isinstance(v, dict):
                kwargs[k] = from_dict(_SECTIONS[k](), v)
            else:
                kwargs[k] = v
        return cls(**kwargs)

    # ------------------------------------------------------------------ helpers for run()
    def loader(self, ctx: TaskContext, manifest, spec: LoaderSpec):
        data: DataOptions = self.data  # type: ignore[attr-defined]
        if ctx.make_loader is not None:
            return ctx.make_loader(spec)
        return make_loader(manifest, spec, image_size=data.image_size, mode=data.loader, device=ctx.device,
                           num_workers=data.num_workers, cache_dir=data.cache_dir, rank=ctx.rank,
                           world_size=ctx.world_size, decode=data.decode)


def folder_for(root: str | Path, name: str, fingerprint: str) -> str:
    """A task's folder under ``root``: ``<name>-<fingerprint[:10]>``."""
    return str(Path(root) / f"{name}-{fingerprint[:10]}")


def _model_config():
    from supersub.resnet import ModelConfig

    return ModelConfig


def _optim_config():
    from supersub.epoch import OptimConfig

    return OptimConfig


def _delta_config():
    from supersub.delta import DeltaConfig

    return DeltaConfig


# Fields that hold config sections, and the dataclass each is rebuilt into.
_SECTIONS: dict[str, Callable[[], type]] = {"model": _model_config, "optim": _optim_config, "delta": _delta_config}

TASK_KINDS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASK_KINDS[cls.kind] = cls
    return cls


def task_from_dict(d: dict[str, Any]) -> Task:
    try:
        cls = TASK_KINDS[d["kind"]]
    except KeyError:
        raise ValueError(f"unknown task kind {d.get('kind')!r}; known: {', '.join(TASK_KINDS)}") from None
    return cls.from_dict(d)
