"""serve.haproxy_loopback: HAProxy's wildcard binds (Ray's stats and metrics ports) on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serve.haproxy_loopback import loopback, stub

# The binds of the config Ray 2.60 writes (serve/_private/haproxy_templates.py), and one the user chose.
CONFIG = """\
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
frontend everywhere
    bind 0.0.0.0:8001
listen stats
  bind *:8404
  stats enable
"""


def test_wildcard_binds_move_to_loopback_and_explicit_ones_stay() -> None:
    out = loopback(CONFIG)
    assert "    bind 127.0.0.1:9101\n" in out and "  bind 127.0.0.1:8404\n" in out
    assert "bind 127.0.0.1:8000" in out and "bind 0.0.0.0:8001" in out  # as written
    assert "bind :" not in out and "bind *" not in out
    assert out.count("\n") == CONFIG.count("\n")


def test_the_stub_runs_the_real_binary_on_a_rewritten_copy(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    real = tmp_path / "fake-haproxy"  # prints its arguments and the config it was given
    real.write_text('#!/bin/sh\necho "$@"\nwhile [ "$1" != "-f" ]; do shift; done\ncat "$2"\n')
    real.chmod(0o755)
    wrapper = tmp_path / "haproxy"
    wrapper.write_text(stub(sys.executable, str(real)))
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper), "-db", "-f", str(cfg), "-dR", "-sf", "123"], capture_output=True,
                         text=True, check=True).stdout
    args, config = out.split("\n", 1)
    assert args == f"-db -f {cfg}.loopback -dR -sf 123"  # Ray's other arguments unchanged
    assert config == loopback(CONFIG)
    assert cfg.read_text() == CONFIG  # Ray's own file is left alone
