#!/usr/bin/env bash
# The GPU hour in one command: `pytest -m gpu`, then every benchmark at the README's GPU sizes in bfloat16, JSON and PNG
# into bench/results/ and a summary table (bench/all.py; extra flags pass through). Installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m bench.all --device cuda "$@"
