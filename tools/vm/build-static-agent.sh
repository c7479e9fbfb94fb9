#!/usr/bin/env bash
# Builds a statically linked vbridge-guest for the VM image from Debian's packages (liburing.a,
# libflatbuffers.a, header-only fmt, glibc's and libstdc++'s static archives).
#   tools/vm/build-static-agent.sh [BUILD_DIR]     default BUILD_DIR: build-static (in the repository)
# Prints the binary's path on the last line. Only the vbridge-guest target is built.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="${1:-$root/build-static}"
jobs="${VBRIDGE_BUILD_JOBS:-2}"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [[ -f "$dir/CMakeCache.txt" ]] && ! grep -q "static-agent.cmake" "$dir/CMakeCache.txt"; then
  echo "$dir is not a static agent build folder; refusing to reuse it" >&2
  exit 1
fi
cmake -S "$root" -B "$dir" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PROJECT_INCLUDE="$root/tools/vm/static/static-agent.cmake" \
  -DCMAKE_EXE_LINKER_FLAGS="-static" \
  -DVBRIDGE_BENCH=OFF -DVBRIDGE_WERROR=OFF -DVBRIDGE_SANITIZE=OFF >"$dir.configure.log" 2>&1 ||
  { cat "$dir.configure.log" >&2; exit 1; }
cmake --build "$dir" -j "$jobs" --target vbridge-guest >&2
binary="$dir/guest/vbridge-guest"
if ! file "$binary" 2>/dev/null | grep -q "statically linked" && readelf -l "$binary" | grep -q INTERP; then
  echo "$binary is not statically linked" >&2
  exit 1
fi
echo "$binary"
