#!/usr/bin/env bash
# Builds and packages nimbus for one target: what the release workflow runs on each of its runners.
#
#   bash scripts/package.sh TARGET [OUT_DIR] [BINARY]
#
# TARGET is a Rust target triple (x86_64-unknown-linux-musl, aarch64-unknown-linux-musl, aarch64-apple-darwin).
# Without BINARY it runs `cargo build --release --locked --target TARGET`; with BINARY (a test) it packages that
# file instead. It writes OUT_DIR/nimbus-VERSION-TARGET.tar.gz (a folder nimbus-VERSION-TARGET/ holding
# `nimbus`, README.md and LICENSE) and appends the archive's line to OUT_DIR/SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:?usage: scripts/package.sh TARGET [OUT_DIR] [BINARY]}"
out="${2:-dist}"
binary="${3:-}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
name="nimbus-$version-$target"

if [ -z "$binary" ]; then
  cargo build --release --locked --target "$target" --bin nimbus
  binary="${CARGO_TARGET_DIR:-target}/$target/release/nimbus"
fi
[ -x "$binary" ] || { echo "package: $binary is not an executable" >&2; exit 1; }

mkdir -p "$out"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/$name"
cp "$binary" "$stage/$name/nimbus"
cp README.md LICENSE "$stage/$name/"
chmod 755 "$stage/$name/nimbus"
# Reproducible: fixed owner, order and times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00:00Z' \
  -C "$stage" -czf "$out/$name.tar.gz" "$name"
(
  cd "$out"
  if command -v sha256sum >/dev/null; then sum="$(sha256sum "$name.tar.gz")"; else sum="$(shasum -a 256 "$name.tar.gz")"; fi
  grep -v " $name.tar.gz\$" SHA256SUMS 2>/dev/null > SHA256SUMS.new || true
  echo "$sum" >> SHA256SUMS.new
  sort -k2 SHA256SUMS.new > SHA256SUMS
  rm -f SHA256SUMS.new
)
echo "package: $out/$name.tar.gz"
