#!/usr/bin/env bash
# The test command: installs what is missing (redis-server too, when it can: scripts/ensure_redis.sh),
# then runs the whole suite (CPU; Triton kernels run under the interpreter when there is no GPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
bash "$root/scripts/ensure_redis.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -q --timeout=600 "$@"
