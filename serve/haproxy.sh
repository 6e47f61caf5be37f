#!/bin/sh
# Ray Serve runs this as its HAProxy binary on every node (python -m serve sets
# RAY_SERVE_HAPROXY_BINARY_PATH to it): haproxy_loopback.py, beside it, rewrites Ray's config and
# execs the real HAProxy. The interpreter and the binary come from the launcher's environment.
exec "${SUPERSUB_PYTHON:-python3}" "$(dirname "$0")/haproxy_loopback.py" "${SUPERSUB_HAPROXY_BINARY:-haproxy}" auto "$@"
