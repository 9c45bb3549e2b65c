# Test peers, sourced by scripts/test.sh: installs what the tests need on a
# fresh machine (Debian packages, later a Python venv and npm packages under
# the ignored .peers/ folder) and starts the peers on 127.0.0.1.
# shellcheck shell=bash

PEERS_DIR="${PEERS_DIR:-$PWD/.peers}"
APT_UPDATED=0

ensure_apt() {
  local missing=()
  for spec in "$@"; do
    local cmd="${spec%%:*}" pkg="${spec##*:}"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if [ "$APT_UPDATED" -eq 0 ]; then
    $sudo apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  echo "peers: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

peers_start() {
  mkdir -p "$PEERS_DIR"
  # The sqlite3 command reads the on-machine state database in tests, as a person would.
  ensure_apt sqlite3:sqlite3
}

peers_stop() {
  :
}
