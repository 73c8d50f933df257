# shellcheck shell=bash
# lmforge team stack: settings and helpers shared by stack.sh and the service files (sourced, not run).
#
# Every setting is an environment variable with a default; the state of the whole stack (database
# cluster, artifacts, DVC remote, pid files, logs) lives under one folder, LMFORGE_STACK_DIR.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STACK_DIR=$(realpath -m "${LMFORGE_STACK_DIR:-$REPO/.stack}")  # absolute: servers and users run elsewhere

HOST=127.0.0.1                 # loopback only; see README.md for serving a network
PG_PORT=${LMFORGE_PG_PORT:-5433}   # 5433: leaves 5432 to a system cluster the OS package may have started
PG_USER=${LMFORGE_PG_USER:-lmforge}
MLFLOW_PORT=${LMFORGE_MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${LMFORGE_MLFLOW_WORKERS:-2}  # mlflow's own default, 4, is too many for a 2-core machine
PREFECT_PORT=${LMFORGE_PREFECT_PORT:-4200}
TIMEOUT=${LMFORGE_STACK_TIMEOUT:-180}      # seconds a service may take to answer after its start
VENV_BIN=${LMFORGE_VENV:-$REPO/.venv}/bin
PYTHON=$VENV_BIN/python
[[ -x $PYTHON ]] || PYTHON=python3

RUN_DIR=$STACK_DIR/run          # pid files
LOG_DIR=$STACK_DIR/logs
ARTIFACTS_DIR=$STACK_DIR/artifacts
DVC_REMOTE_DIR=$STACK_DIR/dvc-remote
PG_DIR=$STACK_DIR/pg            # owned by the OS user that runs PostgreSQL
PG_DATA=$PG_DIR/data

MLFLOW_URI=http://$HOST:$MLFLOW_PORT
PREFECT_API=http://$HOST:$PREFECT_PORT/api

die() { echo "stack: error: $*" >&2; exit 1; }
say() { echo "stack: $*" >&2; }

# The password of PG_USER: LMFORGE_PG_PASSWORD, else one generated on first use and kept in the state dir.
pg_password() {
    if [[ -n ${LMFORGE_PG_PASSWORD:-} ]]; then
        printf '%s' "$LMFORGE_PG_PASSWORD"
        return
    fi
    local f=$STACK_DIR/pg-password
    if [[ ! -s $f ]]; then
        (umask 077 && random_secret >"$f.tmp" && mv "$f.tmp" "$f")
    fi
    cat "$f"
}

random_secret() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }  # 32 hex digits

# A SQLAlchemy URL of database $2 for driver $1 (psycopg2 for MLflow, asyncpg for Prefect).
pg_url() {
    local password
    password=$(pg_password)
    password=$(urlencode "$password")
    echo "postgresql+$1://$PG_USER:$password@$HOST:$PG_PORT/$2"
}

# $1 percent-encoded for a URL's user-info part (bytewise, so any UTF-8 text works).
urlencode() {
    local LC_ALL=C s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        if [[ $c == [A-Za-z0-9._~-] ]]; then
            out+=$c
        else
            printf -v c '%%%02X' "$(($(printf '%d' "'$c") & 255))"
            out+=$c
        fi
    done
    echo "$out"
}

# An executable of the virtualenv (LMFORGE_VENV, default .venv), else of PATH.
tool() {
    if [[ -x $VENV_BIN/$1 ]]; then echo "$VENV_BIN/$1"
    elif command -v "$1" >/dev/null; then command -v "$1"
    else die "'$1' not found in $VENV_BIN or PATH: run \`make install\` first"
    fi
}

# True when something accepts TCP connections on $HOST:$1.
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# True when GET $1 answers 200 within 5 s.
http_ok() {
    "$PYTHON" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.exit(r.status != 200)
PY
}

# Wait until command `$4...` succeeds; fail naming $1 and its log $2 once TIMEOUT has passed, as soon as
# pid $3 (unless empty) has died, or when the command cannot run at all.
wait_until() {
    local what=$1 log=$2 pid=$3
    shift 3
    local deadline=$((SECONDS + TIMEOUT))
    local rc
    while :; do
        rc=0
        "$@" || rc=$?
        ((rc != 0)) || break
        ((rc != 127)) || die "$what: cannot run $1"
        if [[ -n $pid ]] && ! alive "$pid"; then
            die "$what exited during start-up; see $log: $(tail -n 1 "$log" 2>/dev/null)"
        fi
        ((SECONDS < deadline)) || die "$what did not answer within ${TIMEOUT} s (LMFORGE_STACK_TIMEOUT); see $log"
        sleep 0.5
    done
}

