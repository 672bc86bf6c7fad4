#!/usr/bin/env bash
# bench/run.sh: throughput (iperf3), CPU per gigabyte and request/response
# latency (baton-bench rr), measured directly, through baton, through two
# chained HAProxy processes and through two chained socat processes, side by
# side in one run, on loopback only; optionally (PEERS=... splice) through two
# chained splice-only relays, the cheapest two hops can be. See bench/README.md for the knobs and how
# to read the tables.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# ---- knobs (environment) ----------------------------------------------------
DURATION=${DURATION:-5}                  # seconds per iperf3 test
STREAMS=${STREAMS-"1 8"}                 # iperf3 -P values ("" for none)
PACED=${PACED-2}                         # Gbit/s: also 8 streams paced to this total rate ("" for none)
RR_SIZES=${RR_SIZES:-"64 16384"}         # rr request/response sizes (bytes)
RR_COUNT=${RR_COUNT:-20000}              # recorded round trips per rr test
RR_WARMUP=${RR_WARMUP:-1000}             # unrecorded round trips first
RR_CHUNK=${RR_CHUNK:-500}                # rr: the peers take turns, this many round trips each
ROUNDS=${ROUNDS:-1}                      # repeat each test, report the median
PEERS=${PEERS:-"direct baton haproxy socat"} # what to measure ("direct" is always measured; "splice" and "baton-b" on request)
BATON_B=${BATON_B:-}                     # peer baton-b: another build of baton (path to its binary; default: this one)
BATON_B_CONFIG=${BATON_B_CONFIG:-}       # peer baton-b: top-level lines added to both its configs (e.g. 'replay_buffer = "1MiB"')
BENCH_DIRECT_ONLY=${BENCH_DIRECT_ONLY:-0} # 1: same as PEERS=direct
HAPROXY_NBTHREAD=${HAPROXY_NBTHREAD:-}   # threads per HAProxy process (empty: one per core it may run on, as baton's runtime)
SOCAT_BUF=${SOCAT_BUF:-8192}             # socat -b (8192 is socat's default)
BATON_THREADS=${BATON_THREADS:-}         # `threads` of both baton processes (empty: baton's default, one per core)
PLACEMENT=${PLACEMENT:-hosts}            # hosts: client side and server side each on its own half of the cores; free: the scheduler's choice
BENCH_SKIP_BUILD=${BENCH_SKIP_BUILD:-0}  # 1: use the binaries in target/release
BENCH_RESULTS=${BENCH_RESULTS:-"$ROOT/bench/results/latest.md"}
BENCH_STARTUP_TIMEOUT=${BENCH_STARTUP_TIMEOUT:-20} # seconds to wait for the relays

# Ports, all on 127.0.0.1. Targets:
IPERF_PORT=${BENCH_IPERF_PORT:-5201}         # iperf3 server
ECHO_PORT=${BENCH_ECHO_PORT:-17000}          # baton-bench echo server
# baton:
GATEWAY_PORT=${BENCH_GATEWAY_PORT:-17700}    # gateway listen
IPERF_VIA_PORT=${BENCH_IPERF_VIA_PORT:-15201} # client's listener for iperf
ECHO_VIA_PORT=${BENCH_ECHO_VIA_PORT:-15000}   # client's listener for echo
GATEWAY_B_PORT=${BENCH_GATEWAY_B_PORT:-17701}    # the same three for baton-b
IPERF_VIA_B_PORT=${BENCH_IPERF_VIA_B_PORT:-15241}
ECHO_VIA_B_PORT=${BENCH_ECHO_VIA_B_PORT:-15040}
# The peers: first hop's listeners; the second hop listens on the next port.
HAPROXY_IPERF_PORT=${BENCH_HAPROXY_IPERF_PORT:-15211} # and 15212
HAPROXY_ECHO_PORT=${BENCH_HAPROXY_ECHO_PORT:-15010}   # and 15011
SOCAT_IPERF_PORT=${BENCH_SOCAT_IPERF_PORT:-15221}     # and 15222
SOCAT_ECHO_PORT=${BENCH_SOCAT_ECHO_PORT:-15020}       # and 15021
SPLICE_IPERF_PORT=${BENCH_SPLICE_IPERF_PORT:-15231}   # and 15232
SPLICE_ECHO_PORT=${BENCH_SPLICE_ECHO_PORT:-15030}     # and 15031

