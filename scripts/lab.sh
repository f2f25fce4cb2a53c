#!/usr/bin/env bash
# The kernel VFIO lab: boots a real Linux kernel (VFIO, vfio-pci, IOMMUFD, the VFIO device cdev,
# intel-iommu, 9p) under qemu-system-x86_64 with TCG and an emulated IOMMU; shares this machine's
# filesystem read-only over 9p; and runs the project's own Swift kernel integration tests
# (KernelVFIOTests) inside, against the guest's /dev/vfio and /dev/iommu. The device the guest
# assigns to itself is one of:
#
#   edu                 QEMU's edu, under Debian's QEMU (7.2 here)            (the default)
#   dma-engine-shared   our dma-engine, served on the host by `vfio-live device serve` and
#                       realized by QEMU 11.1's vfio-user-pci; guest RAM is a shared memfd,
#                       so the server DMAs into guest RAM through the fd QEMU sends with DMA_MAP
#   dma-engine-message  the same with private guest RAM: QEMU maps without an fd and every
#                       device DMA travels as DMA_READ / DMA_WRITE messages to QEMU
#
# With dma-engine, a guest DMA goes guest vfio-pci → intel-iommu → QEMU's vfio-user client →
# our server → guest RAM. QEMU 11.1 comes from scripts/qemu11.sh; without it those runs skip
# and say why. Prints "lab: N passed, N failed, N skipped" and exits non-zero on any failure.
#
#   bash scripts/lab.sh [edu|dma-engine-shared|dma-engine-message]
#   LAB_FILTER=KernelVFIOTests/testX bash scripts/lab.sh
#   VFIO_LIVE_LAB_KERNEL=/path/bzImage  # another kernel with the options above built in
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
variant="${1:-${LAB_DEVICE:-edu}}"
case "$variant" in
    edu | dma-engine-shared | dma-engine-message) ;;
    *) echo "lab: unknown device '$variant' (edu, dma-engine-shared or dma-engine-message)" >&2; exit 2 ;;
esac

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
if [ "$variant" = edu ]; then
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    qemu=(qemu-system-x86_64)
else
    why="$(bash "$repo/scripts/qemu11.sh" --check 2>&1)" || { echo "lab: skipped ($variant): $why"; exit 0; }
    qemu=(bash "$repo/scripts/qemu11.sh")
fi
command -v busybox >/dev/null || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
    echo "lab: installing ${need[*]} (Debian)"
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

tests="$repo/.build/debug/vfio-livePackageTests.xctest"
[ -x "$tests" ] && [ -x "$repo/.build/debug/vfio-live" ] || swift build --build-tests >/dev/null
# Every lab class of the KernelVFIOTests module (XCTest on Linux filters by class, not by
# module, so they are listed); BenchJSONTests and BenchScaleTests are host tests of the benchmarks, not lab ones.
lab_classes=$("$tests" --list-tests 2>/dev/null | sed -nE 's#^(KernelVFIOTests\.[A-Za-z0-9_]+)/.*#\1#p' | grep -vE '\.(BenchJSONTests|BenchScaleTests)$' | sort -u | paste -sd, - || true)
filter="${LAB_FILTER:-${lab_classes:-KernelVFIOTests.KernelVFIOTests}}"

work="$(mktemp -d /tmp/vfio-live-lab.XXXXXX)"
qpid="" spid=""
trap 'rc=$?; for p in $qpid $spid; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; exit $rc' EXIT
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
chroot /mnt /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/opt/swift/usr/bin HOME=/tmp VFIO_LIVE_LAB=1 VFIO_LIVE_LAB_DEVICE=$variant \
    ${LAB_COMMAND:-"$tests" "$filter"}
echo "LAB-EXIT \$?"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")

