#!/usr/bin/env bash
# bench/run.sh: throughput (iperf3) and request/response latency (baton-bench
# rr), measured directly and through baton, side by side in one run, on
# loopback only. See bench/README.md for the knobs and how to read the table.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# ---- knobs (environment) ----------------------------------------------------
DURATION=${DURATION:-5}                  # seconds per iperf3 test
STREAMS=${STREAMS:-"1 8"}                # iperf3 -P values
RR_SIZES=${RR_SIZES:-"64 16384"}         # rr request/response sizes (bytes)
RR_COUNT=${RR_COUNT:-20000}              # recorded round trips per rr test
RR_WARMUP=${RR_WARMUP:-1000}             # unrecorded round trips first
ROUNDS=${ROUNDS:-1}                      # repeat each test, report the median
BENCH_DIRECT_ONLY=${BENCH_DIRECT_ONLY:-0} # 1: skip everything that needs baton
BENCH_SKIP_BUILD=${BENCH_SKIP_BUILD:-0}  # 1: use the binaries in target/release
BENCH_RESULTS=${BENCH_RESULTS:-"$ROOT/bench/results/latest.md"}
BENCH_STARTUP_TIMEOUT=${BENCH_STARTUP_TIMEOUT:-20} # seconds to wait for baton

# Ports, all on 127.0.0.1. Targets:
IPERF_PORT=${BENCH_IPERF_PORT:-5201}         # iperf3 server
ECHO_PORT=${BENCH_ECHO_PORT:-17000}          # baton-bench echo server
# baton:
GATEWAY_PORT=${BENCH_GATEWAY_PORT:-17700}    # gateway listen
IPERF_VIA_PORT=${BENCH_IPERF_VIA_PORT:-15201} # client's listener for iperf
ECHO_VIA_PORT=${BENCH_ECHO_VIA_PORT:-15000}   # client's listener for echo

HOST=127.0.0.1 # never anything but loopback
BATON=$ROOT/target/release/baton
BENCHBIN=$ROOT/target/release/baton-bench
export BATON_LOG=${BATON_LOG:-warn}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- peers ------------------------------------------------------------------
as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"; fi
}

apt_install() {
    log "installing $* (apt-get)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
        as_root apt-get update -qq >/dev/null 2>&1 || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
            || die "could not install $*"
    fi
}

command -v iperf3 >/dev/null || apt_install iperf3
command -v python3 >/dev/null || apt_install python3
command -v cargo >/dev/null || die "cargo not found"

# ---- build ------------------------------------------------------------------
if [[ $BENCH_SKIP_BUILD != 1 ]]; then
    if [[ $BENCH_DIRECT_ONLY == 1 ]]; then
        log "building baton-bench (release)"
        cargo build --release --quiet -p baton-bench
    else
        log "building baton and baton-bench (release)"
        cargo build --release --quiet -p baton -p baton-bench
    fi
fi
[[ -x $BENCHBIN ]] || die "$BENCHBIN missing"
[[ $BENCH_DIRECT_ONLY == 1 || -x $BATON ]] || die "$BATON missing"

