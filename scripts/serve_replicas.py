"""N replicas of ``python -m hf_kvpool.serve`` behind an existing cache-aware router, on this machine.

    python scripts/serve_replicas.py MODEL --replicas 2 --policy cache_aware [--redis] [--port 8000]

starts N servers on free loopback ports (each pinned to its own CPU cores with ``taskset`` when
there is no GPU, ``OMP_NUM_THREADS`` set to match), optionally a private ``redis-server`` that they
share as their Redis tier (``--redis``: ``scripts/redis_server.py``; or ``--redis-url URL``), and
``sglang-router`` (PyPI ``sglang-router==0.3.2``) in front of them on ``--port``, then waits until
Ctrl-C and stops everything. Point any OpenAI client at ``http://127.0.0.1:PORT/v1``.

The router: sglang-router's ``cache_aware`` policy keeps a prefix tree of each worker's request
text and sends a request to the worker whose tree matches the most of it (above
``--cache-threshold``, default 0.3), else to the least loaded worker; for chat requests the text is
the conversation, so every turn of a session goes where its first turn went. Unless the loads are
out of balance: then the least loaded worker gets it. The router's default for "out of balance"
is a difference of more than 64 requests (``--balance-abs-threshold 64``): with a handful of
clients whose sessions share a long system prompt, every first turn matches that prompt and every
session lands on one worker. ``--router-args`` defaults to ``--balance-abs-threshold 0`` here (a
new session goes to an idle worker, later turns follow it while loads stay even). vllm-router 0.1.17's
``cache_aware`` does not keep a session on one worker in front of these servers: it asks each worker
to render the chat (``/v1/chat/completions/render``, which transformers serve has not), and its
picks alternate between workers turn after turn (measured 2026-12-08 with stub workers).

The same functions start the servers of ``tests/test_serve.py`` and ``scripts/bench_serving.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTER = "sglang-router"
ROUTER_VERSION = "0.3.2"

__all__ = ["free_port", "start_server", "start_router", "stop", "wait_ready", "router_binary", "replicas"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def router_binary() -> str | None:
    """The ``sglang-router`` executable next to this Python, or on PATH (None if not installed)."""
    here = Path(sys.executable).parent / ROUTER
    return str(here) if here.exists() else shutil.which(ROUTER)


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def server_command(model: str, port: int, *, plain: bool = False, args: tuple[str, ...] = ()) -> list[str]:
    """``hf_kvpool.serve`` (or plain ``transformers serve``) on 127.0.0.1:port for ``model``."""
    if plain:
        head = [sys.executable, "-c", "from transformers.cli.transformers import app; app()", "serve"]
    else:
        head = [sys.executable, "-m", "hf_kvpool.serve"]
    return [*head, model, "--host", "127.0.0.1", "--port", str(port), *args]


def start_server(
    model: str,
    port: int | None = None,
    *,
    plain: bool = False,
    args: tuple[str, ...] = (),
    cpus: str | None = None,
    threads: int | None = 1,
    log: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start a server; returns ``(process, base url)`` (not yet ready: :func:`wait_ready`).

    ``cpus``: a ``taskset`` CPU list ("0", "2-3") to pin it to, where ``taskset`` exists.
    """
    port = port or free_port()
    cmd = server_command(model, port, plain=plain, args=args)
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the process owns it)
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(threads), start_new_session=True
    )
    return proc, f"http://127.0.0.1:{port}"


def start_router(
    workers: list[str],
    policy: str = "cache_aware",
    port: int | None = None,
    log: Path | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str]:
    """``sglang-router launch`` over ``workers`` (``extra``: more router options); returns
    ``(process, base url)``."""
    binary = router_binary()
    if binary is None:
        raise FileNotFoundError(f"{ROUTER} is not installed: pip install {ROUTER}=={ROUTER_VERSION}")
    port = port or free_port()
    cmd = [binary, "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    cmd += ["--worker-urls", *workers, "--prometheus-port", str(free_port()), "--log-level", "warn", *extra]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180.0, path: str = "/health") -> None:
    """Until ``url + path`` answers 200; raises if the process exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args[:4]))}... exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + path, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM its process group (the server and anything it started), then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def core_sets(n: int) -> list[str | None]:
    """``n`` disjoint CPU lists for ``taskset`` (round-robin when there are fewer cores than replicas)."""
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if n >= len(cores):
        return [str(cores[i % len(cores)]) for i in range(n)]
    per = len(cores) // n
    return [",".join(map(str, cores[i * per : (i + 1) * per])) for i in range(n)]


@contextlib.contextmanager
def replicas(
    model: str,
    n: int,
    *,
    policy: str | None = "cache_aware",
    redis_url: str | None = None,
    args: tuple[str, ...] = (),
    pin: bool = True,
    logs: Path | None = None,
    router_port: int | None = None,
    router_args: tuple[str, ...] = (),
    threads: int | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """``n`` hf_kvpool.serve replicas (pinned to disjoint cores), and a router if ``policy``; yields
    ``(url to send requests to, replica urls)``. Everything is stopped on exit. ``threads``: torch
    threads per replica (default: its number of cores)."""
    procs = []
    try:
        cpus = core_sets(n) if pin else [None] * n
        extra = (*args, "--redis", redis_url) if redis_url else tuple(args)
        urls = []
        for i in range(n):
            count = threads or (len(cpus[i].split(",")) if cpus[i] else 1)
            log = logs / f"replica{i}.log" if logs else None
            proc, url = start_server(model, args=extra, cpus=cpus[i], threads=count, log=log)
            procs.append(proc)
            urls.append(url)
        for proc, url in zip(procs, urls):
            wait_ready(proc, url)
        front = urls[0]
        if policy is not None:
            log = logs / "router.log" if logs else None
            proc, front = start_router(urls, policy, router_port, log=log, extra=tuple(router_args))
            procs.append(proc)
            wait_ready(proc, front, timeout=60, path="/v1/models")
        yield front, urls
    finally:
        for proc in reversed(procs):
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="model id or local folder (served by every replica)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--policy", default="cache_aware", help="sglang-router policy (cache_aware, round_robin...)"
    )
    parser.add_argument("--port", type=int, default=8000, help="the router's port")
    parser.add_argument(
        "--redis", action="store_true", help="start a private redis-server as the shared tier"
    )
    parser.add_argument("--redis-url", default=None, help="use this Redis as the shared tier")
    parser.add_argument("--no-pin", action="store_true", help="do not pin replicas to cores")
    parser.add_argument("--logs", type=Path, default=None, help="folder for the replicas' and router's logs")
    parser.add_argument(
        "--router-args",
        default="--balance-abs-threshold 0",
        help="more sglang-router options (default: balance as soon as loads differ, see above)",
    )
    opts, rest = parser.parse_known_args()  # the rest goes to every replica (pool and serve options)
    if opts.logs:
        opts.logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = opts.redis_url
        if opts.redis and url is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from redis_server import local_redis_server

            url, _ = stack.enter_context(local_redis_server())
        front, urls = stack.enter_context(
            replicas(
                opts.model,
                opts.replicas,
                policy=opts.policy,
                redis_url=url,
                args=tuple(rest),
                pin=not opts.no_pin,
                logs=opts.logs,
                router_port=opts.port,
                router_args=tuple(shlex.split(opts.router_args)),
            )
        )
        print(
            f"router ({opts.policy}): {front}/v1   replicas: {' '.join(urls)}"
            + (f"   redis: {url}" if url else "")
        )
        print("Ctrl-C stops everything", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
