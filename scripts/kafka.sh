#!/usr/bin/env bash
# The Kafka-protocol broker the end-to-end tests run against: tansu 0.6.0,
# built from crates.io once per machine, run with its sqlite storage engine.
# (No Apache Kafka package exists here; tansu speaks the protocol. Its
# memory engine loses data on resume, so tests use sqlite.)
#
#   scripts/kafka.sh install                   build tansu into $MKC_TANSU_ROOT (once)
#   scripts/kafka.sh start                     run the broker in the background
#   scripts/kafka.sh stop                      stop it and wait until it is gone
#   scripts/kafka.sh status                    exit 0 if it is running, 3 if not
#   scripts/kafka.sh create-topic NAME PARTITIONS
#
# Environment:
#   MKC_TANSU_ROOT  install root      (default $HOME/.cache/mkc/tansu-0.6.0)
#   MKC_KAFKA_PORT  listener port     (default 9092, on 127.0.0.1 only)
#   MKC_KAFKA_DIR   data, pid and log (default <repo>/target/kafka)
set -euo pipefail

TANSU_VERSION=0.6.0
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MKC_TANSU_ROOT="${MKC_TANSU_ROOT:-$HOME/.cache/mkc/tansu-$TANSU_VERSION}"
TANSU="$MKC_TANSU_ROOT/bin/tansu"
PORT="${MKC_KAFKA_PORT:-9092}"
DATA_DIR="${MKC_KAFKA_DIR:-$REPO_DIR/target/kafka}"
PID_FILE="$DATA_DIR/tansu.pid"
LOG_FILE="$DATA_DIR/tansu.log"
# tansu resolves a sqlite:// path against its working directory; start()
# runs it from $DATA_DIR, so this is $DATA_DIR/tansu.db.
DB_NAME="tansu.db"
URL="tcp://127.0.0.1:$PORT"
START_TIMEOUT_S=20
STOP_TIMEOUT_S=15

say() { printf 'kafka.sh: %s\n' "$*"; }
die() {
    printf 'kafka.sh: error: %s\n' "$*" >&2
    exit 1
}

# True when something accepts TCP connections on 127.0.0.1:$PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

# Prints the pid from the pid file if that process is alive and is tansu.
running_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # A recycled pid that belongs to something else is not our broker.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'tansu' || return 1
    echo "$pid"
}

log_tail() {
    if [[ -f "$LOG_FILE" ]]; then
        echo "---- last lines of $LOG_FILE ----" >&2
        tail -n 40 "$LOG_FILE" >&2
        echo "----" >&2
    fi
}

cmd_install() {
    if [[ -x "$TANSU" ]]; then
        say "tansu $TANSU_VERSION already installed: $TANSU"
        return 0
    fi
    mkdir -p "$(dirname "$MKC_TANSU_ROOT")"
    # Several checkouts (or a CI run and a developer) may install at once:
    # one builds, the others wait for it and then find the binary.
    local lock="$MKC_TANSU_ROOT.lock"
    exec 9>"$lock"
    if ! flock -n 9; then
        say "another tansu install holds $lock; waiting for it"
        flock 9
    fi
    if [[ -x "$TANSU" ]]; then
        say "tansu $TANSU_VERSION installed by a concurrent run: $TANSU"
        return 0
    fi
    say "building tansu $TANSU_VERSION into $MKC_TANSU_ROOT (about 12 minutes on 2 cores)"
    # The default features have no storage engine; sqlite comes with libsql.
    cargo install tansu --version "=$TANSU_VERSION" --features dynostore,libsql \
        --root "$MKC_TANSU_ROOT"
    [[ -x "$TANSU" ]] || die "cargo install finished but $TANSU is missing"
    say "installed $TANSU"
}

cmd_start() {
    local pid
    if pid="$(running_pid)"; then
        say "already running (pid $pid) on $URL"
        return 0
    fi
    [[ -x "$TANSU" ]] || die "$TANSU not found: run 'scripts/kafka.sh install' first"
    if port_open; then
        # Most likely a broker of another checkout; the tests use unique
        # topic and group names, so sharing it is harmless.
        say "warning: 127.0.0.1:$PORT already accepts connections (not our pid file $PID_FILE);" \
            "assuming it is a Kafka broker and using it"
        return 0
    fi
    mkdir -p "$DATA_DIR"
    rm -f "$PID_FILE"
    {
        echo
        echo "==== $(date '+%F %T') starting tansu on $URL ===="
    } >>"$LOG_FILE"
    # nohup and fresh descriptors: the broker outlives this script and the
    # make/CI shell that ran it, and keeps none of their pipes open (a make
    # whose output is piped would otherwise never see EOF). A background job
    # of a non-interactive shell already ignores SIGINT from the terminal.
    (
        cd "$DATA_DIR"
        exec nohup "$TANSU" broker \
            --listener-url "$URL" \
            --advertised-listener-url "$URL" \
            --storage-engine "sqlite://$DB_NAME" \
            </dev/null >>"$LOG_FILE" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$PID_FILE"
    local waited=0
    until port_open; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail
            rm -f "$PID_FILE"
            die "tansu exited during startup (log: $LOG_FILE)"
        fi
        if ((waited >= START_TIMEOUT_S * 10)); then
            log_tail
            kill -KILL "$pid" 2>/dev/null || true
            rm -f "$PID_FILE"
            die "tansu did not accept connections on $URL within ${START_TIMEOUT_S}s"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    say "started tansu (pid $pid) on $URL, data in $DATA_DIR"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        say "not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= STOP_TIMEOUT_S * 10)); then
            say "tansu (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_S}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE"
    say "stopped tansu (pid $pid)"
}

cmd_status() {
    local pid
    if pid="$(running_pid)"; then
        if port_open; then
            say "running (pid $pid) on $URL, data in $DATA_DIR"
        else
            say "running (pid $pid) but $URL does not accept connections yet"
        fi
        return 0
    fi
    if port_open; then
        say "not started by this checkout, but 127.0.0.1:$PORT accepts connections"
        return 0
    fi
    say "not running"
    return 3
}

cmd_create_topic() {
    [[ $# -eq 2 ]] || die "usage: scripts/kafka.sh create-topic NAME PARTITIONS"
    local name="$1" partitions="$2"
    [[ "$partitions" =~ ^[1-9][0-9]*$ ]] || die "PARTITIONS must be a positive integer, got '$partitions'"
    [[ -x "$TANSU" ]] || die "$TANSU not found: run 'scripts/kafka.sh install' first"
    port_open || die "no broker on $URL: run 'scripts/kafka.sh start' first"
    "$TANSU" topic create --broker "$URL" --partitions "$partitions" "$name"
    say "created topic $name with $partitions partition(s)"
}

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    create-topic) cmd_create_topic "$@" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
