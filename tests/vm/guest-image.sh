#!/bin/sh
# The test guest's recipe: a Debian bookworm root made with debootstrap, booted by
# QEMU with systemd as PID 1 on a pure cgroup v2 (unified) hierarchy.
#
#   guest-image.sh DEST MIRROR     (as root; about 2 minutes once the packages are fetched)
#
# Writes DEST/vmlinuz, DEST/initrd.img and DEST/guest.img (an ext4 image of the
# root).  tests/vm/owca_qemu.py runs it when this file's hash has no image in the
# cache yet, so any change here rebuilds the image.
#
# In the guest, owca-vm-job.service waits for the boot to finish, mounts the
# source tree (9p tag `owcasrc`, read-only) at /owca and the job directory (tag
# `owcajob`) at /job, runs /job/run.sh from /owca, leaves its output in
# /job/out.txt and its exit status in /job/rc, and powers the guest off.
set -eu
DEST=$1
MIRROR=$2
ROOT=$DEST/rootfs

# What the jobs need: the tools' Python dependencies and pytest from Debian (no pip in
# the guest), the kernel, and no more.  docopt-ng is not in Debian: python3-docopt is
# the original it extends, with the same API for what OWCA uses.
PACKAGES=systemd,systemd-sysv,dbus,udev,kmod,procps,iproute2,e2fsprogs,linux-image-amd64,\
python3,python3-yaml,python3-requests,python3-docopt,python3-pytest,python3-prometheus-client

rm -rf "$ROOT"
mkdir -p "$DEST"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOT" "$MIRROR"

echo owca-vm > "$ROOT/etc/hostname"
printf '/dev/vda / ext4 rw,relatime 0 1\n' > "$ROOT/etc/fstab"
printf '9p\n9pnet_virtio\n' > "$ROOT/etc/modules-load.d/owca-vm.conf"
: > "$ROOT/etc/machine-id"

cat > "$ROOT/usr/local/sbin/owca-vm-job" <<'EOF'
#!/bin/sh
# Boot finished (so that systemctl and the units a job starts behave as on a node).
systemctl is-system-running --wait >/dev/null 2>&1 || true
mkdir -p /owca /job
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,ro" owcasrc /owca && mount -t 9p -o "$opts" owcajob /job \
  || { echo "OWCA-VM: 9p mount failed" > /dev/ttyS0; systemctl --no-block poweroff; exit 1; }
echo "OWCA-VM: job starts, uptime $(cut -d' ' -f1 /proc/uptime) s" > /dev/ttyS0
cd /owca
/bin/sh /job/run.sh > /job/out.txt 2>&1
echo $? > /job/rc
sync
echo "OWCA-VM: job done, uptime $(cut -d' ' -f1 /proc/uptime) s" > /dev/ttyS0
systemctl --no-block poweroff
EOF
chmod 755 "$ROOT/usr/local/sbin/owca-vm-job"
cat > "$ROOT/etc/systemd/system/owca-vm-job.service" <<'EOF'
[Unit]
Description=Run the host's job and power off
After=basic.target systemd-modules-load.service
[Service]
Type=simple
ExecStart=/usr/local/sbin/owca-vm-job
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/owca-vm-job.service \
  "$ROOT/etc/systemd/system/multi-user.target.wants/owca-vm-job.service"
# Nothing that waits on a console, a clock server or a timer.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    e2scrub_reap.service getty@tty1.service serial-getty@ttyS0.service \
    systemd-timesyncd.service; do
  ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done

# A small initrd: only what mounting /dev/vda needs.
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$ROOT/etc/initramfs-tools/modules"
chroot "$ROOT" update-initramfs -u -k all >/dev/null
rm -f "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/*.bin

cp "$ROOT"/boot/vmlinuz-*-amd64 "$DEST/vmlinuz"
cp "$ROOT"/boot/initrd.img-*-amd64 "$DEST/initrd.img"
rm -f "$DEST/guest.img"
mkfs.ext4 -q -F -L owcaroot -d "$ROOT" "$DEST/guest.img" 2G
rm -rf "$ROOT"
