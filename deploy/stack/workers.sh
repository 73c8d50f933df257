# shellcheck shell=bash
# lmforge team stack: one Prefect worker per work pool, `cpu` and `gpu` (sourced by stack.sh).
#
# `lmforge worker --pool <pool>` polls the stack's Prefect server for flow runs of its pool and runs
# them from the repository, logging to the stack's MLflow server. Started by `stack.sh up` only with
# LMFORGE_STACK_WORKERS=1 (or `stack.sh up workers`); on a team, each machine runs its own.

WORKER_POOLS=(cpu gpu)

# `lmforge worker` replaces itself with `python -m prefect worker start --pool <pool> ...`.
worker_pattern() { echo "worker( start)? --pool $1( |\$)"; }

workers_up() {
    local lmforge pool pidfile log pid
    lmforge=$(tool lmforge)
    for pool in "${WORKER_POOLS[@]}"; do
        pidfile=$RUN_DIR/worker-$pool.pid
        log=$LOG_DIR/worker-$pool.log
        pid=$(live_pid "$pidfile" "$(worker_pattern "$pool")")
        if [[ -n $pid ]]; then
            say "worker-$pool: already running (pid $pid)"
            continue
        fi
        echo "--- $(date -Is) $lmforge worker --pool $pool" >>"$log"
        (
            cd "$REPO" || exit
            export PREFECT_API_URL=$PREFECT_API MLFLOW_TRACKING_URI=$MLFLOW_URI
            start_bg "$pidfile" "$log" "$lmforge" worker --pool "$pool"
        )
        pid=$(<"$pidfile")
        sleep 3  # a worker has no health URL: one that cannot start exits within seconds
        alive "$pid" || die "worker-$pool exited during start-up; see $log: $(tail -n 1 "$log")"
        say "worker-$pool: started (pid $pid)"
    done
}

# Prefect 3.8's worker turns SIGTERM into SIGINT, stops polling, and here never exits on its own even
# when idle; a second signal makes it SIGKILL itself. So: SIGTERM, then SIGKILL after 10 s. A flow run
# it started is a descendant and stopped with it.
workers_down() {
    local pool
    for pool in "${WORKER_POOLS[@]}"; do  # side by side: each may take the whole 10 s
        stop_pidfile "$RUN_DIR/worker-$pool.pid" "$(worker_pattern "$pool")" "worker-$pool" 10 &
    done
    wait
}

workers_status() {
    local pool pid rc=0
    for pool in "${WORKER_POOLS[@]}"; do
        pid=$(live_pid "$RUN_DIR/worker-$pool.pid" "$(worker_pattern "$pool")")
        if [[ -n $pid ]]; then
            printf '%-10s running   pid %s  pool %s\n' "worker-$pool" "$pid" "$pool"
        else
            printf '%-10s stopped\n' "worker-$pool"
            rc=1
        fi
    done
    return $rc
}
