"""``python -m hf_kvpool.serve [MODEL] [pool options] [transformers serve options]``.

Pool options (the rest goes to ``transformers serve``: ``--port``, ``--host``, ``--device``,
``--dtype``, ``--model-timeout``, ``--continuous-batching``...):

  --pool-capacity BYTES  device pool size per model (default: KVPool's: 1 GiB on CPU, 25% of free
                         GPU memory on CUDA); K/M/G suffixes are powers of 1024
  --host-tier BYTES      host-memory tier below the device pool (default 0: none)
  --redis URL            shared Redis tier (redis://host:port/db): replicas reuse each other's prefixes
  --block-size N         tokens per block (default 16)
"""

from __future__ import annotations

import argparse
import logging
import sys

from .pools import PoolOptions, ServePools

__all__ = ["main", "parse_bytes", "split_args"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"1G"``, ``"1.5GiB"`` -> bytes."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS and not value[-1:].isdigit() else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        result = int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size in bytes: {text!r} (e.g. 536870912, 512M, 1G)"
        ) from None
    if result < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_kvpool.serve", add_help=False, allow_abbrev=False, description=__doc__
    )
    parser.add_argument("--pool-capacity", type=parse_bytes, default=None, metavar="BYTES")
    parser.add_argument("--host-tier", type=parse_bytes, default=0, metavar="BYTES")
    parser.add_argument("--redis", default=None, metavar="URL")
    parser.add_argument("--block-size", type=int, default=16, metavar="N")
    return parser


def split_args(argv: list[str]) -> tuple[PoolOptions, list[str]]:
    """Our options -> :class:`PoolOptions`; the rest of ``argv`` is for transformers serve."""
    parser = _parser()
    ours, rest = parser.parse_known_args(argv)
    options = PoolOptions(
        capacity_bytes=ours.pool_capacity,
        host_capacity_bytes=ours.host_tier,
        remote=ours.redis,
        block_size=ours.block_size,
    )
    try:
        options.make_pool()  # a bad block size or an unreachable-scheme URL fails here, before loading
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    return options, rest


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("transformers serve options:\n")
    options, rest = split_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_kvpool.serve").setLevel(logging.INFO)

    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        sys.exit("hf_kvpool.serve needs transformers' serving dependencies: pip install 'hf-kvpool[serve]'")
    import typer
    from transformers.cli.serve import Serve

    from .metrics import PoolMetrics
    from .seams import install

    pools = ServePools(options)
    metrics = PoolMetrics(pools)
    install(pools, on_request=metrics.on_request, add_routes=metrics.add_route)
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(Serve)
    app(args=rest, prog_name="python -m hf_kvpool.serve")
