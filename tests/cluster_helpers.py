"""A real two-node Ray cluster on one host, for tests/test_cluster.py: the README's "On a cluster"
commands, run as written (ports and folders substituted, private ports and temp dirs added).

* The head node: the README's ``ray start --head`` (dashboard and job server on loopback), with
  a private temp dir, ``HOME`` and every port of its own (other Rays on this host hold the
  defaults, and a job agent that cannot bind its port leaves the job server without an agent).
* The worker node: the README's ``ray start --address=...`` inside its own mount namespace
  (``unshare -m --propagation private``) with tmpfs over ``/tmp``, ``$HOME`` and ``/dev/shm`` —
  it sees none of the head's files — and one shared folder (the NFS stand-in) bound back in at
  the same path. The repository and its virtualenv stay visible, as an installed image would be.
  Same network namespace: the nodes talk over 127.0.0.x.
* The README's MLflow server (SQLite store beside the test, artifacts on the shared folder).

Everything is stopped by process group and by pid, with deadlines — never ``ray stop``, which
stops every Ray on the host — and :meth:`Cluster.leftovers` says what is still running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ray_helpers import ENV, REPO, free_port, pids_using

BIN = Path(sys.executable).parent  # the virtualenv's bin (the README's .venv/bin)
WORKER_IP = "127.0.0.2"
WORKER_TEMP = "/tmp/ray"  # inside the worker's own /tmp (a tmpfs)

# What the README's cluster section writes, and what the test puts in its place.
README_GCS_PORT, README_DASHBOARD_PORT, README_MLFLOW_PORT = 6379, 8265, 5000
README_SHARED, README_MLFLOW_DIR = "/shared", "/srv/mlflow"
ROLES = {  # a README command's role: a pattern only that command matches
    "head": r"\bray start --head\b",
    "worker": r"\bray start --address=",
    "mlflow": r"\bmlflow server\b",
    "submit": r"\bray job submit\b",
    "serve": r"-m serve\b",
}


# ----------------------------------------------------------------------------- can this host do it
def why_no_namespaces() -> str | None:
    """None when this process may make a mount namespace with its own tmpfs, else why not."""
    if os.geteuid() != 0:
        return "a second node in its own mount namespace needs root (unshare -m, mount -t tmpfs)"
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               "mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare -m failed: {e}"
    if proc.returncode != 0:
        return f"unshare -m / mount -t tmpfs not permitted here: {proc.stderr.strip() or proc.returncode}"
    return None


# ----------------------------------------------------------------------------- the README's commands
ACTIVATE = re.compile(r"^(source|\.) \.venv/bin/activate$")


def readme_cluster_commands(readme: Path = REPO / "README.md") -> dict[str, str]:
    """The commands of the README's "On a cluster" section by role (continuation lines joined,
    comments cut). Every command is one the test runs: the virtualenv's activation (which every
    other command runs under) and one command of each role."""
    text = readme.read_text()
    m = re.search(r"^## On a cluster\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## On a cluster' section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", m.group(1), re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                commands.append(re.sub(r"\s+", " ", cmd))
    assert commands and ACTIVATE.match(commands[0]), \
        f"README 'On a cluster' starts with {commands[:1]}, not with `source .venv/bin/activate`"
    unknown = [c for c in commands[1:] if not any(re.search(p, c) for p in ROLES.values())]
    assert not unknown, f"README 'On a cluster' has commands the cluster test does not run: {unknown}"
    out = {}
    for role, pattern in ROLES.items():
        found = [c for c in commands if re.search(pattern, c)]
        assert len(found) == 1, f"README 'On a cluster': {len(found)} commands match {pattern!r} (want 1): {found}"
        out[role] = found[0]
    return out


def argv_of(command: str, subst: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """A README command as (environment assignments, argv), every ``subst`` key (a port or folder
    the README writes) replaced. It runs under the activated virtualenv (:func:`activated`)."""
    for old, new in subst.items():
        # a port as a whole number; a folder at the start of a path (also sqlite:////srv/...)
        before = r"(?<![\w.])" if old.startswith("/") else r"(?<![\w/.])"
        command = re.sub(rf"{before}{re.escape(old)}(?![\w.])", new, command)
    for old in subst:
        # nothing of the README's own folders and ports may be left: this runs on a shared host
        assert not re.search(rf"(?<![\w.]){re.escape(old)}(?![\w.])", command), (old, command)
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def activated(env: dict[str, str]) -> dict[str, str]:
    """``env`` as `source .venv/bin/activate` leaves it: this virtualenv's bin first on PATH."""
    path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and Path(p) != BIN]
    return {**env, "VIRTUAL_ENV": str(BIN.parent), "PATH": os.pathsep.join([str(BIN), *path])}


