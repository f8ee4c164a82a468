#!/usr/bin/env bash
# Builds the sdist and, from it, the wheel; installs the wheel (not editable) into a fresh virtual
# environment outside the repository; checks that `import hf_kvpool` comes from that install and that
# a PooledCache reuses on a tiny model; then runs the coverage and real-model tests against it.
# Run by .ci/run (an editable install, as the suite uses, would hide a package missing from the wheel).
#   HF_KVPOOL_WHEEL_DIR=DIR   keep the build and the environment there (default: a temporary folder)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${HF_KVPOOL_WHEEL_DIR:-$(mktemp -d)}"
mkdir -p "$work"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q build "torch==2.13.0"
rm -rf "$work/dist"
"$py" -m build -q --outdir "$work/dist" "$root" >/dev/null
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
tar tzf "$sdist" > "$work/sdist.txt"
"$py" -m zipfile -l "$wheel" > "$work/wheel.txt"
for module in hf_kvpool/core/pool.py hf_kvpool/hf/call.py hf_kvpool/hf/kinds/base.py; do
  for listing in sdist wheel; do
    grep -q "$module" "$work/$listing.txt" || { echo "check_wheel: $module is missing from the $listing" >&2; exit 1; }
  done
done
grep -q triton_kernels/paged_copy.py "$work/sdist.txt" && grep -q hf_kvpool/triton_kernels/paged_copy.py "$work/wheel.txt" \
  || { echo "check_wheel: the Triton kernels are missing from the sdist or the wheel" >&2; exit 1; }
"$py" -m pip install -q "$wheel[test]"
cd "$work"  # not the repository: its source must not be importable
HF_KVPOOL_INSTALLED_IN="$work/venv" "$py" - <<'PY'
import os

import torch
import transformers

import hf_kvpool
from hf_kvpool import PooledCache

where = os.path.realpath(hf_kvpool.__file__)
assert where.startswith(os.path.realpath(os.environ["HF_KVPOOL_INSTALLED_IN"])), where
config = transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.randint(1, 128, (1, 40))
first = model.generate(ids, cache=PooledCache(model), max_new_tokens=4, do_sample=False)
cache = PooledCache(model)
second = model.generate(first, cache=cache, max_new_tokens=4, do_sample=False)
assert cache.reused_tokens == [32], cache.reused_tokens
print(f"check_wheel: hf_kvpool {hf_kvpool.__version__} from {where}; the second call reused {cache.reused_tokens[0]} tokens")
PY
HF_KVPOOL_INSTALLED_IN="$work/venv" "$py" -m pytest -q -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" \
  "$root/tests/test_model_coverage.py" "$root/tests/test_real_model.py"
