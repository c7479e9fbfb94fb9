#!/usr/bin/env bash
# Runs clang-tidy (config: .clang-tidy) over the project's own sources listed in a build folder's
# compile_commands.json. Usage: tools/tidy.sh [build dir, default build] [extra clang-tidy args...]
# Exits non-zero on any warning, so CI can use it as a check.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-build}"
shift || true
[[ "$build" = /* ]] || build="$root/$build"
if [[ ! -f "$build/compile_commands.json" ]]; then
  echo "tidy.sh: $build/compile_commands.json not found; configure with cmake first" >&2
  exit 2
fi
# Anchored at the repository root, so generated headers in build folders (build/protocol/...) are left out.
pattern="^$root/${VBRIDGE_TIDY_FILTER:-(protocol|host|guest|tools|bench|tests)/}"
mapfile -t files < <(python3 - "$build/compile_commands.json" "$pattern" <<'PY'
import json, os, re, sys
entries = json.load(open(sys.argv[1]))
pattern = re.compile(sys.argv[2])
seen = set()
for e in entries:
    f = os.path.normpath(os.path.join(e["directory"], e["file"]))
    if pattern.match(f) and f not in seen:
        seen.add(f)
        print(f)
PY
)
if ((${#files[@]} == 0)); then
  echo "tidy.sh: no project sources in $build/compile_commands.json" >&2
  exit 2
fi
echo "tidy.sh: checking ${#files[@]} files"
printf '%s\0' "${files[@]}" |
  xargs -0 -n 1 -P "${VBRIDGE_TEST_JOBS:-2}" \
    clang-tidy -p "$build" --quiet --header-filter="$pattern" --warnings-as-errors='*' "$@"
echo "tidy.sh: clean"
