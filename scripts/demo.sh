#!/usr/bin/env bash
# The main job: installs what is missing, then runs the agent benchmark on a small built-in
# random-weight model (stateless vs pooled vs oracle), printing a table and writing results/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
python scripts/bench_agent.py --quick "$@"
