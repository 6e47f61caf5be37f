"""The real thing: two Ray nodes that share no disk but one folder, a local MLflow server, the
pipeline through ``ray job submit`` and ``python -m serve`` joined to the cluster — run with the
README's "On a cluster" commands (tests/cluster_helpers.py).

The worker node runs in its own mount namespace (root and ``unshare -m``; the module is skipped
with the reason where that is not permitted): a task or replica there sees the shared folder,
the checkout and its virtualenv, and nothing else of the head's files — the head's temp dir,
``$HOME``, ``/tmp`` and ``/dev/shm`` are its own. One CPU a node and one CPU a task, so that the
two specialists can only run at the same time on both nodes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cluster_helpers import (
    Cluster,
    free_port,
    http_get,
    pids_in_group,
    pids_in_namespace,
    running,
    tail,
    two_node_cluster,
    wait_for,
    why_no_namespaces,
)
from ray_helpers import REPO, TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow, pytest.mark.serve]

# The README's job on tiny settings (tests/ray_helpers.py): 2 superclasses, so 2 specialists, of 2
# epochs; 1 CPU a task on nodes of 1 CPU, so the two specialists need both nodes; no controls.
JOB_OVERRIDES = [*TINY, "resources.cpus_per_worker=1", "resources.specialist_cpus=1", "baselines.vanilla_long=false",
                 "baselines.delta_all=false", "report=false", "evaluation.bootstrap=50"]
EPOCHS = {"network": 2, "specialist": 2}  # train.epochs, specialist.optim.epochs in TINY
OUT = "runs/cluster"  # under the shared folder, as in the README
DRAIN_GRACE_S = 1.0  # python -m serve's --drain-grace-s default


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    why = why_no_namespaces()
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    with two_node_cluster() as c:
        print(f"\ncluster: up in {time.monotonic() - t0:.0f} s: head {c.gcs}, dashboard {c.dashboard}, "
              f"MLflow {c.mlflow}, shared {c.shared}", flush=True)
        yield c
        t1 = time.monotonic()
    left = c.leftovers()
    print(f"cluster: stopped in {time.monotonic() - t1:.0f} s ({c.stop_seconds}); whole module "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    assert not left, f"left behind after the cluster was stopped: {left}"


@pytest.fixture(scope="module")
def job(cluster: Cluster) -> dict:
    """The README's ``ray job submit`` of the pipeline, tiny overrides appended."""
    env, argv = cluster.readme("submit", *JOB_OVERRIDES)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        raise AssertionError(f"ray job submit: no answer in 420 s\n{output[-4000:]}\n{cluster.job_logs()}\n"
                             f"{cluster.logs()}") from None
    seconds = time.monotonic() - t0
    print(f"job: {seconds:.0f} s, exit {proc.returncode}", flush=True)
    out = cluster.shared / OUT
    return {"proc": proc, "output": output, "out": out, "seconds": seconds, "nodes": cluster.node_ids(),
            "metrics": json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None}


def _job_failure(cluster: Cluster, job: dict) -> str:
    return f"{job['output'][-5000:]}\n{cluster.job_logs()}\n{cluster.logs(20)}"


# ------------------------------------------------------------------------------ the job
def test_job_succeeds_with_every_tasks_outputs(cluster: Cluster, job: dict) -> None:
    assert job["proc"].returncode == 0, f"ray job submit exited {job['proc'].returncode}\n{_job_failure(cluster, job)}"
    assert re.search(r"Job '\S+' succeeded", job["output"]), _job_failure(cluster, job)
    joined = re.search(r"ray: joined \S+: (\d+) node\(s\), ([\d.]+) CPU", job["output"])
    assert joined and joined.groups() == ("2", "2"), f"the job did not see the two nodes: {joined and joined.group(0)}"
    out, metrics = job["out"], job["metrics"]
    for name in ("metrics.json", "bundle/manifest.json", "config.yaml", "predictions.parquet"):
        assert (out / name).is_file(), f"{out}/{name} is missing"
    assert {"vanilla", "specialist_0", "specialist_1"} <= set(metrics["tasks"]), metrics["tasks"]
    for name, folder in metrics["tasks"].items():
        folder = Path(folder)
        assert folder.parent == out / "tasks", f"{name}: its folder {folder} is not under {out}/tasks"
        files = {p.name for p in folder.iterdir()}
        weights = "delta.safetensors" if name.startswith("specialist_") else "model.safetensors"
        assert {"metrics.json", weights} <= files, f"{name}: {folder} holds {sorted(files)}, not metrics.json and {weights}"
    # Ray Train's checkpoints went to the shared storage_path, from both nodes' tasks
    assert sorted(p.name.split("-")[0] for p in (cluster.shared / "ray").iterdir() if p.is_dir()) == sorted(metrics["tasks"])


