"""Benchmark the paged gather / scatter kernels against the torch path and a plain copy.

Not a test: it prints one markdown table and writes JSON. For each payload size (bytes of K/V
moved, default 16 MiB / 256 MiB / 2 GiB on CUDA, 4 / 16 / 64 MiB on CPU) it times

- ``triton gather`` / ``triton scatter``: ``hf_kvpool.triton_kernels``, called with
  ``validate=False`` (validation adds one small sync); CUDA only, unless TRITON_INTERPRET=1 is set
  (then they run under the interpreter: a smoke test of this script, not a speed figure);
- ``torch gather`` / ``torch scatter``: ``hf_kvpool.core.paging.torch_gather`` / ``torch_scatter``;
- ``copy``: ``dst.copy_(src)`` of the same number of bytes, the practical limit.

GB/s = payload bytes / time (the same convention for every row; the memory traffic is twice that,
one read plus one write). Shape: ``n_layers`` layers x 8 kv heads x head_dim 128, block size 16,
blocks scattered at random over a pool twice the size of the moved set; scatter sources are the
per-layer ``[B, H, S, D]`` tensors a transformers cache holds.

    python scripts/bench_kernels.py                         # CPU: small sizes, torch + copy rows
    python scripts/bench_kernels.py --sizes 16 256 2048     # MiB
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hf_kvpool.core.paging import torch_gather, torch_scatter

HEADS, HEAD_DIM, BLOCK_SIZE = 8, 128, 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", help="payload sizes in MiB (default: by device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--layers", type=int, default=32, help="layers in the storage group (default 32)")
    p.add_argument("--out", default="results/bench_kernels.json", help="JSON output path")
    return p.parse_args()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn, device: torch.device) -> float:
    """Seconds per call: triton.testing.do_bench (median, L2 flushed) on CUDA; a timed loop on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up
    times: list[float] = []
    while len(times) < 3 or (sum(times) < 0.3 and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_case(size_mib: float, layers: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """Tensors for one payload size; the payload is rounded up to whole blocks and whole rows."""
    elem = torch.finfo(dtype).bits // 8
    block_bytes = layers * 2 * HEADS * BLOCK_SIZE * HEAD_DIM * elem
    n = max(1, round(size_mib * 2**20 / block_bytes))
    batch = min(8, n)
    per_row = -(-n // batch)
    n = batch * per_row
    n_blocks = 2 * n + 1
    storage = torch.randn(n_blocks, layers, 2, HEADS, BLOCK_SIZE, HEAD_DIM, device=device, dtype=dtype)
    block_ids = torch.randperm(n_blocks, generator=gen)[:n].to(device)
    rows = torch.arange(batch).repeat_interleave(per_row).to(device)
    cols = (torch.arange(per_row).repeat(batch) * BLOCK_SIZE).to(device)
    ntok = torch.full((n,), BLOCK_SIZE, dtype=torch.int64, device=device)
    seq = per_row * BLOCK_SIZE
    out = torch.zeros(layers, 2, batch, HEADS, seq, HEAD_DIM, device=device, dtype=dtype)
    srcs = [
        tuple(torch.randn(batch, HEADS, seq, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
        for _ in range(layers)
    ]
    return dict(
        storage=storage, block_ids=block_ids, rows=rows, cols=cols, ntok=ntok, out=out, srcs=srcs,
        payload=n * block_bytes, n=n, n_blocks=n_blocks,
    )  # fmt: skip


def bench_size(size_mib: float, args, dtype: torch.dtype, device: torch.device, use_triton: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    c = make_case(size_mib, args.layers, dtype, device, gen)
    storage, block_ids, rows, cols, ntok, out, srcs = (
        c[k] for k in ("storage", "block_ids", "rows", "cols", "ntok", "out", "srcs")
    )
    flat_src = torch.randn(c["payload"] // storage.element_size(), device=device, dtype=dtype)
    flat_dst = torch.empty_like(flat_src)
    ops = {
        "copy": lambda: flat_dst.copy_(flat_src),
        "torch gather": lambda: torch_gather(storage, block_ids, rows, cols, ntok, out),
        "torch scatter": lambda: torch_scatter(storage, srcs, block_ids, rows, cols),
    }
    match = {}
    if use_triton:
        from hf_kvpool.triton_kernels import paged_gather, paged_scatter

        ops["triton gather"] = lambda: paged_gather(storage, block_ids, rows, cols, ntok, out, validate=False)
        ops["triton scatter"] = lambda: paged_scatter(storage, srcs, block_ids, rows, cols, validate=False)
        # sanity: the kernels agree with the torch path on this case
        ref, got = torch.zeros_like(out), torch.zeros_like(out)
        torch_gather(storage, block_ids, rows, cols, ntok, ref)
        paged_gather(storage, block_ids, rows, cols, ntok, got)
        match["gather"] = torch.equal(_bits(ref), _bits(got))
        st_ref, st_got = storage.clone(), storage.clone()
        torch_scatter(st_ref, srcs, block_ids, rows, cols)
        paged_scatter(st_got, srcs, block_ids, rows, cols)
        match["scatter"] = torch.equal(_bits(st_ref), _bits(st_got))
        del ref, got, st_ref, st_got
    seconds = {}
    for name, fn in ops.items():
        sync(device)
        seconds[name] = time_op(fn, device)
    gbps = {name: c["payload"] / s / 1e9 for name, s in seconds.items()}
    return {
        "size_mib": c["payload"] / 2**20,
        "blocks_moved": c["n"],
        "pool_blocks": c["n_blocks"],
        "seconds": seconds,
        "gbps": gbps,
        "pct_of_copy": {name: 100 * g / gbps["copy"] for name, g in gbps.items()},
        "triton_matches_torch": match,
    }


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # Under TRITON_INTERPRET=1 the Triton rows run on CPU too: a smoke run of this script, not a speed figure.
    use_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    sizes = args.sizes or ([16, 256, 2048] if device.type == "cuda" else [4, 16, 64])
    results = [bench_size(s, args, dtype, device, use_triton) for s in sizes]

    order = ["triton gather", "triton scatter", "torch gather", "torch scatter", "copy"]
    print(
        f"\n{args.layers} layers x {HEADS} kv heads x head_dim {HEAD_DIM}, block {BLOCK_SIZE}, {args.dtype}, "
        f"{device.type}" + ("" if use_triton else " (Triton rows need CUDA)")
    )
    print("\n| size (MiB of K/V moved) | op | GB/s (payload bytes / time) | % of copy |")
    print("|---:|---|---:|---:|")
    for r in results:
        for op in order:
            if op in r["gbps"]:
                gbps, pct = r["gbps"][op], r["pct_of_copy"][op]
                print(f"| {r['size_mib']:g} | {op} | {gbps:.3g} | {pct:.3g}% |")
    bad = [(r["size_mib"], k) for r in results for k, ok in r["triton_matches_torch"].items() if not ok]
    if bad:
        print(f"\nWARNING: Triton result differs from the torch path for {bad}")

    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": {
            "layers": args.layers,
            "kv_heads": HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
            "dtype": args.dtype,
        },  # fmt: skip
        "convention": "GB/s = bytes of K/V payload moved / seconds (read + write traffic is twice that)",
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "median of a timed loop",
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    print(f"\nwrote {path}")
    if bad:
        raise SystemExit(1)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
