#!/usr/bin/env bash
# Puts a `hyperloop` binary on the job's PATH (through $GITHUB_PATH, and prints its directory).
#
#   HYPERLOOP_VERSION      a release tag (v1.2.3), `latest`, `source` (build this checkout), `local`
#                          (use the hyperloop in HYPERLOOP_BIN_DIR or already on PATH), or empty:
#                          `local` when HYPERLOOP_BIN_DIR is set, else the action's own ref
#                          (HYPERLOOP_ACTION_REF) when it is a release tag, else `latest`.
#   HYPERLOOP_BIN_DIR      for `local`: the directory holding a prebuilt hyperloop.
#   HYPERLOOP_RELEASE_URL  where releases live (default: this project's GitHub releases).
#   HYPERLOOP_INSTALL_DIR  where to put the binary (default: $RUNNER_TEMP/hyperloop/bin).
#   GITHUB_ACTION_PATH     the action's source, built when there is no release binary.
#
# A release binary is used only when its SHA-256 matches the release's SHA256SUMS; a mismatch is
# an error, never a reason to fall back. When the release has no binary for this platform (or no
# such release exists), hyperloop is built from the action's own source with cargo.
set -euo pipefail

log() { echo "install: $*" >&2; }
die() {
    echo "::error title=hyperloop install::$*"
    exit 1
}

source_dir="${GITHUB_ACTION_PATH:-$(cd "$(dirname "$0")/.." && pwd)}"
release_url="${HYPERLOOP_RELEASE_URL:-https://github.com/hyperloop-dev/hyperloop/releases}"
install_dir="${HYPERLOOP_INSTALL_DIR:-${RUNNER_TEMP:-${TMPDIR:-/tmp}}/hyperloop/bin}"
version="${HYPERLOOP_VERSION:-}"

if [ -z "$version" ] && [ -n "${HYPERLOOP_BIN_DIR:-}" ]; then
    version=local
elif [ -z "$version" ]; then
    ref="${HYPERLOOP_ACTION_REF:-}"
    if [[ "$ref" =~ ^v[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$ ]]; then
        version="$ref"
    else
        # A branch, a commit or a moving major tag (v1) names no single release.
        version=latest
    fi
fi

publish() {
    local dir="$1"
    "$dir/hyperloop" --version >/dev/null || die "$dir/hyperloop does not run"
    if [ -n "${GITHUB_PATH:-}" ]; then
        echo "$dir" >>"$GITHUB_PATH"
    fi
    log "using $("$dir/hyperloop" --version) from $dir"
    echo "$dir"
}

target_triple() {
    local os="${RUNNER_OS:-$(uname -s)}" arch="${RUNNER_ARCH:-$(uname -m)}"
    case "$arch" in
        X64 | x86_64 | amd64) arch=x86_64 ;;
        ARM64 | aarch64 | arm64) arch=aarch64 ;;
        *) return 1 ;;
    esac
    case "$os" in
        Linux) echo "$arch-unknown-linux-musl" ;;
        macOS | Darwin) echo "$arch-apple-darwin" ;;
        *) return 1 ;;
    esac
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

build_from_source() {
    command -v cargo >/dev/null 2>&1 \
        || die "no release binary for $version and no cargo to build $source_dir; install Rust (rustup) first"
    [ -f "$source_dir/Cargo.toml" ] || die "no release binary for $version and no source at $source_dir"
    log "building hyperloop from $source_dir (this takes a few minutes)"
    local root
    root="$(dirname "$install_dir")"
    mkdir -p "$root"
    cargo install --path "$source_dir" --locked --root "$root" --bin hyperloop
    publish "$root/bin"
}

case "$version" in
    local)
        dir="${HYPERLOOP_BIN_DIR:-}"
        if [ -z "$dir" ]; then
            found="$(command -v hyperloop || true)"
            [ -n "$found" ] || die "version local: no HYPERLOOP_BIN_DIR and no hyperloop on PATH"
            dir="$(dirname "$found")"
        fi
        [ -x "$dir/hyperloop" ] || die "version local: $dir/hyperloop is not an executable"
        publish "$(cd "$dir" && pwd)"
        exit 0
        ;;
    source)
        build_from_source
        exit 0
        ;;
esac

if ! target="$(target_triple)"; then
    log "no release binaries for $(uname -s)/$(uname -m)"
    build_from_source
    exit 0
fi
asset="hyperloop-$target.tar.gz"
if [ "$version" = latest ]; then
    base="$release_url/latest/download"
else
    base="$release_url/download/$version"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fetch() { curl --fail --silent --show-error --location --retry 3 --output "$2" "$1"; }

if ! fetch "$base/$asset" "$work/$asset" 2>"$work/err"; then
    log "no release binary at $base/$asset ($(tr '\n' ' ' <"$work/err"))"
    echo "::notice title=hyperloop install::no release binary for $version on $target; building from source"
    build_from_source
    exit 0
fi
fetch "$base/SHA256SUMS" "$work/SHA256SUMS" \
    || die "release $version has $asset but no SHA256SUMS to check it against"
want="$(awk -v a="$asset" '{ f = $2; sub(/^\*/, "", f) } f == a { print $1 }' "$work/SHA256SUMS")"
[ -n "$want" ] || die "SHA256SUMS of $version does not list $asset"
got="$(sha256_of "$work/$asset")"
[ "$got" = "$want" ] || die "checksum mismatch for $asset: SHA256SUMS says $want, the download is $got"
log "$asset: SHA-256 $got matches SHA256SUMS"

tar -xzf "$work/$asset" -C "$work"
bin="$(find "$work" -type f -name hyperloop -perm -u+x | head -n 1)"
[ -n "$bin" ] || die "$asset holds no hyperloop executable"
mkdir -p "$install_dir"
install -m 0755 "$bin" "$install_dir/hyperloop"
publish "$install_dir"
