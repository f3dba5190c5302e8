#!/usr/bin/env bash
# Sets up (tools/setup.sh) and runs the benchmark suite on the device present. Extra arguments go
# to `python -m bench` (e.g. --quick, --suite lstm).
source "$(dirname "$0")/setup.sh"
exec "$PY" -m bench "$@"