def test_the_specialists_ran_on_both_nodes(cluster: Cluster, job: dict) -> None:
    assert job["metrics"], f"the job wrote no metrics.json\n{_job_failure(cluster, job)}"
    placed = {}
    for name, folder in job["metrics"]["tasks"].items():
        placed[name] = json.loads((Path(folder) / "metrics.json").read_text()).get("node_id")
    nodes = {v: k for k, v in job["nodes"].items()}
    where = {name: nodes.get(node, f"unknown node {node}") for name, node in placed.items()}
    specialists = {where[name] for name in where if name.startswith("specialist_")}
    assert specialists == {"head", "worker"}, f"the specialists ran on {where} (nodes {job['nodes']})"


def test_mlflow_has_every_tasks_run_and_curve(cluster: Cluster, job: dict) -> None:
    from mlflow.tracking import MlflowClient

    assert job["metrics"], f"the job wrote no metrics.json\n{_job_failure(cluster, job)}"
    logged = re.search(r"mlflow: run (\w+) in (\S+)", job["output"])
    assert logged, f"the job says nothing of its MLflow run\n{job['output'][-3000:]}"
    assert logged.group(2) == cluster.mlflow, (
        f"the job logged to {logged.group(2)}, not to the MLflow server {cluster.mlflow} that the README's "
        "`ray job submit` names: the tracking URI did not reach the job")
    client = MlflowClient(cluster.mlflow)
    parent = client.get_run(logged.group(1))
    runs = client.search_runs([parent.info.experiment_id], max_results=1000)
    running = [(r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"]
    nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    tasks = job["metrics"]["tasks"]
    placed = {name: json.loads((Path(f) / "metrics.json").read_text()).get("node_id") for name, f in tasks.items()}
    nodes = {v: k for k, v in job["nodes"].items()}
    problems = []
    if parent.info.status != "FINISHED":
        problems.append(f"the job's run {parent.info.run_name} is {parent.info.status}")
    if running:
        problems.append(f"runs left RUNNING: {running}")
    for name in tasks:
        node = nodes.get(placed[name], placed[name])
        run = nested.get(name)
        if run is None:
            problems.append(f"{name} (ran on the {node} node): no nested run")
            continue
        if run.info.status != "FINISHED":
            problems.append(f"{name} (ran on the {node} node): run is {run.info.status}")
        epochs = EPOCHS["specialist" if name.startswith("specialist_") else "network"]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
        if steps != list(range(1, epochs + 1)):
            problems.append(f"{name} (ran on the {node} node): val_acc logged at steps {steps}, "
                            f"not once an epoch 1..{epochs}")
    assert not problems, "MLflow: " + "; ".join(problems) + f" (runs: {sorted(nested)})"


# ------------------------------------------------------------------------------ serving
@pytest.fixture(scope="module")
def served(cluster: Cluster, job: dict):
    """The README's ``python -m serve``, joined to the cluster; stopped by the drain test (or here)."""
    bundle = job["out"] / "bundle"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("the job made no bundle")
    port = free_port()
    env, argv = cluster.readme("serve", "--port", str(port), env={
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
    log = cluster.root / "serve.log"
    sink = open(log, "wb")  # noqa: SIM115 - closed below
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"python -m serve exited {proc.returncode}\n{tail(log, 60)}\n{cluster.logs(20)}")
            return "serving " in log.read_text(errors="replace")

        wait_for("python -m serve: 'serving' line", serving, 300, 0.5, lambda: f"{tail(log, 60)}\n{cluster.logs(20)}")
        print(f"serve: up in {time.monotonic() - t0:.0f} s", flush=True)
        yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "log": log, "bundle": bundle}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        sink.close()


def _replicas(cluster: Cluster) -> list[dict]:
    return [a for a in cluster.state("actors", state="ALIVE") if a.get("class_name", "").startswith("ServeReplica:supersub:")]


def test_serve_has_a_replica_on_each_node_answering_as_the_offline_predictor(cluster: Cluster, job: dict,
                                                                            served: dict) -> None:
    import httpx
    import torch
    from serve_helpers import image_bytes

    from serve.app import resolve_routing
    from serve.images import decode, preprocessor
    from supersub.bundle import load_bundle

    nodes = {v: k for k, v in job["nodes"].items()}
    replicas = _replicas(cluster)
    where = sorted(nodes.get(a["node_id"], a["node_id"]) for a in replicas)
    print("replicas:", [(a["class_name"], nodes.get(a["node_id"]), a.get("pid")) for a in replicas], flush=True)
    assert where == ["head", "worker"], f"Serve placed its replicas on {where} (want one on each node)"

    b = load_bundle(served["bundle"])
    routing = resolve_routing(b, None)
    # PNG: a JPEG this much larger than the bundle's 16 px is decoded in draft mode by the app
    images = [image_bytes(10 + i, "PNG") for i in range(6)]
    x = torch.stack([preprocessor(b.image_size)(decode(d, 10**8)) for d in images])
    fine, sup = b.predictor().predict(x, routing)
    C = b.hierarchy.num_subclasses
    with httpx.Client(timeout=30) as c:
        for j, d in enumerate(images):
            r = c.post(f"{served['url']}/predict?top_k={C}", content=d, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["routing"] == str(routing)
            probs = {e["id"]: e["probability"] for e in got["top_k"]}
            want = dict(zip(b.hierarchy.subclass_ids, fine[j].tolist()))
            assert max(abs(probs[k] - want[k]) for k in want) < 1e-5, (j, probs, want)
            assert got["superclass"]["index"] == int(sup[j].argmax())


def _replica_urls(cluster: Cluster, nodes: dict[str, str]) -> dict[str, str]:
    """Each Ingress replica's own HTTP server (HAProxy sends it the requests directly), by node:
    the listening port of the replica's process that answers /healthz."""
    from serve_helpers import listening_sockets

    urls = {}
    for actor in _replicas(cluster):
        if not actor["class_name"].endswith(":Ingress"):
            continue
        for addr, port, _, _ in listening_sockets(int(actor["pid"])):
            host = "127.0.0.1" if addr in ("0.0.0.0", "::") else addr
            if not host.startswith("127."):
                continue
            url = f"http://{host}:{port}"
            try:
                status, body = http_get(f"{url}/healthz", timeout=3)
            except Exception:  # noqa: BLE001 - not an HTTP server (Ray's gRPC ports)
                continue
            if status in (200, 503) and body.startswith(b"{"):
                urls[nodes.get(actor["node_id"], actor["node_id"])] = url
                break
    return urls


def test_sigterm_drains_the_replicas_on_both_nodes(cluster: Cluster, job: dict, served: dict) -> None:
    """SIGTERM to the launcher: within the drain grace every replica — the worker node's too —
    refuses new /predict requests (503), and /healthz is 503 at once; then it exits 0."""
    import httpx
    from serve_helpers import image_bytes

    nodes = {v: k for k, v in job["nodes"].items()}
    # Each replica asked directly, where it has an HTTP port of its own (HAProxy's direct ingress);
    # through the frontend, where not: round robin reaches both replicas.
    direct = _replica_urls(cluster, nodes)
    if set(direct) != {"head", "worker"}:
        print(f"drain: replicas with an HTTP port of their own: {sorted(direct)} (Serve's HAProxy ingress is off "
              "on the cluster?); the others are probed through the frontend only", flush=True)
    targets = {**direct, "frontend": served["url"]}
    image = image_bytes(7, "PNG")
    seen: list[tuple[float, str, str, int | str]] = []  # (seconds after SIGTERM, target, path, status)
    done = threading.Event()

    def probe(target: str, url: str) -> None:
        with httpx.Client(timeout=5) as c:
            while not done.is_set():
                for path in ("/healthz", "/predict"):
                    try:
                        r = c.get(url + path) if path == "/healthz" else \
                            c.post(url + path, content=image, headers={"content-type": "image/png"})
                        code: int | str = r.status_code
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                    seen.append((time.monotonic() - at, target, path, code))
                time.sleep(0.05)

    at = time.monotonic()
    served["proc"].send_signal(signal.SIGTERM)
    pool = [threading.Thread(target=probe, args=item, daemon=True) for item in targets.items()]
    for th in pool:
        th.start()
    try:
        rc = served["proc"].wait(timeout=90)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        done.set()
        for th in pool:
            th.join(timeout=10)
    stopped = time.monotonic() - at
    log = tail(served["log"], 15)

    def summary(target: str, path: str) -> str:
        """A target's answers to ``path`` as runs: status +from..to s (count)."""
        runs: list[list] = []
        for s, tg, p, code in seen:
            if (tg, p) != (target, path):
                continue
            if runs and runs[-1][0] == code:
                runs[-1][2], runs[-1][3] = s, runs[-1][3] + 1
            else:
                runs.append([code, s, s, 1])
        return ", ".join(f"{code} +{a:.1f}..{b:.1f} s ({n})" for code, a, b, n in runs)

    names = {"head": "the head node's replica", "worker": "the worker node's replica", "frontend": "the HTTP frontend"}
    problems = []
    for target in targets:
        name = names[target]
        healthy = [s for s, tg, path, code in seen if tg == target and path == "/healthz" and code == 200 and s > 0.5]
        if healthy:
            problems.append(f"{name}: /healthz still 200 at +{healthy[0]:.1f} s")
        late = [s for s, tg, path, code in seen if tg == target and path == "/predict" and code == 200
                and s > DRAIN_GRACE_S + 0.5]
        if late:
            problems.append(f"{name}: /predict answered 200 {len(late)} time(s) from +{late[0]:.1f} s to "
                            f"+{late[-1]:.1f} s, after the {DRAIN_GRACE_S:g} s grace")
        if not any(tg == target and path == "/predict" and code == 503 for _, tg, path, code in seen):
            problems.append(f"{name}: never answered /predict 503 (draining) before it stopped")
    report = "\n".join(f"  {target} ({url}) {path}: {summary(target, path)}"
                       for target, url in targets.items() for path in ("/healthz", "/predict"))
    assert not problems, ("drain after SIGTERM did not reach every replica: " + "; ".join(problems)
                          + f"\nanswers, seconds after SIGTERM:\n{report}\nlauncher (exit {rc}):\n{log}")
    assert rc == 0, f"python -m serve exited {rc} {stopped:.0f} s after SIGTERM\n{log}"
    print(f"drain: launcher stopped {stopped:.1f} s after SIGTERM\n{report}", flush=True)


# ------------------------------------------------------------------------------ paths a node cannot see
def test_a_storage_path_the_worker_cannot_see_is_refused_naming_the_node(cluster: Cluster, job: dict) -> None:
    """The head's own /tmp as Ray Train's storage: the worker node has a /tmp of its own, so its
    checkpoints would never reach the driver. The job refuses before training, naming the node."""
    private = f"/tmp/supersub-private-{free_port()}"
    env, argv = cluster.readme("submit", *JOB_OVERRIDES, f"resources.storage_path={private}")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the job ran with a storage path the worker cannot see\n{output[-3000:]}"
    line = next((s for s in output.splitlines() if "is not visible on node(s)" in s), None)
    assert line and private in line and "127.0.0.2" in line, output[-3000:]
    assert "== specialists" not in output  # refused before any training


# ------------------------------------------------------------------------------ a node lost mid-job (last: the worker node dies)
KILL_OUT = "runs/cluster-kill"
KILL_EPOCHS = {"network": EPOCHS["network"], "specialist": 6}  # time to kill a specialist mid-run


def test_a_worker_node_killed_mid_specialist_resumes_on_the_head(cluster: Cluster) -> None:
    """SIGKILL to every process of the worker node while a specialist trains there: Train's
    FailureConfig restarts it on the head, the job succeeds with every task's outputs, and MLflow
    (logged by the driver only) holds one FINISHED nested run a task with every epoch's val_acc."""
    from mlflow.tracking import MlflowClient

    nodes = cluster.node_ids()
    out = cluster.shared / KILL_OUT
    env, argv = cluster.readme("submit", *JOB_OVERRIDES, f"specialist.optim.epochs={KILL_EPOCHS['specialist']}",
                               f"resources.storage_path={cluster.shared / 'ray-kill'}")
    assert "--out" in argv, f"the README's submit has no --out: {argv}"
    argv[argv.index("--out") + 1] = str(out)
    log = cluster.root / "job-kill.log"
    sink = open(log, "wb")  # noqa: SIM115 - closed below
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def output() -> str:
            return log.read_text(errors="replace")

        def diagnostics() -> str:
            return f"{output()[-4000:]}\n{cluster.job_logs()}\n{cluster.logs(20)}"

        def specialist_on_worker() -> list[dict]:
            if proc.poll() is not None:
                raise AssertionError(f"ray job submit exited {proc.returncode} before a specialist ran on the "
                                     f"worker node\n{diagnostics()}")
            if "== specialists" not in output():
                return []
            return [a for a in cluster.state("actors", state="ALIVE")
                    if "TrainWorker" in a.get("class_name", "") and a.get("node_id") == nodes["worker"]]

        # A deadline, not a wait: on a loaded machine Ray takes minutes to place the specialists.
        actors = wait_for("a specialist's Train worker alive on the worker node", specialist_on_worker, 240, 0.5,
                          diagnostics)
        # The whole worker node, at once: its `ray start` group and everything in its mount namespace.
        worker = cluster.procs["worker"]
        victims = sorted(set(pids_in_group(worker.pid) + pids_in_namespace(cluster.worker_ns)))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed_at = time.monotonic() - t0
        wait_for("the worker node's processes gone after SIGKILL",
                 lambda: worker.poll() is not None and not [p for p in victims if running(p)], 20, 0.2)
        print(f"kill: {len(victims)} worker-node processes killed {killed_at:.0f} s into the job "
              f"(Train workers there: {[a['actor_id'][:8] for a in actors]})", flush=True)
        try:
            rc = proc.wait(timeout=max(30.0, 600 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not finish {time.monotonic() - t0:.0f} s after it was submitted "
                                 f"({killed_at:.0f} s in, the worker node was killed)\n{diagnostics()}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sink.close()
    text = log.read_text(errors="replace")
    print(f"kill job: {time.monotonic() - t0:.0f} s, exit {rc}", flush=True)
    fail = f"{text[-5000:]}\n{cluster.job_logs()}"
    assert rc == 0, f"ray job submit exited {rc} after the worker node was killed\n{fail}"
    assert re.search(r"Job '\S+' succeeded", text), f"the job did not succeed after the worker node was killed\n{fail}"
    assert (out / "metrics.json").is_file(), f"{out}/metrics.json is missing after the worker node was killed\n{fail}"
    metrics = json.loads((out / "metrics.json").read_text())
    tasks = metrics["tasks"]
    assert {"vanilla", "specialist_0", "specialist_1"} <= set(tasks), f"the job's tasks: {sorted(tasks)}"
    for name in ("bundle/manifest.json", "predictions.parquet"):
        assert (out / name).is_file(), f"{out}/{name} is missing after the worker node was killed"
    placed = {}
    for name, folder in tasks.items():
        folder = Path(folder)
        files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        weights = "delta.safetensors" if name.startswith("specialist_") else "model.safetensors"
        assert {"metrics.json", weights} <= files, f"{name}: {folder} holds {sorted(files)}, not metrics.json and {weights}"
        placed[name] = json.loads((folder / "metrics.json").read_text()).get("node_id")
    where = {name: {v: k for k, v in nodes.items()}.get(node, f"unknown node {node}") for name, node in placed.items()}
    print(f"kill job: tasks finished on {where}", flush=True)

    logged = re.search(r"mlflow: run (\w+) in (\S+)", text)
    assert logged, f"the job says nothing of its MLflow run\n{text[-3000:]}"
    assert logged.group(2) == cluster.mlflow, f"the job logged to {logged.group(2)}, not to {cluster.mlflow}"
    client = MlflowClient(cluster.mlflow)
    parent = client.get_run(logged.group(1))
    runs = client.search_runs([parent.info.experiment_id], max_results=1000)
    mine = [r for r in runs if r.info.run_id == parent.info.run_id
            or r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    problems = []
    if parent.info.status != "FINISHED":
        problems.append(f"the job's run {parent.info.run_name} is {parent.info.status}")
    running_runs = [(r.info.run_name, r.info.status) for r in mine if r.info.status == "RUNNING"]
    if running_runs:
        problems.append(f"runs of this job left RUNNING: {running_runs}")
    nested: dict[str, list] = {}
    for r in mine:
        if r.info.run_id != parent.info.run_id:
            nested.setdefault(r.info.run_name, []).append(r)
    curves: dict[str, list[int]] = {}
    for name in tasks:
        found = nested.get(name, [])
        if len(found) != 1:
            problems.append(f"{name} (finished on the {where[name]} node): {len(found)} nested runs, not 1 "
                            f"({[(r.info.run_id[:8], r.info.status) for r in found]})")
            if not found:
                continue
        run = found[0]
        if run.info.status != "FINISHED":
            problems.append(f"{name} (finished on the {where[name]} node): run is {run.info.status}")
        epochs = KILL_EPOCHS["specialist" if name.startswith("specialist_") else "network"]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
        curves[name] = steps
        missing = sorted(set(range(1, epochs + 1)) - set(steps))
        extra = sorted(set(steps) - set(range(1, epochs + 1)))
        if missing or extra:
            problems.append(f"{name} (finished on the {where[name]} node): val_acc logged at steps {steps}; "
                            f"missing epochs {missing}, steps outside 1..{epochs}: {extra}")
    print(f"kill job: val_acc steps in MLflow {curves}", flush=True)
    assert not problems, "MLflow after the worker node was killed: " + "; ".join(problems) + \
        f" (nested runs: {sorted(nested)})"