HOST=127.0.0.1 # never anything but loopback
BATON=$ROOT/target/release/baton
BENCHBIN=$ROOT/target/release/baton-bench
export BATON_LOG=${BATON_LOG:-warn}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $BENCH_DIRECT_ONLY == 1 ]] && PEERS=direct
[[ -z $BATON_THREADS || $BATON_THREADS =~ ^[1-9][0-9]*$ ]] || die "BATON_THREADS must be a positive integer (or empty)"
[[ -z $HAPROXY_NBTHREAD || $HAPROXY_NBTHREAD =~ ^[1-9][0-9]*$ ]] || die "HAPROXY_NBTHREAD must be a positive integer (or empty)"
has_peer() { [[ " $PEERS " == *" $1 "* ]]; }

# Placement. One machine stands in for two hosts: the client's (iperf3's
# client, rr, the agent, each peer's first hop) and the server's (iperf3's
# server, the echo server, the gateway, each peer's second hop). With
# "hosts" each side runs on its own half of the cores (`taskset`), every peer
# alike, as it would on two machines; with "free" the scheduler places all of
# them, and on two cores a relay's throughput then also depends on whether it
# lands next to the process it feeds (bench/README.md, finding 25).
# ON_CLIENT / ON_SERVER: the prefix that puts a command on that side's cores.
ON_CLIENT=() ON_SERVER=()
case $PLACEMENT in
    free) CLIENT_CPUS="" SERVER_CPUS="" ;;
    hosts)
        ncpu=$(nproc)
        ((ncpu >= 2)) || die "PLACEMENT=hosts needs at least 2 cores (this machine has $ncpu); use PLACEMENT=free"
        command -v taskset >/dev/null || die "PLACEMENT=hosts needs taskset (util-linux); use PLACEMENT=free"
        SERVER_CPUS="0-$((ncpu / 2 - 1))" CLIENT_CPUS="$((ncpu / 2))-$((ncpu - 1))"
        ON_CLIENT=(taskset -c "$CLIENT_CPUS") ON_SERVER=(taskset -c "$SERVER_CPUS")
        ;;
    *) die "PLACEMENT must be hosts or free (not '$PLACEMENT')" ;;
esac
# baton's runtime starts a thread per core its process may run on; HAProxy
# gets the same unless told otherwise (nbthread larger than its cores would
# only make its threads take turns).
if [[ -z $HAPROXY_NBTHREAD ]]; then
    if [[ $PLACEMENT == hosts ]]; then HAPROXY_NBTHREAD=$((ncpu / 2)); else HAPROXY_NBTHREAD=$(nproc); fi
fi
for p in $PEERS; do
    case $p in direct|baton|baton-b|haproxy|socat|splice) ;; *) die "unknown peer '$p' in PEERS (direct baton baton-b haproxy socat splice)" ;; esac
done
# baton-b is baton again, another build or configuration, measured in the same
# rounds: an A/B comparison that the machine's drift between runs cannot blur.
if has_peer baton-b; then
    has_peer baton || die "PEERS: baton-b is compared with baton; add baton"
    [[ -n $BATON_B || -n $BATON_B_CONFIG ]] || die "peer baton-b needs BATON_B (another baton binary) or BATON_B_CONFIG (config lines), or both"
fi
# Measurement order: direct first, then the relays.
ORDER=(direct)
for p in baton baton-b haproxy socat splice; do has_peer "$p" && ORDER+=("$p"); done

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
# Debian puts haproxy in /usr/sbin, which a non-root PATH may lack.
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
if has_peer haproxy && [[ ! -x $HAPROXY ]]; then
    # The package's service is not wanted: only our own processes run.
    apt_install haproxy
    HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
    [[ -x $HAPROXY ]] || die "haproxy not found after installing it"
fi
if has_peer socat && ! command -v socat >/dev/null; then apt_install socat; fi
command -v cargo >/dev/null || [[ $BENCH_SKIP_BUILD == 1 ]] || die "cargo not found"

