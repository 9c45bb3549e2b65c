#!/usr/bin/env bash
# The whole test suite, with its peers. This is the README's test command.
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh planner    # extra args go to `cargo test`
#
# Peers (moto, Prism, sshd) are installed under the ignored `.peers/` folder
# and started on 127.0.0.1 by `scripts/peers.sh` as later issues add them.
# NIMBUS_REQUIRE_PEERS=1 makes any test whose peer is missing fail, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

export NIMBUS_REQUIRE_PEERS=1
export NO_COLOR=1

if [ -x scripts/peers.sh ]; then
  # shellcheck disable=SC1091
  source scripts/peers.sh
  peers_start
  trap peers_stop EXIT
fi

cargo fmt --check
cargo test --locked --no-fail-fast "$@"