# True when process $1 exists and is not a zombie.
alive() {
    local line
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    line=${line##*) }  # after the command name, which may hold spaces and parentheses
    [[ ${line%% *} != Z ]]
}

# The pid in pid file $1 if that process is alive and its command line matches $2 (an extended regular
# expression); nothing otherwise.
# The command check keeps a recycled pid from being taken for (and stopped as) ours.
live_pid() {
    local pid
    [[ -f $1 ]] || return 0
    pid=$(<"$1")
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && [[ $(command_line "$pid") =~ $2 ]]; then
        echo "$pid"
    fi
}

command_line() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true; }

# Pid $1 and every process below it (children, grandchildren, ...), read from /proc.
tree_pids() {
    local -A kids=()
    local f line pid rest ppid
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        pid=${line%% *}
        rest=${line##*) }  # after the command name, which may hold spaces and parentheses
        read -r _ ppid _ <<<"$rest"  # state, parent pid, ...
        kids[$ppid]+="$pid "
    done
    local -a queue=("$1")
    while ((${#queue[@]})); do
        pid=${queue[0]}
        queue=("${queue[@]:1}")
        echo "$pid"
        for f in ${kids[$pid]:-}; do queue+=("$f"); done
    done
}

# Start `$3...` in a session of its own in the background (so it outlives this shell and the terminal),
# output to log $2, pid to pid file $1. A script runs without job control, so the background child is
# no process group leader and setsid execs in place: $! is the server itself, leader of its group.
start_bg() {
    local pidfile=$1 log=$2
    shift 2
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    setsid "$@" </dev/null >>"$log" 2>&1 &
    echo $! >"$pidfile"
}

# Stop service $3 of pid file $1 (command line matching $2) and all its descendants: SIGTERM, then
# SIGKILL after $4 seconds (default 30). Descendants are collected first, so one that left the session
# (or was re-parented once its parent exited) is still stopped.
stop_pidfile() {
    local pidfile=$1 pattern=$2 name=$3 grace=${4:-30} pid
    pid=$(live_pid "$pidfile" "$pattern")
    if [[ -z $pid ]]; then
        rm -f "$pidfile"
        return 0
    fi
    local -a pids
    mapfile -t pids < <(tree_pids "$pid")
    kill -TERM -- "-$pid" "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + grace)) p left
    while :; do
        left=""
        for p in "${pids[@]}"; do alive "$p" && left+="$p "; done
        [[ -z $left ]] && break
        if ((SECONDS >= deadline)); then
            say "$name: still running after $grace s, killing ${left% }"
            # shellcheck disable=SC2086  # a list of pids
            kill -KILL $left 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    say "$name: stopped"
}

# Start server $1 unless it already runs (pid file $RUN_DIR/$1.pid, command line matching $2), log to
# $LOG_DIR/$1.log, and wait until GET $5 answers 200. $3 is its port and $4 the variable that sets it;
# the command follows.
server_up() {
    local name=$1 pattern=$2 port=$3 port_var=$4 url=$5
    shift 5
    local pidfile=$RUN_DIR/$name.pid log=$LOG_DIR/$name.log pid
    pid=$(live_pid "$pidfile" "$pattern")
    if [[ -n $pid ]]; then
        wait_until "$name" "$log" "$pid" http_ok "$url"
        say "$name: already running (pid $pid)"
        return
    fi
    rm -f "$pidfile"
    port_open "$port" && die "port $port is taken by another program: set $port_var"
    mkdir -p "$LOG_DIR"
    echo "--- $(date -Is) $*" >>"$log"
    start_bg "$pidfile" "$log" "$@"
    pid=$(<"$pidfile")
    wait_until "$name" "$log" "$pid" http_ok "$url"
    say "$name: started (pid $pid, ${url%/*})"
}

# One status line for server $1 (pid file pattern $2, health URL $3); false unless it answers.
server_status() {
    local name=$1 pattern=$2 url=$3 pid
    pid=$(live_pid "$RUN_DIR/$name.pid" "$pattern")
    if [[ -z $pid ]]; then
        printf '%-10s stopped\n' "$name"
        return 1
    elif http_ok "$url"; then
        printf '%-10s running   pid %s  %s\n' "$name" "$pid" "${url%/*}"
    else
        printf '%-10s not answering  pid %s  %s (see %s)\n' "$name" "$pid" "$url" "$LOG_DIR/$name.log"
        return 1
    fi
}
