#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite (CPU; Triton kernels run
# under the interpreter when there is no GPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -q --timeout=600 "$@"
