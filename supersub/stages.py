"""The pipeline's stages and their tasks, in the order they run: the one place that says which tasks
a config trains and when. :func:`supersub.pipeline.run_pipeline` runs them; ``--plan``
(:mod:`supersub.plan`) bills them.

    base networks                        vanilla [+ own generalist] [+ scaled-up vanilla] [+ ensemble members]
    learned hierarchy                    (learned:K) clustered from the vanilla network, in the driver
    generalist on the learned hierarchy  (learned:K, generalist.kind=own)
    finetuned trunk                      (router_trunk=finetune) the specialists' resident
    specialists and controls             N specialists or the joint task [+ router] [+ delta_all] [+ vanilla_long]
    FLOPs-matched controls               (after evaluation) ensemble=auto, scaled_flops

A task's identity holds the sha256 of every network it starts from, and its folder is named by
that identity. So a stage's tasks can be built, complete, only once the stages before it are done:
:class:`PipelineTasks` hands out one stage at a time — run each before asking for the next — and
asks an :class:`Upstream` for what it needs of earlier stages. A run's upstream reads the finished
tasks; a plan's supplies its estimates, as no network exists yet.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from supersub.cost import flops_matched_model
from supersub.data.loaders import LoaderSpec, epoch_images
from supersub.hierarchy import Hierarchy
from supersub.networks import network_hash
from supersub.pipeline_config import PipelineConfig
from supersub.tasks import (
    DataOptions,
    JointTask,
    LearnedHierarchyTask,
    NetworkTask,
    RouterTask,
    SpecialistTask,
    Task,
)

BASE = "base networks"
LEARNED = "learned hierarchy"
LEARNED_GENERALIST = "generalist on the learned hierarchy"
FINETUNED = "finetuned trunk"
SPECIALISTS = "specialists and controls"
FLOPS_MATCHED = "FLOPs-matched controls"


@dataclass(frozen=True)
class Stage:
    """Tasks that run side by side, once every earlier stage is done."""

    name: str
    tasks: list[Task]
    in_driver: bool = False  # run in the driver's process whatever the runner: no training, one pass over val


class Upstream(Protocol):
    """What later stages need to know of earlier ones."""

    def network_hash(self, folder: str) -> str:
        """sha256 of the network a finished task stored in ``folder``."""

    def train_images(self, task: Task) -> int:
        """Training images ``task`` saw."""

    def learned_data(self, task: LearnedHierarchyTask) -> tuple[DataOptions, Any]:
        """The manifest a learned hierarchy task wrote: its options and the manifest itself."""


# ----------------------------------------------------------------------------- the tasks
def network_task(role: str, target: str, cfg: PipelineConfig, data: DataOptions, root: Path, *,
                 model=None, seed: int | None = None, train_images: int | None = None) -> NetworkTask:
    return NetworkTask.under(root, role=role, target=target, model=model or cfg.model, optim=cfg.train, data=data,
                             seed=cfg.seed if seed is None else seed, train_images=train_images,
                             runner=cfg.resources.runner)


def specialist_task(cfg: PipelineConfig, superclass: int | None, data: DataOptions, root: Path, resident_dir: str,
                    vanilla_dir: str, *, train_images: int | None = None,
                    hash_of: Callable[[str], str] = network_hash) -> SpecialistTask:
    """Superclass ``superclass``'s specialist, or (None) ``delta_all``: one delta on the vanilla
    network for all classes, no "other", no other init. ``hash_of``: the sha256 of a stored network."""
    own = cfg.generalist.has_own_network
    everything = superclass is None
    init_dir = vanilla_dir if (own and cfg.specialist.init == "vanilla" and not everything) else None
    head_init = cfg.specialist.head_init
    if head_init == "auto" or everything:
        head_init = "vanilla_rows" if (everything or cfg.specialist.init == "vanilla" or not own) else "random"
    inputs = {"resident": hash_of(resident_dir), "init": hash_of(init_dir) if init_dir else None,
              "vanilla": hash_of(vanilla_dir) if (head_init == "vanilla_rows" or cfg.specialist.distill) else None}
    return SpecialistTask.under(
        root, superclass=superclass, resident_dir=resident_dir, init_dir=init_dir, head_init=head_init,
        vanilla_dir=vanilla_dir, delta=cfg.delta, optim=cfg.specialist.optim,
        negatives=0.0 if everything else cfg.specialist.negatives, data=data, seed=cfg.seed, train_images=train_images,
        distill=cfg.specialist.distill, distill_temperature=cfg.specialist.distill_temperature, inputs=inputs,
        runner=cfg.resources.runner,
    )


def specialist_tasks(cfg: PipelineConfig, tasks: PipelineTasks, root: Path) -> list[SpecialistTask]:
    """One specialist per superclass of ``tasks``' hierarchy, against its resident."""
    return [specialist_task(cfg, s, tasks.data, root, tasks.resident_dir, tasks.teacher_dir,
                            hash_of=tasks.upstream.network_hash)
            for s in range(tasks.hierarchy.num_superclasses)]


