"""serve.haproxy_loopback: HAProxy's wildcard binds (Ray's stats and metrics ports) on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serve.haproxy_loopback import ERRORS, loopback, stub, write_error_pages

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
RAY_DEFAULTS = """\
defaults
    mode http
    errorfile 502 /tmp/haproxy-serve/500.http
    errorfile 503 /tmp/haproxy-serve/500.http
frontend http_frontend
    bind 127.0.0.1:8000
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
    errors = write_error_pages(tmp_path / "errors")
    wrapper.write_text(stub(sys.executable, str(real), errors))
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper), "-db", "-f", str(cfg), "-dR", "-sf", "123"], capture_output=True,
                         text=True, check=True).stdout
    args, config = out.split("\n", 1)
    assert args == f"-db -f {cfg}.loopback -dR -sf 123"  # Ray's other arguments unchanged
    assert config == loopback(CONFIG, errors)
    assert cfg.read_text() == CONFIG  # Ray's own file is left alone


def test_haproxy_answers_its_own_errors_as_json(tmp_path: Path) -> None:
    """Ray's text/plain 500 for 502/503 is replaced by JSON pages: a dead or missing replica
    is 503 + Retry-After, every page a complete response whose body is {"detail": one string}."""
    errors = write_error_pages(tmp_path / "errors")
    out = loopback(RAY_DEFAULTS, errors)
    assert "/tmp/haproxy-serve/500.http" not in out
    assert out.startswith("defaults\n" + "".join(f"    errorfile {c} {errors}/{c}.http\n" for c in ERRORS))
    for code in ERRORS:
        head, body = (errors / f"{code}.http").read_bytes().decode().split("\r\n\r\n", 1)
        assert isinstance(json.loads(body)["detail"], str)
        assert "Content-Type: application/json" in head and f"Content-Length: {len(body)}" in head
    head503 = (errors / "503.http").read_bytes().decode().split("\r\n\r\n")[0]
    assert head503.startswith("HTTP/1.1 503 ") and "Retry-After: 1" in head503
    assert (errors / "502.http").read_bytes().decode().startswith("HTTP/1.1 503 ")
