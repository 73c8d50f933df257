#!/usr/bin/env bash
# lmforge team stack on one machine, loopback only: PostgreSQL (the OS package), `mlflow server` and
# `prefect server` on it, and optionally a Prefect worker per work pool. See README.md.
#
#   stack.sh up [SERVICE...]    start and wait until each answers; prints the lines that switch lmforge over
#   stack.sh down [SERVICE...]  stop, children included
#   stack.sh status             one line per service; exit 3 unless every one answers
#   stack.sh env                the switch-over lines again: eval "$(deploy/stack/stack.sh env)"
#
# SERVICE: postgres, mlflow, prefect, workers (default: all but workers; workers too when
# LMFORGE_STACK_WORKERS=1). `up` adds what a service needs (mlflow and prefect need postgres).
# Settings (environment): LMFORGE_STACK_DIR (.stack), LMFORGE_PG_PORT (5433), LMFORGE_MLFLOW_PORT (5000),
# LMFORGE_PREFECT_PORT (4200), LMFORGE_PG_USER (lmforge), LMFORGE_PG_PASSWORD (generated),
# LMFORGE_MLFLOW_WORKERS (2), LMFORGE_STACK_TIMEOUT (180 s), LMFORGE_STACK_WORKERS (0).
# Progress goes to stderr, the switch-over lines to stdout.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"
source "$HERE/postgres.sh"
source "$HERE/mlflow.sh"
source "$HERE/prefect.sh"
source "$HERE/workers.sh"

ALL=(postgres mlflow prefect workers)

# The services named in "$@" (default: all, workers only when LMFORGE_STACK_WORKERS=1) in start order,
# on one line; for $1 = up, plus what they need.
selected() {
    local verb=$1
    shift
    local -A want=()
    local s
    if (($# == 0)); then
        want=([postgres]=1 [mlflow]=1 [prefect]=1)
        [[ ${LMFORGE_STACK_WORKERS:-0} == 1 ]] && want[workers]=1
    fi
    for s in "$@"; do
        [[ " ${ALL[*]} " == *" $s "* ]] || die "unknown service '$s' (one of: ${ALL[*]})"
        want[$s]=1
    done
    if [[ $verb == up ]]; then
        [[ -n ${want[workers]:-} ]] && want[prefect]=1 want[mlflow]=1
        [[ -n ${want[mlflow]:-}${want[prefect]:-} ]] && want[postgres]=1
    fi
    local -a out=()
    for s in "${ALL[@]}"; do
        [[ -z ${want[$s]:-} ]] || out+=("$s")
    done
    echo "${out[*]}"
}

print_env() {
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URI"
    echo "export PREFECT_API_URL=$PREFECT_API"
    echo "# DVC, once per clone (--local: .dvc/config.local; drop it to commit the remote for the team):"
    echo "# dvc remote add --local --force -d team $DVC_REMOTE_DIR"
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    local list
    local -a services
    case $cmd in
    up)
        list=$(selected up "$@")
        read -ra services <<<"$list"
        mkdir -p "$STACK_DIR" "$DVC_REMOTE_DIR"
        for s in "${services[@]}"; do "${s}_up"; done
        print_env
        ;;
    down)
        list=${*:+$(selected down "$@")}
        read -ra services <<<"${list:-${ALL[*]}}"
        local i
        for ((i = ${#services[@]} - 1; i >= 0; i--)); do "${services[i]}_down"; done
        ;;
    status)
        local rc=0
        postgres_status || rc=3
        mlflow_status || rc=3
        prefect_status || rc=3
        if [[ ${LMFORGE_STACK_WORKERS:-0} == 1 ]] || compgen -G "$RUN_DIR/worker-*.pid" >/dev/null; then
            workers_status || rc=3
        fi
        return $rc
        ;;
    env) print_env ;;
    *) die "usage: stack.sh up|down|status|env [postgres|mlflow|prefect|workers ...]" ;;
    esac
}

main "$@"
