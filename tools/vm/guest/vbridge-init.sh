#!/bin/sh
# /sbin/vbridge-init: PID 1 of the vbridge guest (no systemd). Mounts the kernel filesystems, loads the modules
# dockerd needs, mounts the 9p shares, starts dockerd and, once it answers, the guest agent; then supervises the
# agent and reaps orphans. SIGTERM/SIGINT or the ACPI power button (QEMU's system_powerdown) shut the guest down:
# agent, then dockerd, then sync, remount read-only, power off.
#
# Everything goes to the serial console, one line per step, prefixed "vbridge-init: [<uptime>s]". The host
# launcher (tools/vm/launch.py) reads these markers:
#   VBRIDGE_READY dockerd=<version|failed> agent=<running|absent|off> uptime=<s>
#   VBRIDGE_FAILED <reason>
#   VBRIDGE_POWEROFF
#
# Kernel command line (all optional; words without a dot would be handed to init by the kernel, so every
# setting is "vbridge.<key>=<value>"):
#   vbridge.share=TAG:/guest/path[,TAG:/path...]   9p shares to mount (QEMU -virtfs mount_tag=TAG)
#   vbridge.listen=serial:vbridge.0                 the agent's --listen (vsock:1024 with a vhost-vsock device)
#   vbridge.agent=off                               do not start the agent
#   vbridge.agent_args=--log-level=debug,--x        extra agent arguments, comma-separated
#   vbridge.storage=overlay2                        dockerd --storage-driver (overlay2 or vfs)
#   vbridge.dockerd=off                             do not start dockerd
#   vbridge.docker_timeout=180                      seconds to wait for dockerd to answer
#   vbridge.preload=busybox                         import /usr/local/share/vbridge/busybox.tar as image
#                                                   vbridge/busybox before READY (about 12 s under TCG; default none)
#   vbridge.debug=1                                 set -x
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
export PATH HOME
umask 022
exec </dev/null >/dev/console 2>&1

AGENT=/usr/local/bin/vbridge-guest
DOCKER_SOCKET=/var/run/docker.sock

uptime_s() { read -r up _ </proc/uptime 2>/dev/null && echo "$up"; }
say() { echo "vbridge-init: [$(uptime_s)s] $*"; }

# --- kernel filesystems --------------------------------------------------------------------------------------
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount -t mqueue mqueue /dev/mqueue 2>/dev/null
mount -t tmpfs -o mode=755,nosuid,nodev run /run
mkdir -p /run/lock /var/log
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
mount -o remount,rw,noatime / 2>/dev/null

# --- settings from the kernel command line -------------------------------------------------------------------
shares=""
listen="serial:vbridge.0"
agent_mode=on
agent_args=""
storage=overlay2
dockerd_mode=on
docker_timeout=180
preload=none
# shellcheck disable=SC2013 # the command line is one line of words
for word in $(cat /proc/cmdline); do
  case "$word" in
    vbridge.share=*) shares="${word#vbridge.share=}" ;;
    vbridge.listen=*) listen="${word#vbridge.listen=}" ;;
    vbridge.agent=*) agent_mode="${word#vbridge.agent=}" ;;
    vbridge.agent_args=*) agent_args="$(echo "${word#vbridge.agent_args=}" | tr ',' ' ')" ;;
    vbridge.storage=*) storage="${word#vbridge.storage=}" ;;
    vbridge.dockerd=*) dockerd_mode="${word#vbridge.dockerd=}" ;;
    vbridge.docker_timeout=*) docker_timeout="${word#vbridge.docker_timeout=}" ;;
    vbridge.preload=*) preload="${word#vbridge.preload=}" ;;
    vbridge.debug=1) set -x ;;
  esac
done

say "root filesystem up (kernel $(uname -r))"
echo vbridge >/proc/sys/kernel/hostname
ip link set lo up 2>/dev/null || say "warning: could not bring up lo"
ulimit -n 1048576 2>/dev/null || ulimit -n 65536 2>/dev/null
# File watchers in containers (webpack, nodemon, cargo-watch) need many inotify watches and instances.
echo 1048576 >/proc/sys/fs/inotify/max_user_watches
echo 8192 >/proc/sys/fs/inotify/max_user_instances

# --- modules ---------------------------------------------------------------------------------------------------
# overlay: overlay2 storage; bridge/br_netfilter/veth/nf_tables: dockerd with its default networking (kept for
# users who turn it on); 9p: shares; virtio_console: the agent's port; vsock: the vsock transport; button/evdev:
# the ACPI power button; inet_diag/tcp_diag/udp_diag: the guest agent's port watcher (NETLINK_SOCK_DIAG).
modules="overlay bridge br_netfilter veth nf_tables 9pnet_virtio 9p virtio_console vmw_vsock_virtio_transport \
vsock_loopback button evdev fuse tun loop inet_diag tcp_diag udp_diag"
# One modprobe for all (each process start is slow under TCG); then report what is missing.
# shellcheck disable=SC2086 # a word list
modprobe -a -q $modules 2>/dev/null
for module in $modules; do
  [ -d "/sys/module/$module" ] || say "note: module $module not loaded"
done

# --- virtio-serial ports by name (no udev: make the /dev/virtio-ports/<name> links ourselves) -------------------
mkdir -p /dev/virtio-ports
i=0
while [ "$i" -lt 30 ]; do
  found=0
  for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] || continue
    name="$(cat "$port/name")"
    [ -n "$name" ] || continue
    ln -sfn "../${port##*/}" "/dev/virtio-ports/$name"
    found=1
  done
  [ "$found" = 1 ] && break
  i=$((i + 1))
  sleep 0.1
