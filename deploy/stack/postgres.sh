# shellcheck shell=bash
# lmforge team stack: PostgreSQL from the operating system's packages (sourced by stack.sh).
#
# One cluster in $PG_DIR/data, listening on $HOST:$PG_PORT only (TCP, no Unix socket), password
# authentication (scram-sha-256) for every role. It holds role $PG_USER and its databases `mlflow` and
# `prefect`. PostgreSQL refuses to run as root: run by root, the server runs as the OS user `postgres`
# (LMFORGE_PG_OS_USER), which the package creates, and owns $PG_DIR; otherwise as the current user.

if ((EUID == 0)); then PG_OS_USER=${LMFORGE_PG_OS_USER:-postgres}; else PG_OS_USER=$(id -un); fi

# The folder of initdb/pg_ctl/psql: LMFORGE_PG_BIN, else PATH, else the newest /usr/lib/postgresql/*/bin.
pg_bin() {
    local d
    if [[ -n ${LMFORGE_PG_BIN:-} ]]; then
        d=$LMFORGE_PG_BIN
    elif d=$(command -v initdb); then
        d=$(dirname "$(readlink -f "$d")")  # past symlinks such as /usr/local/bin/initdb, to psql's folder too
    else
        d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    [[ -n $d && -x $d/initdb && -x $d/pg_ctl && -x $d/psql && -x $d/pg_isready ]] ||
        die "PostgreSQL's server (initdb, pg_ctl) is not installed: run \`make postgres\` (or apt-get install postgresql)"
    echo "$d"
}

# Run `$@` as the server's OS user, from / (that user may not be allowed into the current folder).
as_pg() {
    if ((EUID == 0)); then
        (cd / && runuser -u "$PG_OS_USER" -- "$@")
    else
        "$@"
    fi
}

# Superuser connection for setting up roles and databases.
pg_admin() {
    PGPASSWORD=$(<"$PG_DIR/superuser-password") "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$HOST" -p "$PG_PORT" -U postgres -d postgres "$@"
}

# The pid of the running server of this cluster, or nothing (a stale postmaster.pid whose pid now
# belongs to another program counts as nothing).
pg_pid() {
    local pid
    [[ -r $PG_DATA/postmaster.pid ]] || return 0
    pid=$(head -n 1 "$PG_DATA/postmaster.pid")
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && [[ $(command_line "$pid") == *"-D $PG_DATA "* ]]; then
        echo "$pid"
    fi
}

pg_check_root() {
    ((EUID == 0)) || return 0
    id -u "$PG_OS_USER" >/dev/null 2>&1 ||
        die "PostgreSQL cannot run as root and there is no OS user '$PG_OS_USER' to run it: run \`make postgres\` (the package creates it) or set LMFORGE_PG_OS_USER"
    runuser -u "$PG_OS_USER" -- test -x "$STACK_DIR" ||
        die "the OS user '$PG_OS_USER' cannot enter $STACK_DIR (a folder on its path is private, e.g. /root or a 0700 temp dir): set LMFORGE_STACK_DIR to a folder it can reach, e.g. /var/lib/lmforge-stack"
}

pg_init() {
    local bin=$1
    say "postgres: creating the cluster in $PG_DATA"
    mkdir -p "$PG_DIR"
    chmod 700 "$PG_DIR"
    ((EUID != 0)) || chown "$PG_OS_USER:" "$PG_DIR"
    if [[ ! -s $PG_DIR/superuser-password ]]; then
        (umask 077 && random_secret >"$PG_DIR/superuser-password")
        ((EUID != 0)) || chown "$PG_OS_USER:" "$PG_DIR/superuser-password"
    fi
    # Into a temporary folder, then renamed: an interrupted initdb never leaves a cluster that looks valid.
    as_pg rm -rf "$PG_DATA.init"
    as_pg "$bin/initdb" -D "$PG_DATA.init" -U postgres -E UTF8 --no-locale --auth=scram-sha-256 \
        --pwfile="$PG_DIR/superuser-password" >"$LOG_DIR/initdb.log" 2>&1 ||
        die "initdb failed; see $LOG_DIR/initdb.log: $(tail -n 1 "$LOG_DIR/initdb.log")"
    as_pg sh -c "printf '%s\n' \"listen_addresses = '$HOST'\" \"unix_socket_directories = ''\" >> '$PG_DATA.init/postgresql.conf'"
    as_pg mv "$PG_DATA.init" "$PG_DATA"
}

postgres_up() {
    local bin pid
    bin=$(pg_bin)
    pg_check_root
    mkdir -p "$LOG_DIR"
    [[ -f $PG_DATA/PG_VERSION ]] || pg_init "$bin"
    pid=$(pg_pid)
    if [[ -n $pid ]]; then
        local port
        port=$(sed -n 4p "$PG_DATA/postmaster.pid")
        [[ $port == "$PG_PORT" ]] || die "postgres is running on port $port, not $PG_PORT: run \`stack.sh down\` first"
        say "postgres: already running (pid $pid)"
    else
        port_open "$PG_PORT" && die "port $PG_PORT is taken by another program: set LMFORGE_PG_PORT"
        touch "$LOG_DIR/postgres.log"
        ((EUID != 0)) || chown "$PG_OS_USER:" "$LOG_DIR/postgres.log"
        as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$LOG_DIR/postgres.log" -o "-p $PG_PORT" -w -t "$TIMEOUT" start >/dev/null ||
            die "postgres did not start; see $LOG_DIR/postgres.log: $(tail -n 1 "$LOG_DIR/postgres.log")"
        wait_until postgres "$LOG_DIR/postgres.log" "" "$bin/pg_isready" -q -h "$HOST" -p "$PG_PORT"
        say "postgres: started (pid $(pg_pid), $HOST:$PG_PORT)"
    fi
    # Every time, so that a changed LMFORGE_PG_PASSWORD takes effect; the password reaches psql through
    # its environment, never a command line.
    _LMFORGE_PG_PW=$(pg_password) pg_admin -v user="$PG_USER" <<'SQL'
\set pw `printf '%s' "$_LMFORGE_PG_PW"`
SELECT format('CREATE ROLE %I', :'user') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
ALTER ROLE :"user" LOGIN PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', d, :'user') FROM unnest(ARRAY['mlflow', 'prefect']) AS d
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d) \gexec
SQL
}

postgres_down() {
    [[ -n $(pg_pid) ]] || return 0
    as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null ||
        die "postgres did not stop within 60 s; see $LOG_DIR/postgres.log"
    say "postgres: stopped"
}

postgres_status() {
    local pid
    pid=$(pg_pid)
    if [[ -z $pid ]]; then
        echo "postgres   stopped"
        return 1
    fi
    if "$(pg_bin)/pg_isready" -q -h "$HOST" -p "$PG_PORT"; then
        echo "postgres   running   pid $pid  $HOST:$PG_PORT  databases mlflow, prefect (role $PG_USER)"
    else
        echo "postgres   not answering  pid $pid  $HOST:$PG_PORT"
        return 1
    fi
}