def ensemble_size(flops_ratio: float, slack: float = 0.02) -> int:
    """How many vanilla networks a model costing ``flops_ratio`` networks of FLOPs an image pays
    for (at least one). The slack: a specialist pass costs a hair under a network (its head has
    fewer rows than the vanilla one's), so hard routing measures 1.9993 networks — two members."""
    return max(1, math.floor(flops_ratio + slack))


def ensemble_members(cfg: PipelineConfig, data: DataOptions, root: Path, members: int) -> list[NetworkTask]:
    """The vanilla networks of seeds seed, seed+1, ...: the first is the run's own vanilla network."""
    return [network_task("vanilla", "fine", cfg, data, root, seed=cfg.seed + i) for i in range(members)]


def planned_images(task: Task, manifest) -> int:
    """Training images a task will see, from the manifest alone (before it runs)."""
    if isinstance(task, JointTask):
        return task.expert_passes
    if getattr(task, "train_images", None) is not None:
        return task.train_images // task.optim.batch_size * task.optim.batch_size
    spec: LoaderSpec = task.loader_specs()["train"]
    rows = manifest.indices("train")
    fine, coarse = manifest.subclass[rows], manifest.superclass[rows]
    h: Hierarchy = manifest.hierarchy
    n_sub = len(h.superclasses[spec.superclass].subclasses) if spec.superclass is not None else 0
    return epoch_images(spec, fine, coarse, n_sub) * task.optim.epochs


