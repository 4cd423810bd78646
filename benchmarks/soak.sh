#!/usr/bin/env bash
# The long version of the kill test: SIGKILL a training run at random moments, KILLS times
# (default 200), resuming after each, and check that no reported checkpoint is ever lost.
#   bash benchmarks/soak.sh            # about 10 minutes
#   KILLS=1000 bash benchmarks/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CHARRNN_SOAK_KILLS="${KILLS:-200}" python -m pytest -q tests/test_reliability.py -k random_sigkills
