"""The units of work: training a network, finetuning a delta, training a router (alone or jointly
with the experts), learning a hierarchy.

See :mod:`supersub.tasks.base` for what every task has (identity, fingerprint, folder, round
trip); :mod:`supersub.runner` runs lists of them.
"""

from supersub.tasks.base import (
    TASK_KINDS,
    DataOptions,
    Task,
    TaskContext,
    digest,
    folder_for,
    task_from_dict,
)
from supersub.tasks.hierarchy import LearnedHierarchyTask, class_similarity, relabel_manifest
from supersub.tasks.joint import JointTask, expert_dir
from supersub.tasks.network import NetworkTask
from supersub.tasks.router import RouterTask, load_router
from supersub.tasks.specialist import SpecialistTask, load_packed

__all__ = [
    "TASK_KINDS",
    "DataOptions",
    "JointTask",
    "LearnedHierarchyTask",
    "NetworkTask",
    "RouterTask",
    "SpecialistTask",
    "Task",
    "TaskContext",
    "class_similarity",
    "digest",
    "expert_dir",
    "folder_for",
    "load_packed",
    "load_router",
    "relabel_manifest",
    "task_from_dict",
]
