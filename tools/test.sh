#!/usr/bin/env bash
# Sets up (tools/setup.sh) and runs the test suite; Triton kernels run in the interpreter when no
# GPU is present. Extra arguments go to pytest.
source "$(dirname "$0")/setup.sh"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
exec "$PY" -m pytest -q "$@"
