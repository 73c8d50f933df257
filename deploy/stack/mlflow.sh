# shellcheck shell=bash
# lmforge team stack: the MLflow tracking server (sourced by stack.sh).
#
# Runs, metrics and the model registry in PostgreSQL (database `mlflow`); artifacts uploaded through the
# server (--serve-artifacts, `mlflow-artifacts:/` URIs) into $ARTIFACTS_DIR, so clients need no access
# to that folder: MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT is all they need.

MLFLOW_PATTERN="mlflow server"

mlflow_up() {
    local mlflow
    mlflow=$(tool mlflow)
    mkdir -p "$ARTIFACTS_DIR"
    # In a subshell: the database URL (and its password) reaches the server through its environment only.
    (
        # MLflow 3's job runner (GenAI scorers, trace roll-ups; seven huey processes) serves nothing
        # lmforge uses: off unless asked for.
        export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
        export MLFLOW_BACKEND_STORE_URI
        MLFLOW_BACKEND_STORE_URI=$(pg_url psycopg2 mlflow)
        server_up mlflow "$MLFLOW_PATTERN" "$MLFLOW_PORT" LMFORGE_MLFLOW_PORT "$MLFLOW_URI/health" \
            "$mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
            --serve-artifacts --artifacts-destination "$ARTIFACTS_DIR"
    )
}

mlflow_down() { stop_pidfile "$RUN_DIR/mlflow.pid" "$MLFLOW_PATTERN" mlflow; }

mlflow_status() { server_status mlflow "$MLFLOW_PATTERN" "$MLFLOW_URI/health"; }
