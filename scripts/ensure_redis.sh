#!/usr/bin/env bash
# Makes sure redis-server is installed, for the Redis tier tests (they start and stop their own
# server on loopback ports). When it is missing and this runs as root with apt-get, installs it;
# otherwise says that those tests will be skipped. Never fails. Run by scripts/test.sh.
set -uo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server (apt-get) for the Redis tier tests" >&2
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; then
    # the package may start a system service: not needed, the tests run their own servers
    if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
    exit 0
  fi
  echo "warning: apt-get install redis-server failed: the Redis tier tests will be skipped" >&2
else
  echo "redis-server is missing (apt-get install redis-server, as root): the Redis tier tests will be skipped" >&2
fi
exit 0
