"""Which nodes of the cluster see a folder: a probe per alive node, pinned to it.

Nodes of a real cluster share no local disk unless a folder is mounted on each (NFS, a
parallel file system). A folder that only the driver's node sees works for nothing that another
node must read, and nothing says so until a task there fails. So before the work starts the
driver writes a token file into the folder and asks one zero-CPU Ray task on every alive node to
read it back: a node that finds no file, or other bytes (its own local folder of that name),
does not see the driver's folder. Remote URIs (``s3://``, ``gs://``) are every node's by
construction and are not probed.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from supersub.remote import is_remote

PROBE_TIMEOUT_S = 120  # a node's first task starts a worker process: seconds on a busy machine


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def node_label(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def blind_nodes(folders: list[str], nodes: list[dict] | None = None) -> dict[str, list[dict]]:
    """For each local folder of ``folders`` (made if missing): the alive nodes that do not see
    it as this process does. Remote URIs are skipped."""
    nodes = alive_nodes() if nodes is None else nodes
    local = [f for f in dict.fromkeys(folders) if f and not is_remote(f)]
    tokens: dict[str, tuple[Path, bytes]] = {}
    for folder in local:
        where = Path(re.sub(r"^file:(//)?", "", folder))
        where.mkdir(parents=True, exist_ok=True)
        token = secrets.token_bytes(16)
        path = where / f".supersub-visible-{token.hex()[:12]}"
        path.write_bytes(token)
        tokens[folder] = (path, token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read)
        seen = {}
        for node in nodes:
            pinned = read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            seen[node["NodeID"]] = {f: pinned.remote(str(p)) for f, (p, _) in tokens.items()}
        answers = {nid: dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
                   for nid, refs in seen.items()}
    finally:
        for path, _ in tokens.values():
            path.unlink(missing_ok=True)
    return {f: [n for n in nodes if answers[n["NodeID"]][f] != token] for f, (_, token) in tokens.items()}

