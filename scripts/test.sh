#!/usr/bin/env bash
# The README's test command: installs what the tests need, builds, fuzzes briefly, prints the
# benchmark figures (never asserted), and runs every test. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

command -v swift >/dev/null || { echo "swift is not installed: vfio-live needs the Swift 6 toolchain (swift.org)" >&2; exit 2; }
# Tools the test run uses from Debian's packages (installed only if missing).
need=()
command -v git >/dev/null || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"
    else sudo apt-get update -qq && sudo apt-get install -y -qq "${need[@]}"; fi
fi
# Python's qemu.qmp drives the QMP interoperability test.
if ! python3 -c "import qemu.qmp" 2>/dev/null; then
    say "installing qemu.qmp (PyPI) for the QMP interoperability test"
    python3 -m pip install -q qemu.qmp 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
# QEMU 11.1 (trixie-backports, in its own debootstrap root): the vfio-user-pci client of the
# dma-engine lab runs and the peer in the benchmarks. Without it (no network) those skip and say why.
say "QEMU 11.1 (scripts/qemu11.sh --install)"
bash scripts/qemu11.sh --install || echo "QEMU 11.1: not installed, so the dma-engine lab runs and QEMU's bench figures skip"
if [ -e /dev/kvm ]; then echo "KVM: /dev/kvm present"; else echo "KVM: /dev/kvm missing (tests that need it skip and say so)"; fi

say "build (debug, with tests)"
swift build --build-tests 2>&1 | grep -Ev '^\[[0-9]+/[0-9]+\]' || true
swift build --build-tests >/dev/null  # fail here, with the error above, if the build failed

say "fuzz: vfio-user decoders and dma-engine state loader (${FUZZ_SECONDS:-30} s, libFuzzer + ASan)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"

say "benchmarks (figures beside same-run references; informative, never asserted)"
swift build -c release --product vfio-live 2>&1 | grep -E 'error|warning: unre' || true
swift build -c release --product vfio-live >/dev/null
.build/release/vfio-live bench vfio-user --iterations 5000 --dma-size 32M
.build/release/vfio-live bench device-state --state-size 64M
.build/release/vfio-live bench vm --memory 512M
.build/release/vfio-live bench migration --memory 256M
.build/release/vfio-live bench update --sizes 256M,1G,4G --repeat 3

say "tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
swift test --skip-build --disable-swift-testing 2>&1 | tee "$log" | grep -Ev '^(Test Case .* (started|passed)|info: )'
status=${PIPESTATUS[0]}
set -e
# The last "Executed N tests, with [K tests skipped and] M failures" line is the whole run's.
summary=$(grep -E "^[[:space:]]*Executed [0-9]+ tests?, with .*[0-9]+ failures?" "$log" | tail -n 1)
total=$(sed -E 's/.*Executed ([0-9]+) tests?.*/\1/' <<<"$summary")
# XCTest's "M failures" counts failed assertions; count the failed test cases instead.
failed=$(grep -cE "^Test Case .* failed" "$log" || true)
skipped=$(grep -cE "^Test Case .* skipped" "$log" || true)

# Three boots: QEMU's edu under Debian's QEMU; our dma-engine under QEMU 11.1's vfio-user-pci
# with shared guest RAM (DMA by fd) and with private guest RAM (DMA by message).
lab_status=0 lab_passed=0 lab_failed=0 lab_skipped=0
for lab_device in edu dma-engine-shared dma-engine-message; do
    say "kernel VFIO lab ($lab_device): the KernelVFIOTests inside a Linux guest with VFIO, IOMMUFD and intel-iommu"
    set +e
    bash scripts/lab.sh "$lab_device" | tee "$log.lab"
    st=${PIPESTATUS[0]}
    set -e
    [ "$st" = 0 ] || lab_status=$st
    lab_line=$(grep -E "^lab( \([a-z-]+\))?: [0-9]+ passed" "$log.lab" | tail -n 1 || true)
    lab_passed=$((lab_passed + $(sed -nE 's/^lab[^:]*: ([0-9]+) passed.*/\1/p' <<<"$lab_line" | grep . || echo 0)))
    lab_failed=$((lab_failed + $(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$lab_line" | grep . || echo 0)))
    lab_skipped=$((lab_skipped + $(sed -nE 's/.* ([0-9]+) skipped.*/\1/p' <<<"$lab_line" | grep . || echo 0)))
    rm -f "$log.lab"
done
echo ""
echo "unit and process tests: $((total - failed - skipped)) passed, ${failed} failed, ${skipped} skipped"
echo "kernel lab tests:       ${lab_passed} passed, ${lab_failed} failed, ${lab_skipped} skipped"
echo "tests: $((total - failed - skipped + lab_passed)) passed, $((failed + lab_failed)) failed, $((skipped + lab_skipped)) skipped"
[ "$status" = 0 ] && [ "$lab_status" = 0 ]
