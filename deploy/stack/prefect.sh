# shellcheck shell=bash
# lmforge team stack: the Prefect server (sourced by stack.sh).
#
# API, UI and the scheduler on $HOST:$PREFECT_PORT, its database in PostgreSQL (database `prefect`,
# through asyncpg), its own PREFECT_HOME under the state dir, analytics off. Flows and workers reach it
# with PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api.

PREFECT_PATTERN="prefect server start"

prefect_up() {
    local prefect
    prefect=$(tool prefect)
    (
        export PREFECT_HOME=$STACK_DIR/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
        export PREFECT_API_DATABASE_CONNECTION_URL
        PREFECT_API_DATABASE_CONNECTION_URL=$(pg_url asyncpg prefect)
        unset PREFECT_API_URL  # the server is not a client of another server
        server_up prefect "$PREFECT_PATTERN" "$PREFECT_PORT" LMFORGE_PREFECT_PORT "$PREFECT_API/health" \
            "$prefect" server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off
    )
}

prefect_down() { stop_pidfile "$RUN_DIR/prefect.pid" "$PREFECT_PATTERN" prefect; }

prefect_status() { server_status prefect "$PREFECT_PATTERN" "$PREFECT_API/health"; }
