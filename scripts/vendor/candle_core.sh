#!/usr/bin/env bash
# The vendored candle-core (third_party/candle-core) is the published release VERSION with one
# patch (third_party/candle-core.patch; what it changes and why: third_party/candle-core/CWSEG.md).
#
#   scripts/vendor/candle_core.sh check   # rebuild release + patch in a temporary folder and
#                                         # fail if it differs from third_party/candle-core
#   scripts/vendor/candle_core.sh apply   # replace third_party/candle-core by release + patch
#                                         # (after changing VERSION, when the patch still applies)
#
# The release comes from crates.io (curl); its tests, benches, examples, lock file and the
# packaging files are left out, as cargo needs none of them to build the library.
set -euo pipefail
VERSION=0.11.1
root="$(cd "$(dirname "$0")/../.." && pwd)"
mode="${1:-check}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

curl -sSfL -o "$work/release.crate" \
    "https://static.crates.io/crates/candle-core/candle-core-$VERSION.crate"
tar -xzf "$work/release.crate" -C "$work"
tree="$work/candle-core-$VERSION"
rm -rf "$tree"/{benches,examples,tests} "$tree"/{Cargo.lock,Cargo.toml.orig,.cargo_vcs_info.json}
(cd "$tree" && git apply "$root/third_party/candle-core.patch")
cp "$root/third_party/candle-core/CWSEG.md" "$tree/"

case "$mode" in
check)
    if ! diff -r "$tree" "$root/third_party/candle-core" >"$work/diff"; then
        echo "third_party/candle-core differs from candle-core $VERSION + third_party/candle-core.patch:" >&2
        head -40 "$work/diff" >&2
        exit 1
    fi
    echo "third_party/candle-core = candle-core $VERSION + third_party/candle-core.patch"
    ;;
apply)
    rm -rf "$root/third_party/candle-core"
    cp -r "$tree" "$root/third_party/candle-core"
    echo "third_party/candle-core replaced by candle-core $VERSION + the patch"
    ;;
*)
    echo "usage: $0 check|apply" >&2
    exit 2
    ;;
esac