# ----------------------------------------------------------------------------- processes
def mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that still runs (a zombie only waits for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def pids_in_namespace(ns: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and mount_ns(int(p.name)) == ns and running(int(p.name))]


def pids_in_group(pgid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getpgid(int(p.name)) == pgid and running(int(p.name)):
                    out.append(int(p.name))
            except OSError:
                continue
    return out


def kill_all(find, timeout: float, children: tuple[subprocess.Popen, ...] = ()) -> list[int]:
    """SIGTERM to every pid ``find()`` returns, then SIGKILL to those left after ``timeout``;
    returns the pids still running at the end. ``children`` (this process's) are reaped."""
    def left() -> list[int]:
        for child in children:
            child.poll()
        return [pid for pid in find() if running(pid)]

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        for pid in left():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not left():
            return []
    return left()


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {cmdline[:150]}")
    return out


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log; of a raylet's, only its timestamped lines (not the
    many-line state dumps)."""
    try:
        text = path.read_text(errors="replace").splitlines()
        if path.name.startswith("raylet"):
            text = [x for x in text if x.startswith("[20") and "[state-dump]" not in x]
        return "\n".join(text[-lines:])
    except OSError as e:
        return f"({path}: {e})"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, check, timeout: float, interval: float = 0.5, diagnostics=lambda: ""):
    """Polls ``check()`` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError:
            raise  # the check knows it never will be
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})\n{diagnostics()}")


