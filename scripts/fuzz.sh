#!/usr/bin/env bash
# Build the libFuzzer harnesses (Fuzz/) and run each for a bounded time.
#   scripts/fuzz.sh [SECONDS]     decoder fuzzer, default 30; CI runs a short bounded run
# Then the stateful server fuzzer (a real server and dma-engine driven through command
# sequences with fds attached) for FUZZ_STATEFUL_SECONDS (default 30). A longer hunt:
#   FUZZ_STATEFUL_SECONDS=1800 FUZZ_STATEFUL_CORPUS=Fuzz/corpus-stateful scripts/fuzz.sh 0
# keeps its corpus, and any crash is left as ./crash-* (replay: Fuzz/.build/release/ServerFuzz FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
flags=(-c release --package-path Fuzz --scratch-path Fuzz/.build
       -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=fuzzer-no-link,address)
# Quiet when it builds; the whole log when it does not (swift build reports errors on stdout).
build() {
    local log
    log="$(mktemp)"
    if ! swift build "${flags[@]}" --product "$1" >"$log" 2>&1; then
        echo "fuzz: building $1 failed:" >&2
        grep -E "error:|warning:" "$log" >&2 || cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}
build VFIOUserFuzz
build ServerFuzz
bindir="$(swift build "${flags[@]}" --show-bin-path)"
bin="$bindir/VFIOUserFuzz"
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
# Seeds: a valid REGION_READ, a region-info reply with caps, a state header record.
printf '\x00\x01\x00\x09\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00' > "$corpus/region-read"
printf '\x01\x50\x00\x00\x00\x0f\x00\x00\x00\x04\x00\x00\x00\x20\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00' > "$corpus/region-info"
printf '\x02\x44\x4d\x41\x45\x01\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' > "$corpus/state"
# A migration stream seed: selector 3, header, a CONFIG section for 1 MiB and no devices.
printf '\x03VLMIGRAT\x00\x00\x00\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x14\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' > "$corpus/migration-stream"
# A CPR state seed: selector 4, magic "VLCP", version 1, no descriptors, no records, empty body.
printf '\x04VLCP\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' > "$corpus/cpr-state"
echo "fuzzing the vfio-user decoders, the dma-engine state loader, the migration stream decoder and the CPR state for ${seconds}s"
"$bin" -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$corpus" 2>&1 | tail -n 12
stateful_seconds="${FUZZ_STATEFUL_SECONDS:-30}"
scorpus="${FUZZ_STATEFUL_CORPUS:-$corpus/stateful}"
mkdir -p "$scorpus"
# Seeds: VERSION with a twin socket, an fd-less DMA_MAP, a DMA job, SET STOP; and one without a twin.
printf '\x03\x01\x00\x01\x00\x00\x10\x02\x04\x00\x00\x04\x01\x00\x00\x05\x02\x00\x01\x04\x03\x04\x0f\x10\x00' > "$scorpus/seed-twin"
printf '\x02\x01\x01\x01\x00\x01\x04\x00\x00\x04\x01\x00\x00\x05\x02\x00\x01\x04\x03\x00\x08\x01\x01\x01\x01\x00' > "$scorpus/seed-notwin"
echo "fuzzing the vfio-user server statefully (command sequences over a socket pair) for ${stateful_seconds}s"
"$bindir/ServerFuzz" -max_total_time="$stateful_seconds" -max_len=2048 -len_control=0 -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 "$scorpus" 2>&1 | tail -n 8
