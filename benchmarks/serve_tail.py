"""Latency at concurrency 1, p50 and p99, with ``ab``: the Serve graphs against the uvicorn peer,
in interleaved rounds.

Starts what ``benchmarks/serve_load.py`` starts (Serve with its HAProxy ingress, as ``python -m
serve`` ships it, and the plain uvicorn + FastAPI peer serving the same bundle with the same
predictor), then runs ``ab -k -c 1`` (apache2-utils) against each app in turn, round after round,
the apps' order reversed every other round (A B, B A, ...): a drift in the machine's load hits
every app alike. Each round records the load average (``/proc/loadavg``) before and after. It
prints every round, then the median and the spread (min–max) over rounds of each app's p50 and
p99 and of their ratios to the peer's in the same round::

    .venv/bin/python benchmarks/serve_tail.py --make-tiny-bundle --apps single,stages,peer --rounds 6 --requests 500
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402 - after the path: the apps and the peer, started as serve_load starts them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle folder or MLflow URI")
    src.add_argument("--make-tiny-bundle", action="store_true", help="make a tiny random bundle (as the tests do)")
    p.add_argument("--apps", default="single,stages,peer", help="of single, fused, stages, vanilla, peer")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=500, help="requests per app and round")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests per app, once")
    p.add_argument("--image-px", type=int, default=224, help="side of the JPEG picture sent")
    p.add_argument("--proxy", default="haproxy", choices=("haproxy", "serve"))
    p.add_argument("--json", help="write every round's figures to this file")
    a = p.parse_args(argv)
    a.apps = [x for x in a.apps.split(",") if x]
    if set(a.apps) - set(serve_load.APPS):
        p.error(f"unknown apps {sorted(set(a.apps) - set(serve_load.APPS))}")
    return a


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def ab(url: str, body: Path, n: int) -> dict[str, float]:
    """``ab -k -c 1``: p50, p99 and max (ms), requests/s, failures."""
    out = subprocess.run(["ab", "-q", "-k", "-c", "1", "-n", str(n), "-p", str(body), "-T", "image/jpeg", url],
                         capture_output=True, text=True, timeout=600).stdout
    pct = {int(m[1]): float(m[2]) for m in re.finditer(r"^\s+(\d+)%\s+(\d+)", out, re.M)}
    # ab counts an answer whose length differs from the first one's as failed ("Length"): the
    # answers carry timings, so their lengths vary. Only connection, receive and exception failures count.
    failed = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", out)
    non2xx = re.search(r"^Non-2xx responses:\s+(\d+)", out, re.M)
    rate = re.search(r"^Requests per second:\s+([\d.]+)", out, re.M)
    if not pct or rate is None:
        raise RuntimeError(f"ab gave no figures for {url}:\n{out[-2000:]}")
    return {"p50": pct[50], "p99": pct[99], "max": pct[100], "req/s": float(rate[1]),
            "failed": (sum(int(g) for g in failed.groups()) if failed else 0) + (int(non2xx[1]) if non2xx else 0)}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if shutil.which("ab") is None:
        print("serve_tail.py: needs ab (apt-get install apache2-utils)", file=sys.stderr)
        return 2
    load_args = serve_load.parse_args(["--bundle", "x", "--apps", ",".join(a.apps), "--proxy", a.proxy])
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sstail-", dir="/tmp") as scratch:
        bundle = a.bundle
        if a.make_tiny_bundle:
            from serve_helpers import make_tiny_bundle

            bundle = str(make_tiny_bundle(Path(scratch) / "bundle"))
        body = Path(scratch) / "body.jpg"
        body.write_bytes(serve_load.pictures(1, a.image_px)[0])
        with serve_load.running_apps(load_args, bundle, Path(scratch)) as urls:
            for name in a.apps:
                ab(f"{urls[name]}/predict", body, a.warmup)
            for k in range(a.rounds):
                order = a.apps if k % 2 == 0 else a.apps[::-1]
                row = {"round": k + 1, "order": order, "load_before": load_average()}
                for name in order:
                    row[name] = ab(f"{urls[name]}/predict", body, a.requests)
                row["load_after"] = load_average()
                rounds.append(row)
                print(f"round {k + 1} load {row['load_before']:.1f}->{row['load_after']:.1f}: " + "  ".join(
                    f"{n} p50 {row[n]['p50']:.0f} p99 {row[n]['p99']:.0f}" for n in a.apps), flush=True)
    report(a, rounds)
    if a.json:
        Path(a.json).write_text(json.dumps(rounds, indent=2))
    return 0 if all(r[n]["failed"] == 0 for r in rounds for n in a.apps) else 1


def report(a: argparse.Namespace, rounds: list[dict]) -> None:
    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):7.2f} ({min(xs):.2f}–{max(xs):.2f})"

    loads = [r[k] for r in rounds for k in ("load_before", "load_after")]
    print(f"\n{len(rounds)} rounds × {a.requests} requests, ab -k -c 1, {a.image_px} px JPEG, --proxy {a.proxy}; "
          f"load average {min(loads):.1f}–{max(loads):.1f}")
    print(f"{'app':8s} {'p50 ms, median (range)':>26s} {'p99 ms':>26s} {'p50 / peer':>26s} {'p99 / peer':>26s}")
    for name in a.apps:
        p50, p99 = [r[name]["p50"] for r in rounds], [r[name]["p99"] for r in rounds]
        cells = [spread(p50), spread(p99)]
        if "peer" in a.apps:
            cells += [spread([r[name]["p50"] / r["peer"]["p50"] for r in rounds]),
                      spread([r[name]["p99"] / r["peer"]["p99"] for r in rounds])]
        print(f"{name:8s} " + " ".join(f"{c:>26s}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
