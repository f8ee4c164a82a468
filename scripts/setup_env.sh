#!/usr/bin/env bash
# Creates .venv (if missing) and installs hf-kvpool with its test and benchmark extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (pip skips what is there).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build. On a GPU machine,
  # install the torch you need into .venv first; this step then leaves it alone.
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".[test]"