# ----------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    root: Path  # this cluster's private folder (the head's temp dir, HOME, the MLflow store)
    shared: Path  # the only folder both nodes see (the NFS stand-in), at the same path
    commands: dict[str, str]  # the README's, by role
    subst: dict[str, str]  # README value -> this cluster's
    env: dict[str, str]  # the environment of a client on this host (a user's shell)
    gcs: str  # head address, 127.0.0.1:PORT
    dashboard: str  # http://127.0.0.1:PORT (job server, State API)
    mlflow: str  # http://127.0.0.1:PORT
    head_temp: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    worker_ns: str | None = None
    head_node_id: str | None = None
    stop_seconds: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)

    # ---------------------------------------------------------------- what clients run
    def readme(self, role: str, *extra: str, env: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
        """The README's ``role`` command here: (full environment, argv + ``extra``)."""
        assigned, argv = argv_of(self.commands[role], self.subst)
        return {**self.env, **assigned, **(env or {})}, [*argv, *extra]

    # ---------------------------------------------------------------- what runs where
    def state(self, kind: str, **filters: str) -> list[dict]:
        """Ray's State API (``/api/v0/<kind>``) through the head's dashboard."""
        query = "&".join(f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        status, body = http_get(f"{self.dashboard}/api/v0/{kind}?limit=1000&{query}", timeout=30)
        assert status == 200, f"State API {kind}: HTTP {status} {body[:300]!r}"
        return json.loads(body)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n.get("state") == "ALIVE"]

    def node_ids(self) -> dict[str, str]:
        """``{"head": id, "worker": id}`` of the alive nodes (the worker is the one at 127.0.0.2)."""
        nodes = self.alive_nodes()
        worker = [n["node_id"] for n in nodes if n["node_ip"] == WORKER_IP]
        head = [n["node_id"] for n in nodes if n.get("is_head_node")]
        assert len(worker) == 1 and len(head) == 1, f"want one head and one worker node alive, got {nodes}"
        return {"head": head[0], "worker": worker[0]}

    # ---------------------------------------------------------------- logs for failure messages
    def worker_path(self, path: str) -> Path:
        """A path as the worker node sees it (through its process's root: its /tmp is its own)."""
        proc = self.procs.get("worker")
        return Path(f"/proc/{proc.pid if proc else 0}/root{path}")

    def worker_session(self) -> Path:
        """The worker node's Ray session folder, seen from here (``session_latest`` is a link to
        an absolute path, which would resolve in this namespace)."""
        sessions = sorted(self.worker_path(WORKER_TEMP).glob("session_2*"))
        return sessions[-1] if sessions else self.worker_path(f"{WORKER_TEMP}/session_latest")

    def logs(self, lines: int = 30) -> str:
        """The tails of the logs that say why something did not run."""
        out = []
        for name in ("head", "worker", "mlflow"):
            log = self.root / f"{name}.log"
            out.append(f"--- {name} ({log}):\n{tail(log, lines)}")
        for node, logs in (("head", self.head_temp / "session_latest" / "logs"),
                           ("worker", self.worker_session() / "logs")):
            for name in ("raylet.out", "raylet.err"):
                out.append(f"--- {node} node {name}:\n{tail(logs / name, lines)}")
        return "\n".join(out)

    def job_logs(self, lines: int = 60) -> str:
        logs = self.head_temp / "session_latest" / "logs"
        return "\n".join(f"--- {p.name}:\n{tail(p, lines)}" for p in sorted(logs.glob("job-driver-*.log")))

    # ---------------------------------------------------------------- the end
    def leftovers(self) -> list[str]:
        """Processes of this cluster still running, and its folders still on disk."""
        left = set(pids_using(str(self.root)))
        if self.worker_ns:
            left |= set(pids_in_namespace(self.worker_ns))
        for proc in self.procs.values():
            left |= set(pids_in_group(proc.pid))
        out = describe(sorted(left))
        for folder in (self.root, *([Path("/tmp/haproxy-serve") / self.head_node_id] if self.head_node_id else [])):
            if folder.exists():
                out.append(f"folder {folder}")
        return out


def _drain(stream, sink: Path) -> threading.Thread:
    def copy() -> None:
        with open(sink, "ab") as f:
            for line in iter(stream.readline, b""):
                f.write(line)
                f.flush()

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    return t


def _popen(argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A process in its own session (so its whole group can be signalled), output to ``log``."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _drain(proc.stdout, log)
    return proc


# The worker node's world: tmpfs over every private folder, then the folders it keeps (the
# shared one; the Python installation when it lies under $HOME) bound back in at the same paths
# through file descriptors opened before they were covered, then `ray start`.
NAMESPACE_INIT = """set -e
i=3; for k in $SS_KEEP; do eval "exec $i< \\"\\$k\\""; i=$((i+1)); done
for d in $SS_HIDE; do mount -t tmpfs -o mode=1777 tmpfs "$d"; done
i=3; for k in $SS_KEEP; do
  mkdir -p "$k"; mount --no-canonicalize --bind "/proc/self/fd/$i" "$k"; eval "exec $i<&-"; i=$((i+1))
done
exec "$@"
"""


def _own_ports() -> list[str]:
    # Every port of its own: the defaults may be held by another Ray on this host.
    return [f"--{name}-port={free_port()}" for name in
            ("dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export", "ray-client-server")]


@contextlib.contextmanager
def two_node_cluster(start_timeout: float = 180.0) -> Iterator[Cluster]:
    """Head, worker node in its own mount namespace, MLflow server — the README's commands —
    and everything stopped at the end, whatever happened. The caller skips first when
    :func:`why_no_namespaces` says why it cannot work."""
    commands = readme_cluster_commands()
    # A short root under /tmp: Ray's socket paths must stay under ~107 characters, and /tmp is
    # what the worker node's tmpfs covers, so it sees none of this but the shared folder.
    root = Path(tempfile.mkdtemp(prefix="sscl-", dir="/tmp"))
    shared, head_temp, home = root / "shared", root / "head", root / "home"
    for d in (shared, head_temp, home, root / "mlflow"):
        d.mkdir()
    ports = {"gcs": free_port(), "dashboard": free_port(), "mlflow": free_port()}
    subst = {str(README_GCS_PORT): str(ports["gcs"]), str(README_DASHBOARD_PORT): str(ports["dashboard"]),
             str(README_MLFLOW_PORT): str(ports["mlflow"]), README_SHARED: str(shared),
             README_MLFLOW_DIR: str(root / "mlflow")}
    # A user's shell: the tests' Ray settings, HOME and Ray's temp dir of this cluster's own (a
    # job's default MLflow store and Ray's "last cluster" file stay in here), no cluster address.
    env = activated({**os.environ, **ENV, "HOME": str(home), "RAY_TMPDIR": str(head_temp)})
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    cluster = Cluster(root, shared, commands, subst, env, f"127.0.0.1:{ports['gcs']}",
                      f"http://127.0.0.1:{ports['dashboard']}", f"http://127.0.0.1:{ports['mlflow']}", head_temp)
    try:
        # MLflow first: it starts while the head does.
        m_env, m_argv = cluster.readme("mlflow")
        cluster.procs["mlflow"] = _popen(m_argv, m_env, root / "mlflow.log")
        h_env, h_argv = cluster.readme("head", f"--temp-dir={head_temp}", "--disable-usage-stats", *_own_ports())
        head = cluster.procs["head"] = _popen(h_argv, h_env, root / "head.log")
        try:
            rc = head.wait(timeout=start_timeout)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, f"ray start --head: exit {rc}\n{cluster.logs()}"
        cluster.head_node_id = wait_for("the head node", lambda: [n["node_id"] for n in cluster.alive_nodes()],
                                        60, diagnostics=cluster.logs)[0]

        w_env, w_argv = cluster.readme("worker", f"--temp-dir={WORKER_TEMP}", "--disable-usage-stats",
                                       *_own_ports()[:4])
        # This host's own HOME (not the head's private one, which is under /tmp) gets a tmpfs too.
        home_dir = os.path.realpath(os.path.expanduser("~"))
        hide = ["/tmp", "/dev/shm", *([home_dir] if not home_dir.startswith(("/tmp/", "/dev/shm/")) else [])]
        # The checkout, the virtualenv and its Python stay where they are, hidden or not (a clone under /tmp).
        keep = [str(shared), *sorted(p for p in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
                                                 str(REPO)} if any(p.startswith(d + "/") for d in hide))]
        assert not any(" " in p for p in hide + keep), (hide, keep)
        w_env = {**w_env, "SS_KEEP": " ".join(keep), "SS_HIDE": " ".join(hide), "RAY_TMPDIR": WORKER_TEMP,
                 "HOME": home_dir if len(hide) == 3 else "/tmp"}
        worker = cluster.procs["worker"] = _popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE_INIT, "node", *w_argv],
            w_env, root / "worker.log")
        own = mount_ns(os.getpid())

        def still_up() -> None:
            if worker.poll() is not None:
                time.sleep(0.5)  # its last lines reach the log
                raise AssertionError(f"the worker node exited {worker.returncode}\n{cluster.logs()}")

        def namespace() -> str | None:
            still_up()
            ns = mount_ns(worker.pid)
            return ns if ns != own else None

        cluster.worker_ns = wait_for("the worker's mount namespace", namespace, 10, 0.05)

        def joined() -> bool:
            still_up()
            return len(cluster.alive_nodes()) == 2

        wait_for("the worker node (127.0.0.2) alive in the cluster", joined, start_timeout, 1.0, cluster.logs)
        # The worker sees the shared folder and none of the head's files.
        probe = shared / ".probe"
        probe.write_text("shared")
        assert cluster.worker_path(str(probe)).read_text() == "shared", "the worker node does not see the shared folder"
        assert not cluster.worker_path(str(head_temp)).exists(), "the worker node sees the head's temp dir"
        probe.unlink()

        wait_for("the MLflow server's /health", lambda: http_get(f"{cluster.mlflow}/health")[0] == 200,
                 start_timeout, 0.5, cluster.logs)
        # The job server: its agent comes up some seconds after the dashboard.
        wait_for("the job server", lambda: http_get(f"{cluster.dashboard}/api/jobs/")[0] == 200, 120, 1.0, cluster.logs)
        yield cluster
    finally:
        stop(cluster)


