#!/usr/bin/env bash
# Builds the release binary for one target and packages it as OUT/hyperloop-TARGET.tar.gz, the
# asset name scripts/install.sh looks for. Linux targets are musl and must come out static.
#   scripts/release-build.sh TARGET OUT
set -euo pipefail
target="${1:?usage: release-build.sh TARGET OUT}"
out="${2:?usage: release-build.sh TARGET OUT}"

case "$target" in
    *-linux-musl)
        # The C parts (bundled libgit2, ring) must be compiled against musl too.
        cc_var="CC_${target//-/_}"
        export "$cc_var=${!cc_var:-musl-gcc}"
        ;;
esac

cargo build --release --locked --target "$target" --bin hyperloop
bin="${CARGO_TARGET_DIR:-target}/$target/release/hyperloop"

case "$target" in
    *-linux-musl)
        if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -q "statically linked"; then
            echo "$bin is dynamically linked:" >&2
            ldd "$bin" >&2
            exit 1
        fi
        ;;
esac
host_arch="$(uname -m)"
[ "$host_arch" = arm64 ] && host_arch=aarch64
if [ "${target%%-*}" = "$host_arch" ]; then
    "$bin" --version
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
install -m 0755 "$bin" "$stage/hyperloop"
cp README.md "$stage/"
mkdir -p "$out"
tar -czf "$out/hyperloop-$target.tar.gz" -C "$stage" hyperloop README.md
echo "packaged $out/hyperloop-$target.tar.gz"