log="$work/console.log"
device=(-device edu)
if [ "$variant" != edu ]; then
    # Our device server on the host: the guest's device is this process.
    sock="$work/dma-engine.sock"
    "$repo/.build/debug/vfio-live" device serve --device dma-engine --socket "$sock" >"$work/server.log" 2>&1 &
    spid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
    [ -S "$sock" ] || { echo "lab: the device server did not start:"; cat "$work/server.log"; exit 1; }
    # QEMU traces each request our server sends it (DMA_READ / DMA_WRITE): proof of the DMA path.
    device=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$sock\"}}"
            -trace vfio_user_recv_request -D "$work/qemu-trace.log")
    # Shared guest RAM: QEMU sends its fd with each DMA_MAP. Private RAM: no fd, DMA by message.
    if [ "$variant" = dma-engine-shared ]; then
        device=(-object memory-backend-memfd,id=mem,size=2048M,share=on -machine memory-backend=mem "${device[@]}")
    else
        device=(-object memory-backend-ram,id=mem,size=2048M,share=off -machine memory-backend=mem "${device[@]}")
    fi
fi
echo "lab: booting $(basename "$kernel") under $("${qemu[@]}" --version | head -n 1) (TCG, intel-iommu, $variant); running $filter inside"
set +e
# Single-threaded TCG: with one host thread per vCPU, this 7.3 kernel now and then panicked
# while patching its own code at boot (seen here about one run in four); single-threaded TCG
# costs a second or two and never did.
timeout "${LAB_TIMEOUT:-900}" "${qemu[@]}" -machine q35,kernel-irqchip=split -accel tcg,thread=single -cpu max -smp 2 -m 2048 \
    -device intel-iommu,intremap=on,caching-mode=on "${device[@]}" -nodefaults -display none \
    -serial stdio -monitor none -no-reboot -kernel "$kernel" -initrd "$work/initrd.gz" \
    -virtfs local,path=/,mount_tag=hostfs,security_model=none,readonly=on,multidevs=remap \
    -append "console=ttyS0 rdinit=/init intel_iommu=on iommu=nopt panic=-1 no_timer_check quiet" </dev/null >"$log" 2>&1 &
qpid=$!
tail -n +1 --pid=$qpid -f "$log" | grep --line-buffered -Ev '^\[ *[0-9]+\.[0-9]+\]|Test Case .* (started|passed)'
wait $qpid
qpid=""
set -e
cp "$log" "/tmp/vfio-live-lab-console-$variant.log"
echo "lab: the guest's whole console is in /tmp/vfio-live-lab-console-$variant.log"
path_error=""
if [ -n "$spid" ]; then
    kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; spid=""
    cp "$work/server.log" "/tmp/vfio-live-lab-server-$variant.log"
    echo "lab: the device server's log is in /tmp/vfio-live-lab-server-$variant.log"
    dma_messages=$(grep -cE "vfio_user_recv_request.*command 0x(b|c)\b" "$work/qemu-trace.log" 2>/dev/null || true)
    echo "lab: DMA_READ / DMA_WRITE requests from our server to QEMU: ${dma_messages:-0}"
    if [ "$variant" = dma-engine-shared ] && [ "${dma_messages:-0}" != 0 ]; then
        path_error="with shared guest RAM every device DMA must go through the DMA_MAP fd, not by message"
    fi
    if [ "$variant" = dma-engine-message ] && [ "${dma_messages:-0}" = 0 ]; then
        path_error="with private guest RAM the device DMA must travel as DMA_READ / DMA_WRITE messages, and none was seen"
    fi
fi
grep -q "LAB-BOOTED" "$log" || { echo "lab: the guest did not boot"; exit 1; }
code=$(sed -nE 's/.*LAB-EXIT ([0-9]+).*/\1/p' "$log" | tail -n 1)
summary=$(grep -E "Executed [0-9]+ tests?, with .*[0-9]+ failures?" "$log" | tail -n 1 || true)
total=$(sed -E 's/.*Executed ([0-9]+) tests?.*/\1/' <<<"${summary:-Executed 0 tests, with 0 failures}")
# XCTest's "N failures" counts failed assertions; the tests that failed are the ones named.
failed=$(grep -cE "Test Case .* failed \(" "$log" || true)
skipped=$(grep -cE "Test Case .* skipped" "$log" || true)
echo "lab ($variant): $((total - failed - skipped)) passed, ${failed} failed, ${skipped} skipped"
[ -z "$path_error" ] || { echo "lab: FAILED: $path_error"; exit 1; }
[ "${code:-1}" = 0 ] && [ "$failed" = 0 ] && [ "$total" -gt 0 ]
