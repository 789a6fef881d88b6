#!/usr/bin/env bash
# Start PostgreSQL on loopback for the request-log tests (Debian packages), and print the URL
# the tests use: LLM_SERVICE_TEST_POSTGRES. Needs root (apt-get, su). Idempotent.
set -euo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
if [ -z "${version:-}" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    pg_createcluster "$version" main >&2
    read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
fi
if [ "$status" != "online" ]; then
    pg_ctlcluster "$version" "$cluster" start >&2
fi
su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'llm-service'\"" >&2
echo "postgresql+psycopg://postgres:llm-service@127.0.0.1:${port}/postgres"
