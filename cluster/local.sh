#!/usr/bin/env bash
# Start / stop the local services on 127.0.0.1: a Ray head (dashboard :8265) and an MLflow server (:5000).
#   cluster/local.sh start | stop | status
# Everything binds to loopback. State (pids, logs, MLflow sqlite db and artifacts) lives in .cluster/.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${BUNDLEREC_STATE:-$ROOT/.cluster}"
VENV="${VENV:-$ROOT/.venv}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
AGENT_PORT="${AGENT_PORT:-52366}"   # not Ray's default 52365: a second local instance (make test) keeps its job agent
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
NUM_CPUS="${NUM_CPUS:-6}"          # logical CPUs = bundlerec.runtime.LOCAL_NUM_CPUS (why: see there; tests check they agree)
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-1500000000}"
export PATH="$VENV/bin:$PATH"      # workers and job drivers must run the venv's python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$STATE/mlflow/artifacts" "$STATE/logs"

wait_http() {  # url timeout_s
  local t=0
  until curl -sf -o /dev/null "$1"; do
    sleep 1; t=$((t + 1))
    if [ "$t" -ge "$2" ]; then echo "timed out waiting for $1" >&2; return 1; fi
  done
}

start() {
  if ! curl -sf -o /dev/null "http://127.0.0.1:$DASHBOARD_PORT/api/version"; then
    echo "starting Ray head on 127.0.0.1:$RAY_PORT (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
    ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --dashboard-host=127.0.0.1 \
      --dashboard-port="$DASHBOARD_PORT" --num-cpus="$NUM_CPUS" --object-store-memory="$OBJECT_STORE_BYTES" \
      --dashboard-agent-listen-port="$AGENT_PORT" --disable-usage-stats > "$STATE/logs/ray-start.log" 2>&1 || { cat "$STATE/logs/ray-start.log"; exit 1; }
    wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" 60
  else
    echo "Ray already running (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
  fi
  if ! curl -sf -o /dev/null "http://127.0.0.1:$MLFLOW_PORT/health"; then
    echo "starting MLflow server on http://127.0.0.1:$MLFLOW_PORT"
    setsid mlflow server --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
      --artifacts-destination "$STATE/mlflow/artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      > "$STATE/logs/mlflow.log" 2>&1 &
    echo $! > "$STATE/mlflow.pid"
    wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 300 || { tail -20 "$STATE/logs/mlflow.log"; exit 1; }
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
  ray stop > /dev/null 2>&1 && echo "stopped Ray" || true
}

status() {
  curl -sf -o /dev/null "http://127.0.0.1:$DASHBOARD_PORT/api/version" && echo "Ray: up (http://127.0.0.1:$DASHBOARD_PORT)" || echo "Ray: down"
  curl -sf -o /dev/null "http://127.0.0.1:$MLFLOW_PORT/health" && echo "MLflow: up (http://127.0.0.1:$MLFLOW_PORT)" || echo "MLflow: down"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
