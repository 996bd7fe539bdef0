#!/usr/bin/env bash
# Start / stop the local services on 127.0.0.1: a Ray head (dashboard :8265) and an MLflow server (:5000).
#   cluster/local.sh start | stop | status
# Everything binds to loopback. State (pids, logs, MLflow sqlite db and artifacts) lives in .cluster/.
#
# BACKENDS=postgres-s3 cluster/local.sh start   -- the production-shaped stores instead of sqlite + files:
#   MLflow's tracking/registry database on PostgreSQL (Debian's postgresql, :$PG_PORT) and its artifacts
#   on a local S3 server (moto in server mode, :$S3_PORT, bucket $S3_BUCKET). The pipeline can then keep
#   every output there too (data.output_dir=s3://..., train.storage_path=s3://...): export the lines
#   printed after "S3 client environment" (or source $STATE/s3.env) in the shell that submits jobs.
# MLFLOW_AUTH=basic cluster/local.sh start   -- MLflow with its basic-auth app: no request without a user;
#   identities `trainer` (the jobs: the only one that may write the registered model) and `serving` (read
#   only), credentials in $STATE/mlflow-trainer.env and $STATE/mlflow-serving.env (mode 0600): source the
#   first in the shell that runs jobs; give the second to Serve (serve.tracking_credentials_file).
# `stop` stops only what `start` started (a Ray head that was already running is left alone).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${BUNDLEREC_STATE:-$ROOT/.cluster}"
VENV="${VENV:-$ROOT/.venv}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
AGENT_PORT="${AGENT_PORT:-52366}"   # not Ray's default 52365: a second local instance (make test) keeps its job agent
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
BACKENDS="${BACKENDS:-sqlite}"      # sqlite (zero setup) | postgres-s3
MLFLOW_AUTH="${MLFLOW_AUTH:-none}"  # none | basic (MLflow's basic-auth app, see above)
PG_PORT="${PG_PORT:-5433}"
PG_DATA="${PG_DATA:-$STATE/postgres}"   # must be reachable by the postgres account when run as root
S3_PORT="${S3_PORT:-9000}"
S3_BUCKET="${S3_BUCKET:-bundlerec}"
NUM_CPUS="${NUM_CPUS:-6}"          # logical CPUs = bundlerec.runtime.LOCAL_NUM_CPUS (why: see there; tests check they agree)
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-1500000000}"
export PATH="$VENV/bin:$PATH"      # workers and job drivers must run the venv's python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Serve's HTTP proxy answers token-less requests and bodies on open routes itself (bundlerec/serving/edge.py)
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="${RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH:-bundlerec.serving.edge:proxy_middlewares}"
mkdir -p "$STATE/mlflow/artifacts" "$STATE/logs"

wait_http() {  # url timeout_s
  local t=0
  until curl -sf -o /dev/null "$1"; do
    sleep 1; t=$((t + 1))
    if [ "$t" -ge "$2" ]; then echo "timed out waiting for $1" >&2; return 1; fi
  done
}

as_db_user() {  # PostgreSQL refuses to run as root: use its own account then
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres_s3() {
  local bin; bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -x "$bin/initdb" ] || { echo "PostgreSQL not found: apt-get install postgresql" >&2; exit 1; }
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"; [ "$(id -u)" = 0 ] && chown postgres "$PG_DATA"
    as_db_user "$bin/initdb" -D "$PG_DATA" -A trust -U mlflow > "$STATE/logs/initdb.log" 2>&1 \
      || { cat "$STATE/logs/initdb.log"; exit 1; }
  fi
  as_db_user "$bin/pg_ctl" -D "$PG_DATA" -o "-h 127.0.0.1 -p $PG_PORT -k $PG_DATA" \
    -l "$PG_DATA/server.log" -w start > /dev/null
  psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" \
    | grep -q 1 || psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -qc "CREATE DATABASE mlflow"
  echo "PostgreSQL on 127.0.0.1:$PG_PORT (database mlflow)"
  cat > "$STATE/s3.env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=bundlerec-local AWS_SECRET_ACCESS_KEY=bundlerec-local AWS_DEFAULT_REGION=us-east-1
ENV
  # shellcheck disable=SC1091
  . "$STATE/s3.env"
  setsid python -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$STATE/logs/s3.log" 2>&1 &
  echo $! > "$STATE/s3.pid"
  wait_http "http://127.0.0.1:$S3_PORT/moto-api/" 60
  python -c "import boto3; boto3.client('s3').create_bucket(Bucket='$S3_BUCKET')"
  echo "S3 (moto) on http://127.0.0.1:$S3_PORT, bucket s3://$S3_BUCKET; S3 client environment ($STATE/s3.env):"
  cat "$STATE/s3.env"
}

