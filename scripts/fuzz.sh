#!/usr/bin/env bash
# Build the libFuzzer harness (Fuzz/) and run it for a bounded time.
#   scripts/fuzz.sh [SECONDS]     default 30; CI runs a short bounded run
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
flags=(-c release --package-path Fuzz --scratch-path Fuzz/.build
       -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=fuzzer-no-link,address)
swift build "${flags[@]}" --product VFIOUserFuzz >/dev/null
bin="$(swift build "${flags[@]}" --show-bin-path)/VFIOUserFuzz"
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