# ---- build ------------------------------------------------------------------
if [[ $BENCH_SKIP_BUILD != 1 ]]; then
    if has_peer baton; then
        log "building baton and baton-bench (release)"
        cargo build --release --quiet -p baton -p baton-bench
    else
        log "building baton-bench (release)"
        cargo build --release --quiet -p baton-bench
    fi
fi
[[ -x $BENCHBIN ]] || die "$BENCHBIN missing"
! has_peer baton || [[ -x $BATON ]] || die "$BATON missing"
BATON_B=${BATON_B:-$BATON}
! has_peer baton-b || [[ -x $BATON_B ]] || die "BATON_B: $BATON_B is not an executable"

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
    # socat forks a child per connection; the children die with their
    # connections, which end when the processes below do.
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
        rm -f "$logdir"/*.log "$logdir"/*.toml "$logdir"/*.cfg "$logdir"/results.tsv
        # results.tsv holds every round's value, not only the medians shown.
        cp "$TMP"/*.log "$TMP"/*.toml "$TMP"/*.cfg "$TMP"/results.tsv "$logdir"/ 2>/dev/null || true
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

# listening PORT: whether a socket listens on HOST:PORT, read from
# /proc/net/tcp rather than by connecting: a probe connection to a baton
# client's listener would open a stream (and, through it, a connection to the
# target that a one-client server such as iperf3 would then wait on), and one
# to socat would leave a forked child behind.
# A wildcard listener (0.0.0.0) counts too: it holds the port on 127.0.0.1.
listening() {
    local port
    port=$(printf '%04X' "$1")
    awk -v p="$port" '($2 == "0100007F:" p || $2 == "00000000:" p) && $4 == "0A" { found = 1 }
        END { exit !found }' /proc/net/tcp
}

wait_port() { # wait_port PORT NAME SECONDS
    local port=$1 name=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        listening "$port" && return 0
        alive "$name" || die "$name exited before $HOST:$port listened"
        sleep 0.1
    done
    die "$name: $HOST:$port did not listen within ${secs}s"
}

check_free() { # check_free PORT WHAT ENVVAR
    if listening "$1"; then
        die "$HOST:$1 ($2) is already in use; pick another with $3=PORT"
    fi
}

check_free "$IPERF_PORT" "iperf3 server" BENCH_IPERF_PORT
check_free "$ECHO_PORT" "echo server" BENCH_ECHO_PORT
if has_peer baton; then
    check_free "$GATEWAY_PORT" "baton gateway" BENCH_GATEWAY_PORT
    check_free "$IPERF_VIA_PORT" "baton client, iperf service" BENCH_IPERF_VIA_PORT
    check_free "$ECHO_VIA_PORT" "baton client, echo service" BENCH_ECHO_VIA_PORT
fi
if has_peer baton-b; then
    check_free "$GATEWAY_B_PORT" "baton-b gateway" BENCH_GATEWAY_B_PORT
    check_free "$IPERF_VIA_B_PORT" "baton-b client, iperf service" BENCH_IPERF_VIA_B_PORT
    check_free "$ECHO_VIA_B_PORT" "baton-b client, echo service" BENCH_ECHO_VIA_B_PORT
fi
if has_peer haproxy; then
    check_free "$HAPROXY_IPERF_PORT" "haproxy hop 1, iperf" BENCH_HAPROXY_IPERF_PORT
    check_free $((HAPROXY_IPERF_PORT + 1)) "haproxy hop 2, iperf" BENCH_HAPROXY_IPERF_PORT
    check_free "$HAPROXY_ECHO_PORT" "haproxy hop 1, echo" BENCH_HAPROXY_ECHO_PORT
    check_free $((HAPROXY_ECHO_PORT + 1)) "haproxy hop 2, echo" BENCH_HAPROXY_ECHO_PORT
fi
if has_peer socat; then
    check_free "$SOCAT_IPERF_PORT" "socat hop 1, iperf" BENCH_SOCAT_IPERF_PORT
    check_free $((SOCAT_IPERF_PORT + 1)) "socat hop 2, iperf" BENCH_SOCAT_IPERF_PORT
    check_free "$SOCAT_ECHO_PORT" "socat hop 1, echo" BENCH_SOCAT_ECHO_PORT
    check_free $((SOCAT_ECHO_PORT + 1)) "socat hop 2, echo" BENCH_SOCAT_ECHO_PORT
fi
if has_peer splice; then
    check_free "$SPLICE_IPERF_PORT" "splice hop 1, iperf" BENCH_SPLICE_IPERF_PORT
    check_free $((SPLICE_IPERF_PORT + 1)) "splice hop 2, iperf" BENCH_SPLICE_IPERF_PORT
    check_free "$SPLICE_ECHO_PORT" "splice hop 1, echo" BENCH_SPLICE_ECHO_PORT
    check_free $((SPLICE_ECHO_PORT + 1)) "splice hop 2, echo" BENCH_SPLICE_ECHO_PORT
fi

# ---- targets ----------------------------------------------------------------
start_iperf_server() {
    start iperf3-server "${ON_SERVER[@]}" iperf3 -s -p "$IPERF_PORT" -B "$HOST" --rcv-timeout 10000
    wait_port "$IPERF_PORT" iperf3-server 10
}
start_iperf_server
start echo "${ON_SERVER[@]}" "$BENCHBIN" echo --listen "$HOST:$ECHO_PORT"
wait_port "$ECHO_PORT" echo 10

# Per peer: the port iperf3 and rr connect to, and the relay processes whose
# CPU time is counted (by name, see PIDOF).
declare -A IPERF_AT=([direct]=$IPERF_PORT) ECHO_AT=([direct]=$ECHO_PORT) RELAYS=([direct]="")

# ---- baton ------------------------------------------------------------------
# start_baton PEER BINARY GATEWAY_PORT IPERF_PORT ECHO_PORT EXTRA: a gateway and
# a client agent (processes "PEER-gateway" and "PEER-client"; for baton itself
# "gateway" and "client"), EXTRA added at the top of both configs.
start_baton() {
    local peer=$1 bin=$2 gw_port=$3 iperf_port=$4 echo_port=$5 extra=$6
    local pre="" keygen_out pubkey
    [[ $peer == baton ]] || pre="$peer-"
    keygen_out=$("$bin" keygen laptop --out "$TMP/${pre}laptop.key") \
        || die "$peer: baton keygen failed"
    pubkey=$(printf '%s\n' "$keygen_out" | sed -n 's/^key = "\(.*\)"$/\1/p' | tail -n 1)
    [[ -n $pubkey ]] || die "could not find 'key = \"...\"' in baton keygen output: $keygen_out"

    cat >"$TMP/${pre}gateway.toml" <<EOF
listen = ["$HOST:$gw_port"]
inactivity_timeout = "5m"
max_sessions = 100
${BATON_THREADS:+threads = $BATON_THREADS}
$extra

[services.iperf]
target = "$HOST:$IPERF_PORT"

[services.echo]
target = "$HOST:$ECHO_PORT"

[clients.laptop]
key = "$pubkey"
services = ["iperf", "echo"]
EOF

    # The admin socket lives in the run's own directory so that concurrent
    # runs (or a real agent on this machine) do not collide on the default.
    cat >"$TMP/${pre}client.toml" <<EOF
id = "laptop"
key_file = "${pre}laptop.key"
admin = "$TMP/${pre}admin.sock"
${BATON_THREADS:+threads = $BATON_THREADS}
$extra

[gateways.bench]
addresses = ["$HOST:$gw_port"]

[services.iperf]
gateway = "bench"
listen = "$HOST:$iperf_port"

[services.echo]
gateway = "bench"
listen = "$HOST:$echo_port"
EOF

    start "${pre}gateway" "${ON_SERVER[@]}" "$bin" gateway -c "$TMP/${pre}gateway.toml"
    wait_port "$gw_port" "${pre}gateway" "$BENCH_STARTUP_TIMEOUT"
    start "${pre}client" "${ON_CLIENT[@]}" "$bin" client -c "$TMP/${pre}client.toml"
    wait_port "$iperf_port" "${pre}client" "$BENCH_STARTUP_TIMEOUT"
    wait_port "$echo_port" "${pre}client" "$BENCH_STARTUP_TIMEOUT"
    IPERF_AT[$peer]=$iperf_port ECHO_AT[$peer]=$echo_port RELAYS[$peer]="${pre}client ${pre}gateway"
}
has_peer baton && start_baton baton "$BATON" "$GATEWAY_PORT" "$IPERF_VIA_PORT" "$ECHO_VIA_PORT" ""
has_peer baton-b && start_baton baton-b "$BATON_B" "$GATEWAY_B_PORT" "$IPERF_VIA_B_PORT" "$ECHO_VIA_B_PORT" "$BATON_B_CONFIG"

# ---- HAProxy: two processes, the first forwarding to the second -------------
# TCP mode with splicing forced on in both directions (the kernel moves the
# bytes between the sockets without copying them through user space), one
# thread per core like baton's runtime.
haproxy_cfg() { # haproxy_cfg IPERF_LISTEN IPERF_NEXT ECHO_LISTEN ECHO_NEXT
    cat <<EOF
global
    nbthread $HAPROXY_NBTHREAD
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option splice-request
    option splice-response
frontend iperf
    bind $HOST:$1
    default_backend iperf
backend iperf
    server next $HOST:$2
frontend echo
    bind $HOST:$3
    default_backend echo
backend echo
    server next $HOST:$4
EOF
}
if has_peer haproxy; then
    haproxy_cfg $((HAPROXY_IPERF_PORT + 1)) "$IPERF_PORT" $((HAPROXY_ECHO_PORT + 1)) "$ECHO_PORT" >"$TMP/haproxy2.cfg"
    haproxy_cfg "$HAPROXY_IPERF_PORT" $((HAPROXY_IPERF_PORT + 1)) "$HAPROXY_ECHO_PORT" $((HAPROXY_ECHO_PORT + 1)) >"$TMP/haproxy1.cfg"
    for h in 2 1; do
        # -db: stay in the foreground, so that the pid is haproxy's own.
        on=("${ON_SERVER[@]}"); [[ $h == 1 ]] && on=("${ON_CLIENT[@]}")
        start "haproxy$h" "${on[@]}" "$HAPROXY" -db -f "$TMP/haproxy$h.cfg"
    done
    wait_port $((HAPROXY_IPERF_PORT + 1)) haproxy2 "$BENCH_STARTUP_TIMEOUT"
    wait_port "$HAPROXY_IPERF_PORT" haproxy1 "$BENCH_STARTUP_TIMEOUT"
    wait_port "$HAPROXY_ECHO_PORT" haproxy1 "$BENCH_STARTUP_TIMEOUT"
    IPERF_AT[haproxy]=$HAPROXY_IPERF_PORT ECHO_AT[haproxy]=$HAPROXY_ECHO_PORT RELAYS[haproxy]="haproxy1 haproxy2"
fi

# ---- socat: two hops per target ---------------------------------------------
# One process per listener, forking a child per connection; TCP_NODELAY on
# every socket as baton and HAProxy set it, so that rr compares relays and
# not Nagle's algorithm.
if has_peer socat; then
    socat_hop() { # socat_hop NAME LISTEN NEXT
        local on=("${ON_SERVER[@]}"); [[ $1 == *1 ]] && on=("${ON_CLIENT[@]}")
        start "$1" "${on[@]}" socat -b "$SOCAT_BUF" "TCP-LISTEN:$2,bind=$HOST,fork,reuseaddr,nodelay" "TCP:$HOST:$3,nodelay"
    }
    socat_hop socat-iperf2 $((SOCAT_IPERF_PORT + 1)) "$IPERF_PORT"
    socat_hop socat-iperf1 "$SOCAT_IPERF_PORT" $((SOCAT_IPERF_PORT + 1))
    socat_hop socat-echo2 $((SOCAT_ECHO_PORT + 1)) "$ECHO_PORT"
    socat_hop socat-echo1 "$SOCAT_ECHO_PORT" $((SOCAT_ECHO_PORT + 1))
    wait_port $((SOCAT_IPERF_PORT + 1)) socat-iperf2 "$BENCH_STARTUP_TIMEOUT"
    wait_port "$SOCAT_IPERF_PORT" socat-iperf1 "$BENCH_STARTUP_TIMEOUT"
    wait_port $((SOCAT_ECHO_PORT + 1)) socat-echo2 "$BENCH_STARTUP_TIMEOUT"
    wait_port "$SOCAT_ECHO_PORT" socat-echo1 "$BENCH_STARTUP_TIMEOUT"
    IPERF_AT[socat]=$SOCAT_IPERF_PORT ECHO_AT[socat]=$SOCAT_ECHO_PORT
    RELAYS[socat]="socat-iperf1 socat-iperf2 socat-echo1 socat-echo2"
fi

# ---- splice: two hops of `baton-bench splice-relay` -------------------------
# The yardstick: splice(2) both ways through a 1 MiB pipe, a blocking thread
# per direction, no protocol, nothing kept for a resume. What two hops cost
# the kernel alone.
if has_peer splice; then
    splice_hop() { # splice_hop NAME LISTEN NEXT
        local on=("${ON_SERVER[@]}"); [[ $1 == *1 ]] && on=("${ON_CLIENT[@]}")
        start "$1" "${on[@]}" "$BENCHBIN" splice-relay --listen "$HOST:$2" --to "$HOST:$3"
    }
    splice_hop splice-iperf2 $((SPLICE_IPERF_PORT + 1)) "$IPERF_PORT"
    splice_hop splice-iperf1 "$SPLICE_IPERF_PORT" $((SPLICE_IPERF_PORT + 1))
    splice_hop splice-echo2 $((SPLICE_ECHO_PORT + 1)) "$ECHO_PORT"
    splice_hop splice-echo1 "$SPLICE_ECHO_PORT" $((SPLICE_ECHO_PORT + 1))
    for h in splice-iperf2:$((SPLICE_IPERF_PORT + 1)) splice-iperf1:$SPLICE_IPERF_PORT \
        splice-echo2:$((SPLICE_ECHO_PORT + 1)) splice-echo1:$SPLICE_ECHO_PORT; do
        wait_port "${h#*:}" "${h%%:*}" "$BENCH_STARTUP_TIMEOUT"
    done
    IPERF_AT[splice]=$SPLICE_IPERF_PORT ECHO_AT[splice]=$SPLICE_ECHO_PORT
    RELAYS[splice]="splice-iperf1 splice-iperf2 splice-echo1 splice-echo2"
fi

# Listeners may be up before the path behind them is: wait for a real round
# trip through each relay.
for peer in "${ORDER[@]}"; do
    [[ $peer == direct ]] && continue
    ok=0
    for ((i = 0; i < BENCH_STARTUP_TIMEOUT * 2; i++)); do
        if "$BENCHBIN" rr --connect "$HOST:${ECHO_AT[$peer]}" --size 64 --count 10 --warmup 0 \
            --timeout 2 >"$TMP/probe.log" 2>&1; then
            ok=1; break
        fi
        for name in ${RELAYS[$peer]}; do alive "$name" || die "$name exited"; done
        sleep 0.5
    done
    [[ $ok == 1 ]] || die "no echo round trip through $peer within ${BENCH_STARTUP_TIMEOUT}s: $(cat "$TMP/probe.log")"
done
log "relays up: ${ORDER[*]:1}"

# ---- measurements -------------------------------------------------------------
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $RR_CHUNK =~ ^[1-9][0-9]*$ ]] || die "RR_CHUNK must be a positive integer"
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
RESULTS=$TMP/results.tsv # kind, test, peer, values...; rendered at the end
: >"$RESULTS"
FAILED=0

# cpu_seconds NAME...: user+system CPU seconds used so far by the named relay
# processes and every descendant, living or reaped. socat forks a child per
# connection: a live child is counted from its own /proc/PID/stat, a reaped
# one through its parent's cutime/cstime, so each is counted exactly once.
cpu_seconds() {
    local pids=() name
    for name in "$@"; do pids+=("${PIDOF[$name]}"); done
    python3 - "${pids[@]}" <<'EOF'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
procs = {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open(f"/proc/{d}/stat") as f:
            s = f.read()
    except OSError:
        continue
    # Fields after "(comm)": state, ppid, ..., utime (14), stime, cutime, cstime (17).
    f = s[s.rindex(")") + 2:].split()
    procs[int(d)] = (int(f[1]), sum(int(x) for x in f[11:15]))
kids = {}
for pid, (ppid, _) in procs.items():
    kids.setdefault(ppid, []).append(pid)
todo, seen, total = [int(p) for p in sys.argv[1:]], set(), 0
while todo:
    p = todo.pop()
    if p in seen or p not in procs:
        continue
    seen.add(p)
    total += procs[p][1]
    todo += kids.get(p, [])
print(total / tick)
EOF
}

# Measurement functions set globals instead of printing, so that they run in
# this shell (not a $(...) subshell) and can restart the iperf3 server and
# record failures.

# iperf_run PORT STREAMS [iperf3 flags]: sets BPS (bits/s received), BYTES
# (bytes received) and ENDS (CPU seconds of the iperf3 client and server, as
# they report them), or "fail"
iperf_run() {
    local port=$1 streams=$2; shift 2
    local out=$TMP/iperf.json extra=()
    # iperf3 accepts --rcv-timeout only when the client receives (-R).
    [[ " $* " == *" -R "* ]] && extra=(--rcv-timeout 10000)
    BPS=fail BYTES=fail ENDS=fail
    if run_fg "${ON_CLIENT[@]}" timeout $((DURATION + 30)) iperf3 -c "$HOST" -p "$port" -P "$streams" -t "$DURATION" \
        --connect-timeout 5000 "${extra[@]}" -J "$@" >"$out" 2>"$TMP/iperf.err" \
        && read -r BPS BYTES ENDS < <(python3 -c '
import json, sys
e = json.load(open(sys.argv[1]))["end"]
r, c = e["sum_received"], e["cpu_utilization_percent"]
print(r["bits_per_second"], r["bytes"], (c["host_total"] + c["remote_total"]) / 100 * r["seconds"])' "$out" 2>/dev/null); then
        return 0
    fi
    BPS=fail BYTES=fail ENDS=fail
    log "iperf3 -c $HOST -p $port -P $streams $* failed: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error",""))' "$out" 2>/dev/null || true) $(head -c 300 "$TMP/iperf.err")"
    FAILED=1
    # A failed test can leave the iperf3 server busy: start a fresh one.
    kill "${PIDOF[iperf3-server]}" 2>/dev/null || true
    wait "${PIDOF[iperf3-server]}" 2>/dev/null || true
    start_iperf_server
}

# rr_round SIZE PEER...: one rr run over every PEER's connection, taking
# turns RR_CHUNK round trips at a time, so that the machine's hiccups (other
# tenants of the host, the scheduler's placement of the two ends, which makes
# the direct round trip bimodal here) fall on every peer alike. Appends a
# "rr" line per peer to RESULTS ("fail" for all when the run fails).
rr_round() {
    local size=$1 peer p50 p99
    shift
    local args=()
    for peer in "$@"; do args+=(--connect "$HOST:${ECHO_AT[$peer]}"); done
    if run_fg "${ON_CLIENT[@]}" "$BENCHBIN" rr "${args[@]}" --size "$size" --count "$RR_COUNT" \
        --warmup "$RR_WARMUP" --chunk "$RR_CHUNK" --json >"$TMP/rr.json" 2>"$TMP/rr.err"; then
        # One JSON line per address, in the order given.
        while read -r peer p50 p99; do
            printf 'rr\trr %sB\t%s\t%s\t%s\n' "$size" "$peer" "$p50" "$p99" >>"$RESULTS"
        done < <(python3 -c '
import json, sys
lines = open(sys.argv[1]).read().split("\n")
for peer, line in zip(sys.argv[2:], [l for l in lines if l]):
    d = json.loads(line)
    print(peer, d["p50_us"], d["p99_us"])' "$TMP/rr.json" "$@")
    else
        log "rr size $size over $* failed: $(head -c 300 "$TMP/rr.err")"
        for peer in "$@"; do
            printf 'rr\trr %sB\t%s\tfail\tfail\n' "$size" "$peer" >>"$RESULTS"
        done
        FAILED=1
    fi
}

# rotated R: the peers in measurement order, rotated by round R so that with
# ROUNDS > 1 no peer always runs first (right after a cool-down) or last.
rotated() {
    local r=$1 n=${#ORDER[@]} i
    for ((i = 0; i < n; i++)); do printf '%s\n' "${ORDER[(i + r) % n]}"; done
}

# The tests: "STREAMS DIRECTION [RATE]". Unpaced, the two cores are the
# limit and the relays' CPU share partly depends on which process the kernel
# charges for the loopback TCP work; paced, every path has idle time and the
# CPU per GB is what the path costs.
TESTS=()
for p in $STREAMS; do TESTS+=("$p up" "$p down"); done
if [[ -n $PACED ]]; then
    [[ $PACED =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "PACED must be a rate in Gbit/s (or empty)"
    TESTS+=("8 up $PACED" "8 down $PACED")
fi
for t in "${TESTS[@]}"; do
    read -r p dir rate <<<"$t"
    flag=(); [[ $dir == down ]] && flag=(-R)
    name="iperf3 -P $p $dir"
    if [[ -n $rate ]]; then
        # iperf3 -b paces each stream.
        flag+=(-b "$(awk -v r="$rate" -v p="$p" 'BEGIN { printf "%.0f", r * 1e9 / p }')")
        name="$name at $rate Gbit/s"
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        tag=""; ((ROUNDS > 1)) && tag=" (round $r/$ROUNDS)"
        while read -r peer; do
            log "$name: $peer$tag"
            relays=${RELAYS[$peer]}
            # shellcheck disable=SC2086 # relays is a list of names
            before=$(cpu_seconds $relays)
            iperf_run "${IPERF_AT[$peer]}" "$p" "${flag[@]}"
            # socat's children exit when their connections close: give
            # them a moment so that their time is in their parent's.
            [[ $peer == socat ]] && sleep 0.3
            # shellcheck disable=SC2086
            after=$(cpu_seconds $relays)
            cpu=$(awk -v a="$after" -v b="$before" 'BEGIN{printf "%.3f", a - b}')
            [[ -z $relays ]] && cpu=-
            printf 'thr\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$peer" "$BPS" "$BYTES" "$cpu" "$ENDS" >>"$RESULTS"
        done < <(rotated "$r")
    done
done

for s in $RR_SIZES; do
    for ((r = 1; r <= ROUNDS; r++)); do
        tag=""; ((ROUNDS > 1)) && tag=" (round $r/$ROUNDS)"
        mapfile -t turn < <(rotated "$r")
        log "rr ${s}B: ${turn[*]}, taking turns$tag"
        rr_round "$s" "${turn[@]}"
    done
done

# ---- tables -------------------------------------------------------------------
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null || true) ]]; then REV="$REV (dirty)"; fi
export STAMP REV BUSY_BEFORE DURATION RR_COUNT RR_WARMUP RR_CHUNK ROUNDS HAPROXY_NBTHREAD SOCAT_BUF BATON_THREADS
export PLACEMENT CLIENT_CPUS SERVER_CPUS
# baton-b's binary, for the tables' header.
if has_peer baton-b; then
    BATON_B_NAME=$BATON_B
    [[ $BATON_B == "$BATON" ]] && BATON_B_NAME="the same as baton's"
    export BATON_B_NAME BATON_B_CONFIG
fi
STAMP=$(date -u +%Y-%m-%dT%H:%M:%SZ)
MACHINE="$(nproc) cores, $(uname -sr)"
# A peer left out of PEERS may not be installed: its version is then "?".
IPERF_VERSION=$(iperf3 --version 2>/dev/null | head -n 1 || true)
HAPROXY_VERSION=$("$HAPROXY" -v 2>/dev/null | head -n 1 | awk '{print $3}' || true)
SOCAT_VERSION=$(socat -V 2>/dev/null | sed -n 's/^socat version \([^ ]*\).*/\1/p' || true)
PEER_ORDER="${ORDER[*]}"
export MACHINE IPERF_VERSION HAPROXY_VERSION SOCAT_VERSION PEER_ORDER

mkdir -p "$(dirname "$BENCH_RESULTS")"
python3 "$ROOT/bench/render.py" "$RESULTS" "$BENCH_RESULTS"
echo
log "tables written to ${BENCH_RESULTS#"$ROOT"/}"

if [[ $FAILED != 0 ]]; then
    die "some measurements failed (see above)"
fi
