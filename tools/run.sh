#!/usr/bin/env bash
# The main job on a fresh machine: install, build, bring up a guest with both agents, prove the bridged
# docker.sock works, then keep it up until Ctrl-C (`vbridge down` stops it from elsewhere).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/tools/setup.sh"
cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$root/build" -j 2 --target vbridge-host vbridge-guest vbridge-loadgen
"$root/tools/vbridge" down > /dev/null 2>&1 || true
"$root/tools/vbridge" up
docker=/usr/bin/docker
[ -x "$docker" ] || docker=docker
echo "+ docker --context vbridge run --rm vbridge-busybox echo ok"
"$docker" --context vbridge run --rm vbridge-busybox echo ok
"$root/tools/vbridge" status
if [ -t 0 ] && [ "${VBRIDGE_RUN_DETACH:-0}" != 1 ]; then
  echo "vbridge is up; Ctrl-C stops it (or run tools/vbridge down)."
  trap '"$root/tools/vbridge" down; exit 0' INT TERM
  while sleep 3600; do :; done
fi