# ---- temp dir, processes, cleanup --------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/baton-bench.XXXXXX")
PIDS=()
declare -A PIDOF=()   # name -> latest pid

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid name
    # shellcheck disable=SC2317 # reached through the EXIT trap
    if [[ -n ${FG:-} ]]; then kill "$FG" 2>/dev/null || true; fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.2
    done
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # Keep the logs and configs (not the key) of the last run for a look later.
    local logdir
    logdir="$(dirname "$BENCH_RESULTS")/logs"
    if mkdir -p "$logdir" 2>/dev/null; then
        rm -f "$logdir"/*.log "$logdir"/*.toml
        cp "$TMP"/*.log "$TMP"/*.toml "$logdir"/ 2>/dev/null || true
    fi
    if [[ $rc != 0 ]]; then
        log "logs of this run: ${logdir#"$ROOT"/}"
        for name in "${!PIDOF[@]}"; do
            if [[ -s $TMP/$name.log ]]; then
                log "---- last lines of $name.log ----"
                tail -n 20 "$TMP/$name.log" >&2 || true
            fi
        done
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: run CMD in the background, logging to $TMP/NAME.log
start() {
    local name=$1; shift
    "$@" >"$TMP/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    PIDOF[$name]=$pid
}

# run_fg CMD...: run CMD to completion, but in the background so that a signal to
# this script is handled at once (bash runs traps only between commands).
FG=
run_fg() {
    local rc=0
    "$@" &
    FG=$!
    wait "$FG" || rc=$?
    FG=
    return "$rc"
}

alive() { # alive NAME
    kill -0 "${PIDOF[$1]}" 2>/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

wait_port() { # wait_port PORT NAME SECONDS
    local port=$1 name=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        port_open "$port" && return 0
        alive "$name" || die "$name exited before $HOST:$port accepted connections"
        sleep 0.1
    done
    die "$name: $HOST:$port did not accept connections within ${secs}s"
}

check_free() { # check_free PORT WHAT ENVVAR
    if port_open "$1"; then
        die "$HOST:$1 ($2) is already in use; pick another with $3=PORT"
    fi
}

check_free "$IPERF_PORT" "iperf3 server" BENCH_IPERF_PORT
check_free "$ECHO_PORT" "echo server" BENCH_ECHO_PORT
if [[ $BENCH_DIRECT_ONLY != 1 ]]; then
    check_free "$GATEWAY_PORT" "baton gateway" BENCH_GATEWAY_PORT
    check_free "$IPERF_VIA_PORT" "baton client, iperf service" BENCH_IPERF_VIA_PORT
    check_free "$ECHO_VIA_PORT" "baton client, echo service" BENCH_ECHO_VIA_PORT
fi

# ---- targets ----------------------------------------------------------------
start_iperf_server() {
    start iperf3-server iperf3 -s -p "$IPERF_PORT" -B "$HOST" --rcv-timeout 10000
    wait_port "$IPERF_PORT" iperf3-server 10
}
start_iperf_server
start echo "$BENCHBIN" echo --listen "$HOST:$ECHO_PORT"
wait_port "$ECHO_PORT" echo 10

# ---- baton ------------------------------------------------------------------
if [[ $BENCH_DIRECT_ONLY != 1 ]]; then
    keygen_out=$("$BATON" keygen laptop --out "$TMP/laptop.key") \
        || die "baton keygen failed"
    PUBKEY=$(printf '%s\n' "$keygen_out" | sed -n 's/^key = "\(.*\)"$/\1/p' | tail -n 1)
    [[ -n $PUBKEY ]] || die "could not find 'key = \"...\"' in baton keygen output: $keygen_out"

    cat >"$TMP/gateway.toml" <<EOF
listen = ["$HOST:$GATEWAY_PORT"]
inactivity_timeout = "5m"
max_sessions = 100

[services.iperf]
target = "$HOST:$IPERF_PORT"

[services.echo]
target = "$HOST:$ECHO_PORT"

[clients.laptop]
key = "$PUBKEY"
services = ["iperf", "echo"]
EOF

    cat >"$TMP/client.toml" <<EOF
id = "laptop"
key_file = "laptop.key"

[gateways.bench]
addresses = ["$HOST:$GATEWAY_PORT"]

[services.iperf]
gateway = "bench"
listen = "$HOST:$IPERF_VIA_PORT"

[services.echo]
gateway = "bench"
listen = "$HOST:$ECHO_VIA_PORT"
EOF

    start gateway "$BATON" gateway -c "$TMP/gateway.toml"
    wait_port "$GATEWAY_PORT" gateway "$BENCH_STARTUP_TIMEOUT"
    start client "$BATON" client -c "$TMP/client.toml"
    wait_port "$IPERF_VIA_PORT" client "$BENCH_STARTUP_TIMEOUT"
    wait_port "$ECHO_VIA_PORT" client "$BENCH_STARTUP_TIMEOUT"

    # The listener may be up before the path to the gateway is: wait for a
    # real round trip through baton.
    ok=0
    for ((i = 0; i < BENCH_STARTUP_TIMEOUT * 2; i++)); do
        if "$BENCHBIN" rr --connect "$HOST:$ECHO_VIA_PORT" --size 64 --count 10 --warmup 0 \
            --timeout 2 >"$TMP/probe.log" 2>&1; then
            ok=1; break
        fi
        alive gateway || die "baton gateway exited"
        alive client || die "baton client exited"
        sleep 0.5
    done
    [[ $ok == 1 ]] || die "no echo round trip through baton within ${BENCH_STARTUP_TIMEOUT}s: $(cat "$TMP/probe.log")"
    log "baton is up: gateway $HOST:$GATEWAY_PORT, client listeners $IPERF_VIA_PORT (iperf) and $ECHO_VIA_PORT (echo)"
fi

# ---- measurements -------------------------------------------------------------
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
# cpu_busy: percentage of CPU time not idle over one second, from /proc/stat
# (unlike the load average, this does not remember our own build).
cpu_busy() {
    local a b
    a=$(head -n 1 /proc/stat 2>/dev/null) || { echo "?"; return; }
    sleep 1
    b=$(head -n 1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x); split(b, y); tot = 0
        for (i = 2; i <= n; i++) tot += y[i] - x[i]
        idle = (y[5] - x[5]) + (y[6] - x[6])
        printf "%.0f", (tot > 0 ? 100 * (tot - idle) / tot : 0) }'
}
BUSY_BEFORE=$(cpu_busy)
if [[ $BUSY_BEFORE != "?" ]] && ((BUSY_BEFORE > 20)); then
    log "warning: the CPUs are ${BUSY_BEFORE}% busy before the tests: other work on this machine will skew the numbers"
fi
ROWS=() # "test|unit|direct|baton"
FAILED=0

# Measurement functions set globals instead of printing, so that they run in
# this shell (not a $(...) subshell) and can restart the iperf3 server and
# record failures.

# iperf_bps PORT STREAMS [-R]: sets BPS to the bits/s received, or "fail"
iperf_bps() {
    local port=$1 streams=$2; shift 2
    local out=$TMP/iperf.json extra=()
    # iperf3 accepts --rcv-timeout only when the client receives (-R).
    [[ " $* " == *" -R "* ]] && extra=(--rcv-timeout 10000)
    BPS=fail
    if run_fg timeout $((DURATION + 30)) iperf3 -c "$HOST" -p "$port" -P "$streams" -t "$DURATION" \
        --connect-timeout 5000 "${extra[@]}" -J "$@" >"$out" 2>"$TMP/iperf.err" \
        && BPS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"])' "$out" 2>/dev/null); then
        return 0
    fi
    BPS=fail
    log "iperf3 -c $HOST -p $port -P $streams $* failed: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error",""))' "$out" 2>/dev/null || true) $(head -c 300 "$TMP/iperf.err")"
    FAILED=1
    # A failed test can leave the iperf3 server busy: start a fresh one.
    kill "${PIDOF[iperf3-server]}" 2>/dev/null || true
    wait "${PIDOF[iperf3-server]}" 2>/dev/null || true
    start_iperf_server
}

# rr_stats PORT SIZE: sets P50 and P99 in microseconds, or "fail"
rr_stats() {
    local port=$1 size=$2
    P50=fail P99=fail
    if run_fg "$BENCHBIN" rr --connect "$HOST:$port" --size "$size" --count "$RR_COUNT" \
        --warmup "$RR_WARMUP" --json >"$TMP/rr.json" 2>"$TMP/rr.err"; then
        read -r P50 P99 < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["p50_us"], d["p99_us"])' "$TMP/rr.json")
    else
        log "rr to $HOST:$port size $size failed: $(head -c 300 "$TMP/rr.err")"
        FAILED=1
    fi
}

via() { [[ $BENCH_DIRECT_ONLY != 1 ]]; }

# median V...: the median of the numeric arguments ("fail" ones are ignored);
# "fail" if there is none.
median() {
    python3 -c '
import statistics, sys
v = [float(x) for x in sys.argv[1:] if x not in ("fail", "skip")]
print(statistics.median(v) if v else "fail")' "$@"
}

# Each test runs ROUNDS times, direct and baton alternating, and the table
# shows the median of each side.
for p in $STREAMS; do
    for dir in up down; do
        flag=(); [[ $dir == down ]] && flag=(-R)
        name="iperf3 -P $p $dir"
        ds=() bs=()
        for ((r = 1; r <= ROUNDS; r++)); do
            tag=""; ((ROUNDS > 1)) && tag=" (round $r/$ROUNDS)"
            log "$name: direct$tag"
            iperf_bps "$IPERF_PORT" "$p" "${flag[@]}"; ds+=("$BPS")
            if via; then
                log "$name: baton$tag"
                iperf_bps "$IPERF_VIA_PORT" "$p" "${flag[@]}"; bs+=("$BPS")
            fi
        done
        d=$(median "${ds[@]}")
        b=skip; via && b=$(median "${bs[@]}")
        ROWS+=("$name|Gbit/s|$d|$b")
    done
done

for s in $RR_SIZES; do
    d50s=() d99s=() b50s=() b99s=()
    for ((r = 1; r <= ROUNDS; r++)); do
        tag=""; ((ROUNDS > 1)) && tag=" (round $r/$ROUNDS)"
        log "rr ${s}B: direct$tag"
        rr_stats "$ECHO_PORT" "$s"; d50s+=("$P50"); d99s+=("$P99")
        if via; then
            log "rr ${s}B: baton$tag"
            rr_stats "$ECHO_VIA_PORT" "$s"; b50s+=("$P50"); b99s+=("$P99")
        fi
    done
    b50=skip b99=skip
    via && { b50=$(median "${b50s[@]}"); b99=$(median "${b99s[@]}"); }
    ROWS+=("rr ${s}B p50|us|$(median "${d50s[@]}")|$b50")
    ROWS+=("rr ${s}B p99|us|$(median "${d99s[@]}")|$b99")
done


# ---- table --------------------------------------------------------------------
fmt_val() { # fmt_val UNIT VALUE
    case $2 in
        fail|skip) echo "$2" ;;
        *) if [[ $1 == Gbit/s ]]; then awk -v v="$2" -v u="$1" 'BEGIN{printf "%.2f %s", v/1e9, u}'
           else awk -v v="$2" -v u="$1" 'BEGIN{printf "%.1f %s", v, u}'; fi ;;
    esac
}
ratio() { # ratio DIRECT BATON
    case "$1$2" in *fail*|*skip*) echo "-"; return ;; esac
    awk -v d="$1" -v b="$2" 'BEGIN{ if (d > 0) printf "%.2f", b/d; else print "-" }'
}

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null || true) ]]; then REV="$REV (dirty)"; fi
STAMP=$(date -u +%Y-%m-%dT%H:%M:%SZ)

mkdir -p "$(dirname "$BENCH_RESULTS")"
{
    echo "# baton benchmark"
    echo
    echo "- date: $STAMP"
    echo "- commit: $REV"
    echo "- machine: $(nproc) cores, $(uname -sr); CPUs ${BUSY_BEFORE}% busy just before the tests"
    echo "- iperf3: $(iperf3 --version 2>/dev/null | head -n 1), ${DURATION}s per test"
    echo "- rr: $RR_COUNT round trips after $RR_WARMUP warm-up, one connection, TCP_NODELAY"
    if ((ROUNDS > 1)); then echo "- each value is the median of $ROUNDS rounds, direct and baton alternating"; fi
    echo "- ratio = baton / direct (throughput: higher is better; latency: lower is better)"
    echo
    echo "| test | direct | baton | ratio |"
    echo "| --- | ---: | ---: | ---: |"
} >"$BENCH_RESULTS"

echo
printf '%-22s %14s %14s %8s\n' test direct baton ratio
printf '%-22s %14s %14s %8s\n' ---- ------ ----- -----
for row in "${ROWS[@]}"; do
    IFS='|' read -r name unit d b <<<"$row"
    fd=$(fmt_val "$unit" "$d"); fb=$(fmt_val "$unit" "$b"); r=$(ratio "$d" "$b")
    printf '%-22s %14s %14s %8s\n' "$name" "$fd" "$fb" "$r"
    echo "| $name | $fd | $fb | $r |" >>"$BENCH_RESULTS"
done
echo
log "table written to ${BENCH_RESULTS#"$ROOT"/}"

if [[ $FAILED != 0 ]]; then
    die "some measurements failed (see above)"
fi
