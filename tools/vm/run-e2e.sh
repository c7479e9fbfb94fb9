#!/usr/bin/env bash
# Boots the real guest with a statically linked agent and runs tools/vm/tests/test_vm_e2e.py.
#   tools/vm/run-e2e.sh [STATIC_BUILD_DIR] [VBRIDGE_HOST_BINARY]
# Builds (incrementally) the static vbridge-guest into STATIC_BUILD_DIR (default build-static), builds or reuses
# the image in ~/.cache/vbridge, boots it, drives Docker across the VM boundary when a host agent is given,
# and stops it again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
static_dir="${1:-$here/../../build-static}"
host_binary="${2:-}"
agent="$("$here/build-static-agent.sh" "$static_dir" | tail -n 1)"
export VBRIDGE_VM_E2E=1 VBRIDGE_GUEST_AGENT="$agent"
[[ -n "$host_binary" ]] && export VBRIDGE_HOST_AGENT="$host_binary"
python3 "$here/image.py" build --agent "$agent" >/dev/null
exec python3 -m unittest discover -s "$here/tests" -p 'test_vm_e2e.py' -v