def stop(cluster: Cluster, timeout: float = 5.0) -> None:
    """Worker node, head node (every process that holds its temp dir, the jobs' included) and the
    MLflow server stopped by pid and process group — SIGTERM, and SIGKILL after ``timeout`` (the
    GCS and the autoscaler monitor take ~15 s to end on SIGTERM; nothing of theirs is kept) —
    then the private folder removed."""
    t0 = time.monotonic()
    worker = cluster.procs.get("worker")
    if worker is not None:
        # `ray start --block` stops its node's processes on SIGTERM; what is left in the namespace is killed.
        kill_all(lambda: pids_in_group(worker.pid) + (pids_in_namespace(cluster.worker_ns) if cluster.worker_ns else []),
                 timeout, (worker,))
    cluster.stop_seconds["worker"] = time.monotonic() - t0
    head = cluster.procs.get("head")
    # (every process with this cluster's folders in its command line, environment or open files:
    # the head's, its jobs', and a `python -m serve` left running)
    kill_all(lambda: sorted(set(pids_using(str(cluster.root))
                                + (pids_in_group(head.pid) if head is not None else []))), timeout)
    cluster.stop_seconds["head"] = time.monotonic() - t0 - cluster.stop_seconds["worker"]
    mlflow = cluster.procs.get("mlflow")
    if mlflow is not None:
        kill_all(lambda: pids_in_group(mlflow.pid), timeout, (mlflow,))
    for proc in cluster.procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    # Serve's HAProxy keeps its config under /tmp/haproxy-serve/<node id> (the worker's is in its tmpfs).
    if cluster.head_node_id:
        shutil.rmtree(Path("/tmp/haproxy-serve") / cluster.head_node_id, ignore_errors=True)
    shutil.rmtree(cluster.root, ignore_errors=True)
