#!/usr/bin/env bash
# The kernel VFIO lab: boots a real Linux kernel (VFIO, vfio-pci, IOMMUFD, the VFIO device cdev,
# intel-iommu, 9p) under qemu-system-x86_64 with TCG, an emulated IOMMU and QEMU's edu device;
# shares this machine's filesystem read-only over 9p; and runs the project's own Swift kernel
# integration tests (KernelVFIOTests) inside, against the guest's /dev/vfio and /dev/iommu.
# Prints "lab: N passed, N failed" and exits non-zero on any failure.
#
#   bash scripts/lab.sh                 # build the tests if needed, boot, run
#   LAB_FILTER=KernelVFIOTests/testX bash scripts/lab.sh
#   VFIO_LIVE_LAB_KERNEL=/path/bzImage  # another kernel with the options above built in
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

kernel="${VFIO_LIVE_LAB_KERNEL:-}"
if [ -z "$kernel" ]; then
    for k in "$repo/../shared/lab/bzImage-7.3-vfio-iommufd" /work/shared/lab/bzImage-7.3-vfio-iommufd; do
        [ -f "$k" ] && { kernel="$k"; break; }
    done
fi
kernel="${kernel:-$repo/../shared/lab/bzImage-7.3-vfio-iommufd}"
if [ ! -f "$kernel" ]; then
    echo "lab: skipped: no lab kernel at $kernel (set VFIO_LIVE_LAB_KERNEL to a bzImage with VFIO, IOMMUFD, VFIO_DEVICE_CDEV, INTEL_IOMMU and 9p built in)"
    exit 0
fi
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v busybox >/dev/null || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
    echo "lab: installing ${need[*]} (Debian)"
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

tests="$repo/.build/debug/vfio-livePackageTests.xctest"
[ -x "$tests" ] || swift build --build-tests >/dev/null
filter="${LAB_FILTER:-KernelVFIOTests.KernelVFIOTests}"

work="$(mktemp -d /tmp/vfio-live-lab.XXXXXX)"
trap 'rc=$?; pkill -f "initrd $work/initrd.gz" 2>/dev/null || true; rm -rf "$work"; exit $rc' EXIT
mkdir -p "$work/root"/{bin,dev,proc,sys,mnt}
cp "$(command -v busybox)" "$work/root/bin/busybox"
cat > "$work/root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 hostfs /mnt || { echo "LAB-ERROR no 9p"; poweroff -f; }
# A writable /tmp for the tests; a checkout that lives under /tmp stays visible through a bind.
mkdir -p /hosttmp; mount --bind /mnt/tmp /hosttmp
mount -t tmpfs tmp /mnt/tmp
case "$repo" in /tmp/*) mkdir -p "/mnt$repo"; mount --bind "/hosttmp${repo#/tmp}" "/mnt$repo" ;; esac
mount --bind /dev /mnt/dev; mount --bind /proc /mnt/proc; mount --bind /sys /mnt/sys
echo "LAB-BOOTED \$(uname -r)"
chroot /mnt /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/opt/swift/usr/bin HOME=/tmp VFIO_LIVE_LAB=1 \
    ${LAB_COMMAND:-"$tests" "$filter"}
echo "LAB-EXIT \$?"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")

echo "lab: booting $(basename "$kernel") under qemu-system-x86_64 (TCG, intel-iommu, edu); running $filter inside"
log="$work/console.log"
set +e
# Single-threaded TCG: with one host thread per vCPU, this 7.3 kernel now and then panicked
# while patching its own code at boot (seen here about one run in four); single-threaded TCG
# costs a second or two and never did.
timeout "${LAB_TIMEOUT:-300}" qemu-system-x86_64 -machine q35,kernel-irqchip=split -accel tcg,thread=single -cpu max -smp 2 -m 2048 \
    -device intel-iommu,intremap=on,caching-mode=on -device edu -nodefaults -display none \
    -serial stdio -monitor none -no-reboot -kernel "$kernel" -initrd "$work/initrd.gz" \
    -virtfs local,path=/,mount_tag=hostfs,security_model=none,readonly=on,multidevs=remap \
    -append "console=ttyS0 rdinit=/init intel_iommu=on iommu=nopt panic=-1 quiet" 2>&1 | tee "$log" | grep --line-buffered -Ev '^\[ *[0-9]+\.[0-9]+\]|Test Case .* (started|passed)'
set -e
cp "$log" /tmp/vfio-live-lab-console.log
echo "lab: the guest's whole console is in /tmp/vfio-live-lab-console.log"
grep -q "LAB-BOOTED" "$log" || { echo "lab: the guest did not boot"; exit 1; }
code=$(sed -nE 's/.*LAB-EXIT ([0-9]+).*/\1/p' "$log" | tail -n 1)
summary=$(grep -E "Executed [0-9]+ tests?, with [0-9]+ failures?" "$log" | tail -n 1 || true)
total=$(sed -E 's/.*Executed ([0-9]+) tests?.*/\1/' <<<"${summary:-Executed 0 tests, with 0 failures}")
failed=$(sed -E 's/.*with ([0-9]+) failures?.*/\1/' <<<"${summary:-Executed 0 tests, with 0 failures}")
skipped=$(grep -cE "Test Case .* skipped" "$log" || true)
echo "lab: $((total - failed - skipped)) passed, ${failed} failed, ${skipped} skipped"
[ "${code:-1}" = 0 ] && [ "$failed" = 0 ] && [ "$total" -gt 0 ]
