#!/usr/bin/env bash
# Installs a nimbus release, checksum-verified: what the GitHub Action runs, and the README's install line spelled
# out. Environment: VERSION (required), REPO (owner/name of the repository that publishes releases), SHA256 (the
# archive's expected sha256; when empty, the release's SHA256SUMS is used), PREFIX (default ~/.local), and
# NIMBUS_RELEASE_URL (a base URL instead of GitHub's release downloads: a mirror, or file:// in tests).
set -euo pipefail
: "${VERSION:?set VERSION to the release, e.g. 0.1.0}"
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) target=x86_64-unknown-linux-musl ;;
  Linux-aarch64 | Linux-arm64) target=aarch64-unknown-linux-musl ;;
  Darwin-arm64) target=aarch64-apple-darwin ;;
  *) echo "install: no nimbus release for $(uname -s) $(uname -m); build it with cargo install --locked" >&2; exit 1 ;;
esac
target="${NIMBUS_TARGET:-$target}"
base="${NIMBUS_RELEASE_URL:-https://github.com/${REPO:?set REPO to owner/name}/releases/download/v$VERSION}"
archive="nimbus-$VERSION-$target.tar.gz"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
curl -fsSL "$base/$archive" -o "$work/$archive"
if [ -n "${SHA256:-}" ]; then
  want="$SHA256"
else
  want="$(curl -fsSL "$base/SHA256SUMS" | awk -v f="$archive" '$2 == f { print $1 }')"
fi
[ -n "$want" ] || { echo "install: no sha256 is known for $archive" >&2; exit 1; }
have="$( (sha256sum "$work/$archive" 2>/dev/null || shasum -a 256 "$work/$archive") | cut -d' ' -f1)"
if [ "$have" != "$want" ]; then
  echo "install: $archive has sha256 $have, not $want: not installing it" >&2
  exit 1
fi
tar -xzf "$work/$archive" -C "$work"
prefix="${PREFIX:-$HOME/.local}"
mkdir -p "$prefix/bin"
install -m 755 "$work/nimbus-$VERSION-$target/nimbus" "$prefix/bin/nimbus"
if [ -n "${GITHUB_PATH:-}" ]; then echo "$prefix/bin" >> "$GITHUB_PATH"; fi
echo "install: nimbus $VERSION ($target, sha256 $have) in $prefix/bin"