start() {
  # Ray's token authentication (RAY_AUTH_MODE=token): the cluster and every client (ray job submit,
  # bundlerec, the dashboard in a browser) use the token in ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH);
  # made here once, mode 0600 (`ray get-auth-token` prints it, e.g. to paste into the dashboard)
  if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    ray get-auth-token --generate > /dev/null && chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    echo "generated a Ray auth token in ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  fi
  if ! curl -sf -o /dev/null "http://127.0.0.1:$DASHBOARD_PORT/api/gcs_healthz"; then
    echo "starting Ray head on 127.0.0.1:$RAY_PORT (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
    ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --dashboard-host=127.0.0.1 \
      --dashboard-port="$DASHBOARD_PORT" --num-cpus="$NUM_CPUS" --object-store-memory="$OBJECT_STORE_BYTES" \
      --dashboard-agent-listen-port="$AGENT_PORT" --disable-usage-stats > "$STATE/logs/ray-start.log" 2>&1 || { cat "$STATE/logs/ray-start.log"; exit 1; }
    wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/gcs_healthz" 60
    touch "$STATE/ray.started"
  else
    echo "Ray already running (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
  fi
  if ! curl -sf -o /dev/null "http://127.0.0.1:$MLFLOW_PORT/health"; then
    echo "starting MLflow server on http://127.0.0.1:$MLFLOW_PORT"
    local store="sqlite:///$STATE/mlflow/mlflow.db" artifacts="$STATE/mlflow/artifacts"
    if [ "$BACKENDS" = postgres-s3 ]; then
      start_postgres_s3
      store="postgresql://mlflow@127.0.0.1:$PG_PORT/mlflow" artifacts="s3://$S3_BUCKET/mlflow"
    fi
    local app=()
    if [ "$MLFLOW_AUTH" = basic ]; then
      [ -s "$STATE/mlflow-admin" ] || (umask 077; python -c "import secrets; print(secrets.token_urlsafe(24))" > "$STATE/mlflow-admin")
      printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/mlflow/auth.db\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\ngrant_default_workspace_access = true\n' "$STATE" > "$STATE/mlflow-auth.ini"
      [ -s "$STATE/mlflow-flask-key" ] || (umask 077; python -c "import secrets; print(secrets.token_hex(16))" > "$STATE/mlflow-flask-key")
      export MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow-auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$STATE/mlflow-admin")"
      export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE/mlflow-flask-key")"
      app=(--app-name basic-auth)
    fi
    setsid mlflow server "${app[@]}" --backend-store-uri "$store" \
      --artifacts-destination "$artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      > "$STATE/logs/mlflow.log" 2>&1 &
    echo $! > "$STATE/mlflow.pid"
    wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 300 || { tail -20 "$STATE/logs/mlflow.log"; exit 1; }
    if [ "$MLFLOW_AUTH" = basic ]; then
      python -c "from bundlerec.tracking import setup_basic_auth as s; print(s('http://127.0.0.1:$MLFLOW_PORT', open('$STATE/mlflow-admin').read().strip(), '$STATE'))"
      echo "MLflow requires a user: source $STATE/mlflow-trainer.env before running jobs;"
      echo "  deploy with serve.tracking_credentials_file=$STATE/mlflow-serving.env (read-only identity)"
    fi
  else
    echo "MLflow already running (http://127.0.0.1:$MLFLOW_PORT)"
  fi
}

stop() {
  if [ -f "$STATE/mlflow.pid" ]; then
    pid="$(cat "$STATE/mlflow.pid")"
    # setsid made the server a process-group leader: stop it and its gunicorn/uvicorn children
    kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    rm -f "$STATE/mlflow.pid"
    echo "stopped MLflow (pid $pid)"
  fi
  if [ -f "$STATE/s3.pid" ]; then
    pid="$(cat "$STATE/s3.pid")"; kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    rm -f "$STATE/s3.pid"; echo "stopped S3 (pid $pid)"
  fi
  if [ -f "$PG_DATA/postmaster.pid" ]; then
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    as_db_user "$bin/pg_ctl" -D "$PG_DATA" -m fast -w stop > /dev/null && echo "stopped PostgreSQL"
  fi
  if [ -f "$STATE/ray.started" ]; then
    # Serve first: with RAY_SERVE_ENABLE_HA_PROXY=1 its HAProxy process outlives `ray stop` (and keeps
    # its ports) unless Serve shuts it down
    if serve shutdown -y -a "http://127.0.0.1:$DASHBOARD_PORT" > /dev/null 2>&1; then sleep 3; fi
    ray stop > /dev/null 2>&1 && echo "stopped Ray" || true
    rm -f "$STATE/ray.started"
  fi
}

status() {
  curl -sf -o /dev/null "http://127.0.0.1:$DASHBOARD_PORT/api/gcs_healthz" && echo "Ray: up (http://127.0.0.1:$DASHBOARD_PORT)" || echo "Ray: down"
  curl -sf -o /dev/null "http://127.0.0.1:$MLFLOW_PORT/health" && echo "MLflow: up (http://127.0.0.1:$MLFLOW_PORT)" || echo "MLflow: down"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
