#!/bin/busybox sh
# /init of the vbridge guest's initramfs (busybox-static). Loads the modules listed in /etc/vbridge/modules
# (virtio, virtio_blk, ext4 and their dependencies, in `modprobe --show-depends` order), mounts the root disk
# and hands over to the root filesystem's /sbin/vbridge-init.
#
# Kernel command line:
#   root=/dev/vda          the root disk (default /dev/vda)
#   vbridge.probe=1        print VBRIDGE_PROBE_OK and power off (used to test whether an accelerator works)
#   vbridge.init=PATH      the root filesystem's init (default /sbin/vbridge-init)
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "vbridge-initramfs: [$(cut -d' ' -f1 /proc/uptime)s] $*"; }
fail() {
  echo "VBRIDGE_FAILED initramfs: $*"
  sync
  poweroff -f
  sleep 5
  exit 1
}

root=/dev/vda
probe=0
init=/sbin/vbridge-init
# shellcheck disable=SC2013 # the command line is one line of words
for word in $(cat /proc/cmdline); do
  case "$word" in
    root=*) root="${word#root=}" ;;
    vbridge.probe=1) probe=1 ;;
    vbridge.init=*) init="${word#vbridge.init=}" ;;
  esac
done

if [ "$probe" = 1 ]; then
  echo "VBRIDGE_PROBE_OK $(cut -d' ' -f1 /proc/uptime)"
  poweroff -f
  sleep 5
  exit 0
fi

say "kernel $(uname -r) up; loading modules"
while read -r module; do
  [ -n "$module" ] || continue
  insmod "/lib/modules/$module" 2>/dev/null || true
done </etc/vbridge/modules

i=0
while [ ! -b "$root" ]; do
  i=$((i + 1))
  [ "$i" -le 100 ] || fail "root disk $root did not appear within 10 s (is the disk attached with if=virtio?)"
  sleep 0.1
done

mount -t ext4 -o rw,noatime "$root" /newroot || fail "cannot mount $root as ext4"
[ -x "/newroot$init" ] || fail "$init is missing on the root disk"
say "root disk $root mounted; starting $init"

mount --move /dev /newroot/dev 2>/dev/null || true
umount /sys /proc
exec switch_root /newroot "$init"
