#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (the CPU build when none is installed), then fastpeft with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
