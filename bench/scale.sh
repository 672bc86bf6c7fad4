#!/usr/bin/env bash
# bench/scale.sh: one gateway holding many sessions and idle streams, and
# storms of clients switching at once (baton-bench scale), on loopback only.
# See bench/README.md.
#
# The sessions run: SESSIONS sessions, STREAMS streams spread over them, a
# storm and a burst of STORM clients switching. baton-bench spreads the load
# generator, the targets and the gateway (its `workers`) over as many
# processes as their open-files limits need. Only when something capped the
# streams (WORKERS, PARTS or HOLDS given too small, or a machine-wide limit)
# does a second run, the streams run, hold as many streams as fit on fewer
# sessions, so that the memory per idle stream is measured on thousands of
# streams either way.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SESSIONS=${SESSIONS:-10000}
STREAMS=${STREAMS:-100000}
STORM=${STORM:-1000}
DENSE_SESSIONS=${DENSE_SESSIONS:-1000}   # sessions of the streams run
# Process counts (empty: as many as the open-files limit needs). WORKERS=1
# runs one gateway process, for a gateway without `workers`.
PARTS=${PARTS:-}
HOLDS=${HOLDS:-}
WORKERS=${WORKERS:-}
BENCH_SKIP_BUILD=${BENCH_SKIP_BUILD:-0}
OUT=${BENCH_SCALE_RESULTS:-"$ROOT/bench/results/scale.md"}
export BATON_LOG=${BATON_LOG:-warn}

log() { printf '[scale] %s\n' "$*" >&2; }

if [[ $BENCH_SKIP_BUILD != 1 ]]; then
    log "building baton and baton-bench (release)"
    cargo build --release --quiet -p baton -p baton-bench
fi
BENCHBIN=$ROOT/target/release/baton-bench

# The limit is per process and inherited: take the hard limit if we may.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open-files limit: $(ulimit -n) (hard $(ulimit -Hn)) per process; a gateway process needs one per session and two per stream"

procs=()
[[ -n $PARTS ]] && procs+=(--parts "$PARTS")
[[ -n $HOLDS ]] && procs+=(--holds "$HOLDS")
[[ -n $WORKERS ]] && procs+=(--workers "$WORKERS")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/baton-scale.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

"$BENCHBIN" scale --sessions "$SESSIONS" --streams "$STREAMS" --storm "$STORM" "${procs[@]}" --out "$TMP/sessions.md" | tee "$TMP/sessions.out"
cat "$TMP/sessions.md" >"$TMP/all.md"

# Streams per session the first run could hold.
held=$(sed -n 's/^| idle streams held | \([0-9]*\) .*/\1/p' "$TMP/sessions.md")
if [[ -n $held ]] && ((held < STREAMS)) && ((DENSE_SESSIONS < SESSIONS)); then
    log "streams were capped at $held: a second run with $DENSE_SESSIONS sessions and as many streams as fit"
    "$BENCHBIN" scale --sessions "$DENSE_SESSIONS" --streams "$STREAMS" --storm "$STORM" --no-burst "${procs[@]}" --out "$TMP/dense.md"
    { echo; echo "## Streams run ($DENSE_SESSIONS sessions)"; echo; sed '1,/^$/d' "$TMP/dense.md"; } >>"$TMP/all.md"
fi

mkdir -p "$(dirname "$OUT")"
cp "$TMP/all.md" "$OUT"
log "tables written to ${OUT#"$ROOT"/}"
