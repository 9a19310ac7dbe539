#!/usr/bin/env bash
# A device call sends the working tree (tracked and untracked-not-ignored files, 64 MiB at
# most with what it carries). This checkout's tracked files are about 46 MB: the published
# models (models/, 25 MB), the test fixtures (16 MB) and the experiments' small results (the
# predictions are not tracked), none of which the GPU check reads. `slim` takes them out of the index and ignores them in .git/info/exclude (the
# files stay where they are) and installs a pre-commit hook that refuses commits meanwhile;
# `restore` puts the index and the exclude file back and removes the hook.
#
#   scripts/gpu/gpu_tree.sh size      # MB that a device call would send now
#   scripts/gpu/gpu_tree.sh slim      # before the device calls (refuses a tree with changes)
#   scripts/gpu/gpu_tree.sh restore   # right after them
set -euo pipefail
cd "$(dirname "$0")/../.."
EXCLUDE=.git/info/exclude
STATE=.git/gpu-tree-slim
HOOK=.git/hooks/pre-commit
MARK="# gpu_tree.sh slim"

heavy() {
  echo experiments/results
  echo models
  git ls-files | grep -E '^crates/[^/]+/tests/fixtures/' | cut -d/ -f1-4 | sort -u
}

size() {
  git ls-files -z --cached --others --exclude-standard \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {printf "%.1f MB\n", s / 1e6}'
}

case "${1:-}" in
  size)
    size
    ;;
  slim)
    [ -e "$STATE" ] && { echo "already slim ($STATE); run restore first" >&2; exit 1; }
    [ -e "$HOOK" ] && { echo "$HOOK exists; slim would replace it" >&2; exit 1; }
    if [ -n "$(git status --porcelain)" ]; then
      echo "the tree has changes: commit or stash them first (restore puts back HEAD's index)" >&2
      exit 1
    fi
    mkdir -p "$(dirname "$HOOK")"
    printf '#!/bin/sh\necho "slimmed for the device (scripts/gpu/gpu_tree.sh): restore before committing" >&2\nexit 1\n' \
      > "$HOOK"
    chmod +x "$HOOK"
    mapfile -t paths < <(heavy)
    printf '%s\n' "${paths[@]}" > "$STATE"
    git rm -r -q --cached -- "${paths[@]}"
    { echo "$MARK begin"; for p in "${paths[@]}"; do echo "/$p/"; done; echo "$MARK end"; } \
      >> "$EXCLUDE"
    echo "slim: $(size) would travel; run 'scripts/gpu/gpu_tree.sh restore' after the device calls"
    ;;
  restore)
    [ -e "$STATE" ] || { echo "not slim (no $STATE)" >&2; exit 1; }
    mapfile -t paths < "$STATE"
    git reset -q -- "${paths[@]}"
    sed -i "\|^$MARK begin\$|,\|^$MARK end\$|d" "$EXCLUDE"
    rm -f "$STATE" "$HOOK"
    git status --short | head
    echo "restored: $(size) would travel"
    ;;
  *)
    sed -n '2,12p' "$0" >&2
    exit 2
    ;;
esac