done
# shellcheck disable=SC2012 # port names are plain words
ports="$(ls /dev/virtio-ports 2>/dev/null | tr '\n' ' ')"
say "virtio-serial ports: ${ports:-none}"

# --- 9p shares -------------------------------------------------------------------------------------------------
if [ -n "$shares" ]; then
  for share in $(echo "$shares" | tr ',' ' '); do
    tag="${share%%:*}"
    path="${share#*:}"
    mkdir -p "$path"
    if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none,access=client "$tag" "$path"; then
      say "share $tag mounted at $path (9p)"
    else
      say "warning: share $tag could not be mounted at $path"
    fi
  done
fi

# --- power button: QEMU's system_powerdown is an ACPI power button press ----------------------------------------
for input in /sys/class/input/input*; do
  [ "$(cat "$input/name" 2>/dev/null)" = "Power Button" ] || continue
  for event in "$input"/event*; do
    [ -e "$event" ] || continue
    dev="/dev/input/${event##*/}"
    [ -c "$dev" ] || continue
    (dd if="$dev" of=/dev/null bs=24 count=1 2>/dev/null && kill -TERM 1) &
  done
done

# --- shutdown --------------------------------------------------------------------------------------------------
agent_pid=""
dockerd_pid=""
stopping=0

wait_gone() { # pid seconds
  n=0
  while kill -0 "$1" 2>/dev/null && [ "$n" -lt $(($2 * 10)) ]; do
    sleep 0.1
    n=$((n + 1))
  done
  ! kill -0 "$1" 2>/dev/null
}

shutdown() {
  [ "$stopping" = 1 ] && return
  stopping=1
  say "shutting down"
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid"
    wait_gone "$agent_pid" 5 || kill -KILL "$agent_pid" 2>/dev/null
  fi
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    kill -TERM "$dockerd_pid"
    wait_gone "$dockerd_pid" 20 || kill -KILL "$dockerd_pid" 2>/dev/null
  fi
  kill -TERM -1 2>/dev/null
  sleep 0.5
  kill -KILL -1 2>/dev/null
  sync
  awk '$3 == "9p" { print $2 }' /proc/mounts | while read -r m; do umount "$m" 2>/dev/null; done
  mount -o remount,ro / 2>/dev/null
  sync
  echo VBRIDGE_POWEROFF
  echo o >/proc/sysrq-trigger
  sleep 10
  exit 0
}
trap shutdown TERM INT USR2
# Ctrl-Alt-Del (QMP send-key) sends SIGINT to PID 1 instead of rebooting.
echo 0 >/proc/sys/kernel/ctrl-alt-del 2>/dev/null

# --- dockerd ---------------------------------------------------------------------------------------------------
docker_version=off
if [ "$dockerd_mode" != off ]; then
  say "starting dockerd (storage driver $storage)"
  dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver="$storage" \
    -H "unix://$DOCKER_SOCKET" >/var/log/dockerd.log 2>&1 &
  dockerd_pid=$!
  deadline=$(($(cut -d. -f1 /proc/uptime) + docker_timeout))
  docker_version=failed
  while [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ]; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
      say "dockerd exited; last lines of /var/log/dockerd.log:"
      tail -n 20 /var/log/dockerd.log
      break
    fi
    if [ -S "$DOCKER_SOCKET" ] && v="$(docker -H "unix://$DOCKER_SOCKET" version --format '{{.Server.Version}}' 2>/dev/null)"; then
      docker_version="$v"
      break
    fi
    sleep 0.2
  done
  if [ "$docker_version" = failed ]; then
    say "dockerd did not answer within ${docker_timeout} s; last lines of /var/log/dockerd.log:"
    tail -n 20 /var/log/dockerd.log
  else
    say "dockerd answers (version $docker_version)"
    if [ "$preload" = busybox ] && [ -f /usr/local/share/vbridge/busybox.tar ]; then
      if docker image inspect vbridge/busybox >/dev/null 2>&1 ||
        docker import /usr/local/share/vbridge/busybox.tar vbridge/busybox >/dev/null 2>&1; then
        say "image vbridge/busybox available"
      else
        say "warning: could not import vbridge/busybox"
      fi
    fi
  fi
fi

# --- guest agent -----------------------------------------------------------------------------------------------
start_agent() {
  # shellcheck disable=SC2086 # agent_args is a word list
  "$AGENT" --listen "$listen" --docker-socket "$DOCKER_SOCKET" --allow-ports $agent_args &
  agent_pid=$!
  say "agent started (pid $agent_pid): $AGENT --listen $listen --docker-socket $DOCKER_SOCKET --allow-ports $agent_args"
}

agent_state=off
if [ "$agent_mode" != off ]; then
  if [ -x "$AGENT" ]; then
    start_agent
    agent_state=running
  else
    say "agent absent: $AGENT is not in the image; booting without it"
    agent_state=absent
  fi
fi

echo "VBRIDGE_READY dockerd=$docker_version agent=$agent_state uptime=$(uptime_s)"
if [ "$docker_version" != off ] && [ "$docker_version" != failed ]; then
  docker version 2>&1 | sed 's/^/vbridge-init:   /'
fi

# --- supervise -------------------------------------------------------------------------------------------------
# `wait` on a background sleep lets trapped signals in at once and reaps orphans (containerd shims and the like).
restarts=0
while :; do
  sleep 2 &
  wait $!
  [ "$stopping" = 1 ] && continue
  if [ "$agent_state" = running ] && ! kill -0 "$agent_pid" 2>/dev/null; then
    wait "$agent_pid" 2>/dev/null
    rc=$?
    restarts=$((restarts + 1))
    pause=$((restarts < 10 ? restarts : 10))
    say "agent exited (status $rc); restart $restarts in $pause s"
    sleep "$pause"
    start_agent
  fi
done
