#!/usr/bin/env bash
# A "guest" without a VM, for machines where no VM is wanted: dockerd and vbridge-guest in their own network
# and mount namespaces (run under `unshare --net --mount --propagation private --fork`), so the guest's
# ports and mounts are invisible to the host until vbridge forwards them.
#   local_guest.sh STATE_DIR VBRIDGE_GUEST_BINARY [TOKEN_FILE [SHM_FILE]]
# The guest agent requires the host agent to present TOKEN_FILE's token (default STATE_DIR/token, created
# with mode 0600 when missing); pass the same file to vbridge-host --token-file. With SHM_FILE (on tmpfs)
# the guest agent shares memory with a vbridge-host given the same --shm-file.
set -euo pipefail
state="$1"
guest_bin="$2"
token="${3:-$state/token}"
shm="${4:-}"
if [ ! -s "$token" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token")
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

ip link set lo up
mkdir -p "$state/ctd" "$state/docker"
cat > "$state/ctd/config.toml" <<TOML
version = 2
root = "$state/ctd/root"
state = "$state/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$state/ctd/containerd.sock"
[ttrpc]
  address = "$state/ctd/containerd.sock.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$state/ctd/opt"
TOML
echo '{}' > "$state/docker/daemon.json"

# Shims of this containerd (found by its socket on their command line), each with its container's processes.
our_shims() {
  local cmdline pid
  for cmdline in /proc/[0-9]*/cmdline; do
    pid="${cmdline#/proc/}"
    pid="${pid%/cmdline}"
    if tr '\0' '\n' < "$cmdline" 2>/dev/null | grep -qxF -- "$state/ctd/containerd.sock" &&
      tr '\0' '\n' < "$cmdline" 2>/dev/null | head -n1 | grep -q 'containerd-shim'; then
      echo "$pid"
    fi
  done
}
with_descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do with_descendants "$child"; done
  echo "$1"
}

children=()
# Last started, first stopped, each waited for: dockerd stops its containers through containerd (SIGTERM,
# SIGKILL after --shutdown-timeout), so containerd must still be up then. A shim left after all that (dockerd
# died first) is killed with its container by PID.
stop() {
  trap - TERM INT EXIT
  local i pid
  for ((i = ${#children[@]} - 1; i >= 0; i--)); do
    kill -TERM "${children[i]}" 2>/dev/null || true
    wait "${children[i]}" 2>/dev/null || true
  done
  for pid in $(our_shims); do
    kill -KILL $(with_descendants "$pid") 2>/dev/null || true
  done
}
trap stop TERM INT EXIT

# Each in a session of its own, so a SIGTERM to this script's process group (`vbridge down`) reaches only
# this script, which stops them in order (see stop).
setsid containerd --config "$state/ctd/config.toml" > "$state/containerd.log" 2>&1 &
children+=($!)
for _ in $(seq 200); do [ -S "$state/ctd/containerd.sock" ] && break; sleep 0.05; done
setsid dockerd --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
  --storage-driver=overlay2 -H "unix://$state/docker/docker.sock" --data-root "$state/docker/data" \
  --exec-root "$state/docker/exec" --pidfile "$state/docker/docker.pid" --config-file "$state/docker/daemon.json" \
  --containerd "$state/ctd/containerd.sock" --shutdown-timeout 2 > "$state/dockerd.log" 2>&1 &
children+=($!)
setsid "$guest_bin" --listen "unix:$state/guest.sock" --token-file "$token" --docker-socket "$state/docker/docker.sock" \
  ${shm:+--shm-file "$shm"} > "$state/guest.log" 2>&1 &
children+=($!)
wait -n
