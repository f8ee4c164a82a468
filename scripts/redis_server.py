"""A private ``redis-server`` on a free loopback port, for tests and benchmarks of the Redis tier.

Not used by the pool itself (which connects to whatever URL it is given).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

__all__ = ["local_redis_server"]


@contextlib.contextmanager
def local_redis_server(maxmemory: str | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``redis-server`` on 127.0.0.1 (no persistence, LRU eviction); yield ``(url, process)``.

    Raises FileNotFoundError if ``redis-server`` is not installed (``apt-get install redis-server``).
    The server is killed on exit.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed: apt-get install redis-server")
    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--maxmemory-policy", "allkeys-lru"] + (["--maxmemory", maxmemory] if maxmemory else [])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        for _ in range(200):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"redis-server did not start on port {port}")
        yield url, proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
