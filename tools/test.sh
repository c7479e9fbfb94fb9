#!/usr/bin/env bash
# Runs the whole test suite, as CI does: installs the packages (tools/setup.sh), then
#   build/       Release, warnings as errors          -> ctest (unit + integration)
#   build-asan/  AddressSanitizer + UBSan             -> ctest -L unit
#   build-fuzz/  clang, libFuzzer (if VBRIDGE_FUZZ)    -> ctest -L fuzz
# Stops at the first failing step. Environment knobs for local use:
#   VBRIDGE_TEST_SKIP_ASAN=1, VBRIDGE_TEST_SKIP_FUZZ=1   leave out those builds
#   VBRIDGE_TEST_JOBS=N                                  parallel build / test jobs (default 2)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="${VBRIDGE_TEST_JOBS:-2}"
current_step=""
started=$SECONDS

step() {
  current_step="$*"
  echo
  echo "==> [$((SECONDS - started))s] $*"
}

on_error() {
  local rc=$?
  echo >&2
  echo "vbridge test.sh: FAILED (exit $rc) at step: ${current_step:-startup}" >&2
  exit "$rc"
}
trap on_error ERR

# configure <build dir> <cmake args...>: a folder configured with another generator is started afresh.
configure() {
  local dir="$1"
  shift
  if [[ -f "$dir/CMakeCache.txt" ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$dir/CMakeCache.txt"; then
    echo "$dir was configured with another generator; removing it"
    rm -rf "$dir"
  fi
  cmake -S "$root" -B "$dir" -G Ninja "$@"
}

step "install packages (tools/setup.sh)"
"$root/tools/setup.sh"

step "clang-format check (.clang-format)"
git ls-files '*.cc' '*.h' | xargs clang-format --dry-run --Werror

step "configure build/ (Release, -Werror)"
configure build -DCMAKE_BUILD_TYPE=Release -DVBRIDGE_WERROR=ON -DVBRIDGE_VM_E2E=ON
step "build build/"
cmake --build build -j "$jobs"
step "clang-tidy on the protocol core (.clang-tidy; reported, not gating)"
VBRIDGE_TIDY_FILTER='protocol/[a-z_]+\.cc$' "$root/tools/tidy.sh" build --extra-arg=-Wno-unknown-warning-option 2>&1 | tail -n 30 || echo "clang-tidy reported warnings (see above)"
step "ctest in build/"
(cd build && ctest --output-on-failure -j "$jobs")

if [[ "${VBRIDGE_TEST_SKIP_ASAN:-0}" != 1 ]]; then
  step "configure build-asan/ (ASan + UBSan)"
  configure build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVBRIDGE_WERROR=ON -DVBRIDGE_SANITIZE=ON -DVBRIDGE_BENCH=OFF
  step "build build-asan/"
  cmake --build build-asan -j "$jobs"
  step "ctest -L unit in build-asan/"
  (cd build-asan &&
    ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1}" \
      UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
      ctest --output-on-failure -j "$jobs" -L unit)
fi

if [[ "${VBRIDGE_TEST_SKIP_FUZZ:-0}" != 1 ]]; then
  if grep -q 'option(VBRIDGE_FUZZ' "$root/CMakeLists.txt"; then
    step "configure build-fuzz/ (clang, libFuzzer)"
    CC=clang CXX=clang++ configure build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVBRIDGE_FUZZ=ON -DVBRIDGE_BENCH=OFF
    step "build build-fuzz/"
    cmake --build build-fuzz -j "$jobs"
    step "ctest -L fuzz in build-fuzz/"
    (cd build-fuzz && ctest --output-on-failure -j "$jobs" -L fuzz)
  else
    echo "no VBRIDGE_FUZZ option in CMakeLists.txt: fuzz build left out"
  fi
fi

trap - ERR
echo
echo "vbridge test.sh: all steps passed in $((SECONDS - started))s"
