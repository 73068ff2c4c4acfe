#!/usr/bin/env bash
# Start the test services (scripts/services.sh: the single-node servers, and
# the clusters that the Sentinel, Redis Cluster and fault-suite tests use),
# then run every test of the workspace: unit/integration tests with cargo-nextest (or cargo test when
# nextest is not installed), then the doc tests, which nextest does not run.
# The services are left running; `bash scripts/services.sh stop` and
# `bash scripts/services.sh cluster stop` stop them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/services.sh start
bash scripts/services.sh cluster start

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast
else
  echo "test.sh: cargo-nextest not found, using cargo test" >&2
  cargo test --workspace --all-features --no-fail-fast
fi

cargo test --workspace --doc --all-features
