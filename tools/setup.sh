#!/usr/bin/env bash
# Installs everything vbridge needs to build, test and run, from Debian's archive. Idempotent.
set -euo pipefail

packages=(
  # build
  build-essential cmake ninja-build pkg-config clang clang-format clang-tidy libclang-rt-14-dev
  # libraries
  libuv1-dev liburing-dev libflatbuffers-dev flatbuffers-compiler libbenchmark-dev libgtest-dev
  libcli11-dev nlohmann-json3-dev libfmt-dev
  # real peers used by the integration suites and `vbridge bench`
  docker.io socat curl iperf3 inotify-tools bindfs openssh-server openssh-client python3
  busybox-static iproute2 procps util-linux
  # the guest VM (tools/vm): QEMU, the root filesystem builder, the guest kernel and its modules
  qemu-system-x86 debootstrap linux-image-amd64 kmod e2fsprogs
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "vbridge setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  # docker.io's maintainer scripts try to start a service; there may be no init system to start it.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "vbridge setup: all packages present"
fi
