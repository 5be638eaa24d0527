#!/usr/bin/env bash
# Make PostgreSQL's server binaries available for the test of MLflow on PostgreSQL (Debian package postgresql;
# the test starts its own throwaway cluster, no system service is used). Does nothing when they are there;
# prints how to get them when it cannot install them (the test then skips and says why).
set -u
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing PostgreSQL (apt-get install postgresql)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 || \
        { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; }
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    echo "PostgreSQL not found: install the Debian package postgresql (sudo apt-get install postgresql)" >&2
    exit 1
fi
