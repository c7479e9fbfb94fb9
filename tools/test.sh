#!/usr/bin/env bash
# Runs the whole test suite, as CI does: installs the packages (tools/setup.sh), then
#   build/       Release, warnings as errors          -> ctest (unit + integration, incl. faults, soak, load)
#   build-asan/  AddressSanitizer + UBSan             -> ctest -L unit, then the integration suites with the
#                                                        agents under ASan (soak and load shortened)
#   build-tsan/  ThreadSanitizer                      -> what has threads: unit tests, the guest agent suite's
#                                                        threaded servers, vbridge-soak's churn (faults, load)
#   build-fuzz/  clang, libFuzzer (if VBRIDGE_FUZZ)    -> ctest -L fuzz
# Stops at the first failing step. Environment knobs for local use:
#   VBRIDGE_TEST_SKIP_ASAN=1, VBRIDGE_TEST_SKIP_TSAN=1, VBRIDGE_TEST_SKIP_FUZZ=1   leave out those builds
#   VBRIDGE_TEST_QUICK=1       leave out the long reliability suites (ctest labels soak, load, faults)
#   VBRIDGE_SOAK_SECONDS=N     soak duration in build/ (default 300 under CI, 60 otherwise)
#   VBRIDGE_TEST_JOBS=N        parallel build / test jobs (default 2)
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
# The reliability suites (faults, chaos, soak, load) take about 8 minutes; VBRIDGE_TEST_QUICK=1 leaves them out.
long_suites=()
if [[ "${VBRIDGE_TEST_QUICK:-0}" == 1 ]]; then
  long_suites=(-LE 'soak|load|faults')
fi
step "ctest in build/"
(cd build && ctest --output-on-failure -j "$jobs" "${long_suites[@]}")

if [[ "${VBRIDGE_TEST_SKIP_ASAN:-0}" != 1 ]]; then
  step "configure build-asan/ (ASan + UBSan)"
  # VBRIDGE_BENCH for vbridge-soak, the traffic of the reliability suites.
  configure build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVBRIDGE_WERROR=ON -DVBRIDGE_SANITIZE=ON -DVBRIDGE_BENCH=ON
  step "build build-asan/"
  cmake --build build-asan -j "$jobs"
  export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1}"
  export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
  step "ctest -L unit in build-asan/"
  (cd build-asan && ctest --output-on-failure -j "$jobs" -L unit)
  # The agents run instrumented under every integration suite; an ASan or UBSan report aborts the agent,
  # which fails the suite. dockerd, socat and the Python clients are not instrumented. Left out: the fixtures
  # suite (Python only). The soak and load run shorter; they, the ports and the file events suites report
  # memory figures but do not assert their bounds (ASan's shadow memory and quarantine are not the bridge's).
  step "integration suites in build-asan/ (agents under ASan + UBSan)"
  (cd build-asan &&
    VBRIDGE_SOAK_SECONDS=60 VBRIDGE_LOAD_STREAMS=5000 VBRIDGE_LOAD_SECONDS=10 \
      ctest --output-on-failure -j "$jobs" -L integration -E '^integration\.fixtures$' "${long_suites[@]}")
  unset ASAN_OPTIONS UBSAN_OPTIONS
fi

# The agents' one thread besides their loops is the host's bulk reader (host/bulk_reader.h; the guest's
# offloaded writes run on the kernel's io_uring workers). TSan runs what has threads: the unit tests (the
# bulk reader's own), the guest agent suite (its fake servers are threads), and vbridge-soak's churn threads
# under the fault and load suites, with the agents instrumented too.
if [[ "${VBRIDGE_TEST_SKIP_TSAN:-0}" != 1 ]]; then
  step "configure build-tsan/ (ThreadSanitizer)"
  configure build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVBRIDGE_WERROR=ON -DVBRIDGE_TSAN=ON -DVBRIDGE_BENCH=ON
  step "build build-tsan/"
  cmake --build build-tsan -j "$jobs"
  step "ctest in build-tsan/ (unit, guest agent suite, faults, load)"
  (cd build-tsan &&
    export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}" &&
    ctest --output-on-failure -j "$jobs" -L unit &&
    VBRIDGE_FAULTS=30 VBRIDGE_LOAD_STREAMS=2000 VBRIDGE_LOAD_SECONDS=5 \
      ctest --output-on-failure -j "$jobs" -R '^(ReadModes/GuestAgent\.|integration\.(faults|load)$)' "${long_suites[@]}")
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
