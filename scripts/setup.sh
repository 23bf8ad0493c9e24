#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch when none is installed, then fastpeft with its dev extra.
# `torch==2.13.0` is the CPU build only where the package index serves one as that version (as on this project's
# machines); on a stock Linux index it is the CUDA build (several GB). TORCH_INDEX_URL picks the index for that one
# install, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for PyTorch's own CPU wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
python -m pip install -q -e ".[dev]"