# ----------------------------------------------------------------------------- the stages
class PipelineTasks:
    """One config's tasks by role, built a stage at a time (:meth:`stages`, then after evaluation
    :meth:`flops_matched`); an attribute is set once its stage has been handed out."""

    def __init__(self, cfg: PipelineConfig, root: Path, data: DataOptions, manifest, upstream: Upstream,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.root, self.upstream, self.log = cfg, Path(root), upstream, log
        self.first_data = data  # what the vanilla network and the network controls train on
        self.data, self.manifest = data, manifest  # what the specialists read (a learned hierarchy's, or the same)
        self.vanilla: NetworkTask | None = None
        self.generalist: NetworkTask | None = None
        self.learned: LearnedHierarchyTask | None = None
        self.finetuned: RouterTask | None = None  # router_trunk=finetune: the vanilla network finetuned with the router
        self.specialists: list[SpecialistTask] = []
        self.router: RouterTask | JointTask | None = None
        self.delta_all: SpecialistTask | None = None
        self.controls: dict[str, list[NetworkTask]] = {}  # vanilla_scaled, ensemble, vanilla_long, vanilla_flops
        self.spec_images = 0  # planned training images of the specialists (or the joint task's experts)
        self.handed_out: list[Stage] = []

    # ------------------------------------------------------------------ what the stages built
    @property
    def hierarchy(self) -> Hierarchy:
        return self.manifest.hierarchy

    @property
    def resident_dir(self) -> str:
        """The network every specialist's delta is taken against (and the bundle's base)."""
        return (self.finetuned or self.generalist or self.vanilla).out_dir

    @property
    def teacher_dir(self) -> str:
        """Where specialists take head rows and distillation from: the vanilla network, or the
        finetuned one whose head was trained with the trunk the specialists run on."""
        return (self.finetuned or self.vanilla).out_dir

    def folders(self) -> dict[str, str]:
        """Every task that trains, of the stages handed out so far: name → folder (the learned
        hierarchy's folder is the manifest's)."""
        return {t.name: t.out_dir for stage in self.handed_out if not stage.in_driver for t in stage.tasks}

    # ------------------------------------------------------------------ the stages
    def stages(self) -> Iterator[Stage]:
        """Every stage before evaluation, in order."""
        yield from self.base_stages()
        yield self._hand_out(self._specialists_and_controls())

    def base_stages(self) -> Iterator[Stage]:
        """The stages before the specialists: the networks they start from."""
        cfg = self.cfg
        learned = cfg.data.hierarchy_spec.learned
        own = cfg.generalist.has_own_network
        yield self._hand_out(self._base_networks(own and not learned))
        if learned:
            yield self._hand_out(self._learned_hierarchy())
            self.data, self.manifest = self.upstream.learned_data(self.learned)
            if own:
                self.generalist = network_task("generalist", "coarse", cfg, self.data, self.root)
                yield self._hand_out(Stage(LEARNED_GENERALIST, [self.generalist]))
        if cfg.generalist.router_trunk_mode == "finetune":
            self.finetuned = self.router = self._router("finetune")
            yield self._hand_out(Stage(FINETUNED, [self.finetuned]))

    def flops_matched(self, flops_ratio: float) -> Stage | None:
        """The controls sized by the served model's inference FLOPs an image (``flops_ratio``
        networks), known only after evaluation; None when there are none. Its tasks are those not
        trained already (the ensemble's first member is the vanilla network)."""
        cfg, new = self.cfg, []
        if cfg.baselines.ensemble == "auto":
            members = ensemble_size(flops_ratio)
            self.log(f"ensemble: the served two-stage model costs {flops_ratio:.3f} networks of FLOPs an image: "
                     f"{members} member(s)")
            self.controls["ensemble"] = ensemble_members(cfg, self.first_data, self.root, members)
            new += [t for t in self.controls["ensemble"] if t.out_dir != self.vanilla.out_dir]
        if cfg.baselines.scaled_flops:
            bigger = flops_matched_model(cfg.model, self.hierarchy.num_subclasses, cfg.data.image_size, flops_ratio)
            if bigger is None:
                self.log(f"vanilla_flops: no wider or deeper network fits in {flops_ratio:.3f} networks of FLOPs: "
                         "the vanilla network is the FLOPs-matched control")
            else:
                self.log(f"vanilla_flops: width {bigger.width}, depths {bigger.depths} fit in {flops_ratio:.3f} "
                         "networks of FLOPs")
                self.controls["vanilla_flops"] = [network_task("vanilla_flops", "fine", cfg, self.first_data,
                                                               self.root, model=bigger)]
                new += self.controls["vanilla_flops"]
        if cfg.baselines.ensemble != "auto" and "vanilla_flops" not in self.controls:
            return None
        return self._hand_out(Stage(FLOPS_MATCHED, new))

    # ------------------------------------------------------------------ each stage
    def _hand_out(self, stage: Stage) -> Stage:
        self.handed_out.append(stage)
        return stage

    def _base_networks(self, with_generalist: bool) -> Stage:
        cfg, data, root = self.cfg, self.first_data, self.root
        self.vanilla = network_task("vanilla", "fine", cfg, data, root)
        if cfg.baselines.scaled:
            scaled = dataclasses.replace(cfg.model, width=cfg.baselines.scaled_width, depths=cfg.baselines.scaled_depths)
            self.controls["vanilla_scaled"] = [network_task("vanilla_scaled", "fine", cfg, data, root, model=scaled)]
        if cfg.baselines.ensemble not in ("off", "auto"):
            self.controls["ensemble"] = ensemble_members(cfg, data, root, int(cfg.baselines.ensemble))
        if with_generalist:
            self.generalist = network_task("generalist", "coarse", cfg, data, root)
        beside = [t for ts in self.controls.values() for t in ts if t.out_dir != self.vanilla.out_dir]
        return Stage(BASE, [self.vanilla, *beside, *([self.generalist] if self.generalist else [])])

    def _learned_hierarchy(self) -> Stage:
        cfg = self.cfg
        self.learned = LearnedHierarchyTask.under(
            self.root, k=cfg.data.hierarchy_spec.learned_k, vanilla_dir=self.vanilla.out_dir, data=self.first_data,
            seed=cfg.seed, min_size=cfg.data.learned_min_size,
            inputs={"vanilla": self.upstream.network_hash(self.vanilla.out_dir)})
        return Stage(LEARNED, [self.learned], in_driver=True)

    def _router(self, trunk: str) -> RouterTask:
        """The trunk router's superclass head on the vanilla network's trunk (``trunk``: frozen, or
        the whole network finetuned with it)."""
        g = self.cfg.generalist
        return RouterTask.under(
            self.root, resident_dir=self.vanilla.out_dir, first_stage=self.cfg.delta.first_stage, width=g.router_width,
            optim=g.router_optim, data=self.data, seed=self.cfg.seed,
            inputs={"resident": self.upstream.network_hash(self.vanilla.out_dir)}, distill=g.router_distill,
            runner=self.cfg.resources.runner, trunk=trunk)

    def _joint(self, expert_images: int) -> JointTask:
        """Trunk, router and every expert trained together on the separate specialists' budget."""
        cfg = self.cfg
        return JointTask.under(
            self.root, resident_dir=self.vanilla.out_dir, first_stage=cfg.delta.first_stage,
            router_width=cfg.generalist.router_width, trunk_lr=cfg.generalist.router_optim.lr, delta=cfg.delta,
            optim=cfg.specialist.optim, negatives=cfg.specialist.negatives, train_images=expert_images, data=self.data,
            seed=cfg.seed, inputs={"resident": self.upstream.network_hash(self.vanilla.out_dir)},
            runner=cfg.resources.runner)

    def _specialists_and_controls(self) -> Stage:
        """The specialists (or the joint task, whose experts replace them on their budget), a
        frozen trunk's router beside them, and the controls sized by their training images."""
        cfg, root, g = self.cfg, self.root, self.cfg.generalist
        self.specialists = specialist_tasks(cfg, self, root)
        self.spec_images = sum(planned_images(t, self.manifest) for t in self.specialists)
        tasks: list[Task] = list(self.specialists)
        if g.router_trunk_mode == "joint":
            self.router = self._joint(self.spec_images)
            self.specialists, self.spec_images, tasks = [], self.router.expert_passes, [self.router]
        elif g.router_trunk_mode == "frozen":  # a head's worth: trained beside them
            self.router = self._router("frozen")
            tasks.append(self.router)
        if cfg.baselines.delta_all:
            self.delta_all = specialist_task(cfg, None, self.data, root, self.vanilla.out_dir, self.vanilla.out_dir,
                                             train_images=self.spec_images, hash_of=self.upstream.network_hash)
            tasks.append(self.delta_all)
        if cfg.baselines.vanilla_long:
            # As many images as trained the served networks' weights: the vanilla network's, a
            # finetuned trunk's, the specialists'. A frozen trunk's router head (1-2 % of a
            # network's weights) is left out, which favours Super-Sub.
            images = self.upstream.train_images
            trained = images(self.vanilla) + (images(self.finetuned) if self.finetuned else 0) + self.spec_images
            self.controls["vanilla_long"] = [network_task("vanilla_long", "fine", cfg, self.first_data, root,
                                                          train_images=trained)]
            tasks += self.controls["vanilla_long"]
        return Stage(SPECIALISTS, tasks)
