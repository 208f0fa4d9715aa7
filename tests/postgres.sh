#!/bin/sh
# Make sure PostgreSQL's server binaries are on this machine for the test suite, which starts a
# throwaway cluster of its own (tests/pg_fixtures.py); this script starts nothing.
#
#   sh tests/postgres.sh      # `make test` runs it before pytest
#
# Installed (root, apt-get: Debian or Ubuntu) when missing. Where that is not possible the
# PostgreSQL tests skip, naming why; with LORADEM_REQUIRE_POSTGRES=1 (.ci/run) this script
# fails instead, and so would those tests.
set -eu

have_server() {
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1
}

have_server && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/postgres.sh: installing PostgreSQL (apt-get) for the storage tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    have_server && exit 0
    echo "tests/postgres.sh: apt-get installed postgresql but no initdb was found" >&2
    exit 1
fi
why="tests/postgres.sh: PostgreSQL is not installed and cannot be installed here (needs root and apt-get)"
if [ "${LORADEM_REQUIRE_POSTGRES:-0}" = 1 ]; then
    echo "$why, and LORADEM_REQUIRE_POSTGRES=1 requires it" >&2
    exit 1
fi
echo "$why; the PostgreSQL tests will skip" >&2
