#!/usr/bin/env bash
# Smoke test of docker-compose.yml with podman (no Docker engine needed):
#   build the service image (as scripts/docker_smoke.sh does) and, when postgres:16
#   cannot be pulled, a stand-in with that name (Debian's postgresql package and an entrypoint that
#   honours POSTGRES_USER/PASSWORD/DB) -> bring the stack up (PostgreSQL, two API replicas, a worker) ->
#   wait for both replicas' /healthz -> POST a small recommendation to the first replica -> read it from
#   the second until it is `succeeded` (the worker probed it) -> check GET /v1/workers lists the worker
#   alive -> tear the stack down with its volumes. Prints PASS or FAIL; exits 0 only on PASS.
#
# Needs: podman (apt-get install podman buildah runc), a compose tool (`podman compose`, or podman-compose:
# pip install podman-compose; a .venv/bin/podman-compose in this checkout is used too), python3 on the host,
# debootstrap when no python:3.11-slim-bookworm / postgres:16 image can be had. Publishes host ports 8001
# and 8002, as docker-compose.yml does.
#
# Settings (environment): PROJECT (compose project name, batchsize-compose-smoke), WHEELS (/opt/wheels),
# TORCH_SPEC, PULL_TIMEOUT (60), HEALTH_TIMEOUT (240), JOB_TIMEOUT (300), KEEP_IMAGES (1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROJECT="${PROJECT:-batchsize-compose-smoke}"
WHEELS="${WHEELS:-/opt/wheels}"
PULL_TIMEOUT="${PULL_TIMEOUT:-60}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-240}"
JOB_TIMEOUT="${JOB_TIMEOUT:-300}"
KEEP_IMAGES="${KEEP_IMAGES:-1}"
SERVICE_IMAGE=localhost/batchsize-service:latest  # docker-compose.yml's `image: batchsize-service`
POSTGRES_IMAGE=postgres:16  # docker-compose.yml's PostgreSQL image
PYTHON_STANDIN="localhost/batchsize-standin-python:3.11-bookworm"  # the same stand-in as docker_smoke.sh
WORK="$(mktemp -d)"

log() { printf '==> %s\n' "$*" >&2; }
fail() {
  printf 'FAIL: %s\n' "$*"
  if [ -n "${COMPOSE_UP:-}" ]; then
    for name in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      echo "--- last logs of $name ---"
      podman logs --tail 20 "$name" 2>&1 || true
    done
  fi
  exit 1
}

# --- podman without systemd (see docker_smoke.sh) ----------------------------------------------------
capped() { local v; v=$(ulimit -H "$1"); { [ "$v" = unlimited ] || [ "$v" -gt "$2" ]; } && v=$2; echo "$v:$v"; }
ULIMITS=("nofile=$(capped -n 1048576)" "nproc=$(capped -u 32768)")
if [ -z "${CONTAINERS_CONF:-}" ]; then
  cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["${ULIMITS[0]}", "${ULIMITS[1]}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_CONF="$WORK/containers.conf"
fi
command -v podman >/dev/null || fail "podman is not installed (apt-get install podman buildah runc)"
if podman compose version >/dev/null 2>&1; then
  COMPOSE=(podman compose)
elif command -v podman-compose >/dev/null; then
  COMPOSE=(podman-compose)
elif [ -x "$ROOT/.venv/bin/podman-compose" ]; then
  COMPOSE=("$ROOT/.venv/bin/podman-compose")
else
  fail "no compose tool: pip install podman-compose"
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

cleanup() {
  if [ -n "${COMPOSE_UP:-}" ]; then
    compose down -v -t 10 >/dev/null 2>&1 || true
  fi
  [ "$KEEP_IMAGES" = 1 ] || podman rmi -f "$SERVICE_IMAGE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

http() {  # http METHOD URL [BODY]: prints "STATUS BODY" (status 0: no answer)
  python3 - "$@" <<'EOF'
import sys, urllib.error, urllib.request
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, repr(e))
EOF
}
json_get() {  # json_get KEY < body
  python3 -c '
import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)' "$1"
}

# --- images ---------------------------------------------------------------------------------------
pulled() { podman image exists "$1" || timeout "$PULL_TIMEOUT" podman pull -q "$1" >/dev/null 2>&1; }

BASE_IMAGE=python:3.11-slim-bookworm
if ! pulled "$BASE_IMAGE"; then
  BASE_IMAGE="$PYTHON_STANDIN"
  if ! podman image exists "$PYTHON_STANDIN"; then
    command -v debootstrap >/dev/null || fail "no python:3.11-slim-bookworm and no debootstrap for a stand-in"
    log "building $PYTHON_STANDIN with debootstrap"
    MIRROR=$("$ROOT/scripts/apt_mirror") || fail "no Debian mirror configured for apt"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    rm -rf "$WORK/rootfs/var/lib/apt/lists/"* "$WORK/rootfs/var/cache/apt/"*
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$PYTHON_STANDIN" >/dev/null
    rm -rf "$WORK/rootfs"
  fi
fi
log "base image: $BASE_IMAGE"

if ! pulled "$POSTGRES_IMAGE"; then
  # A stand-in under the compose file's name: Debian bookworm's PostgreSQL (15) on the same base, with
  # the official image's interface as far as docker-compose.yml uses it (the POSTGRES_* variables, the
  # data folder, pg_isready for the health check).
  log "$POSTGRES_IMAGE cannot be pulled: building a stand-in (Debian postgresql) under that name"
  mkdir -p "$WORK/postgres"
  cat > "$WORK/postgres/entrypoint.sh" <<'EOF'
#!/bin/sh
# First start: a cluster owned by POSTGRES_USER with POSTGRES_PASSWORD (scram over TCP, trust on the
# local socket), and the database POSTGRES_DB. Then the server, as the postgres user, on all addresses.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
[ -n "${POSTGRES_PASSWORD:-}" ] || { echo "POSTGRES_PASSWORD must be set" >&2; exit 1; }
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /var/run/postgresql
chown -R postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --no-locale > /dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  if [ "$POSTGRES_DB" != postgres ]; then
    echo "CREATE DATABASE \"$POSTGRES_DB\";" | as_postgres postgres --single -D "$PGDATA" -j postgres > /dev/null
  fi
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$@" -D "$PGDATA" -c listen_addresses='*'
EOF
  cat > "$WORK/postgres/Containerfile" <<EOF
FROM $BASE_IMAGE
RUN mkdir -p /etc/postgresql-common \\
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \\
 && apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql > /dev/null \\
 && rm -rf /var/lib/apt/lists/* \\
 && ln -s "\$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)" /usr/local/pgbin
ENV PATH=/usr/local/pgbin:\$PATH PGDATA=/var/lib/postgresql/data
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
EOF
  podman build --format docker --network host -t "$POSTGRES_IMAGE" "$WORK/postgres" > "$WORK/postgres-build.log" 2>&1 \
    || { tail -30 "$WORK/postgres-build.log"; fail "building the PostgreSQL stand-in failed"; }
fi

# The service image, built here as scripts/docker_smoke.sh builds it (the host's CA bundle and a local
# wheel folder come in as read-only mounts); compose then finds it and builds nothing.
mounts=()
{
  echo "[global]"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
  fi
  if [ -d "$WHEELS" ]; then
    mounts+=(-v "$WHEELS:/wheels:ro")
    echo "find-links = /wheels"
  fi
} > "$WORK/pip.conf"
mounts+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ -z "${TORCH_SPEC:-}" ] && compgen -G "$WHEELS/torch-2.13.0+cpu-*.whl" >/dev/null; then
  TORCH_SPEC="torch==2.13.0+cpu"
fi
[ -n "${TORCH_SPEC:-}" ] && build_args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
log "building $SERVICE_IMAGE (TORCH_SPEC=${TORCH_SPEC:-Dockerfile default})"
podman build --format docker --network host --ulimit "${ULIMITS[0]}" --ulimit "${ULIMITS[1]}" "${mounts[@]}" \
  "${build_args[@]}" -t "$SERVICE_IMAGE" "$ROOT" > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; fail "podman build failed"; }

# --- the stack --------------------------------------------------------------------------------------
# Without systemd, podman cannot run health checks on a timer (it logs an error and runs the container
# anyway), and podman before 4.6 cannot wait on `condition: service_healthy`: so PostgreSQL is brought up
# first and this script waits for pg_isready, then for each replica's /healthz, itself.
COMPOSE_UP=1
compose down -v -t 5 >/dev/null 2>&1 || true  # what an interrupted earlier run left
log "compose up: postgres"
compose up -d postgres > "$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; fail "compose up postgres failed"; }
postgres=$(podman ps --filter "label=io.podman.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=postgres" --format '{{.Names}}' | head -n 1)
[ -n "$postgres" ] || fail "no postgres container"
start=$(date +%s)
until podman exec "$postgres" pg_isready -U batchsize -d batchsize >/dev/null 2>&1; do
  [ $(( $(date +%s) - start )) -lt "$HEALTH_TIMEOUT" ] || fail "PostgreSQL not ready within ${HEALTH_TIMEOUT}s"
  sleep 1
done
log "PostgreSQL ready after $(( $(date +%s) - start ))s: $(podman exec "$postgres" postgres --version)"

log "compose up: api-1, api-2, worker"
compose up -d > "$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; fail "compose up failed"; }
start=$(date +%s)
for port in 8001 8002; do
  until [ "$(http GET "http://127.0.0.1:$port/healthz" | cut -d' ' -f1)" = 200 ]; do
    [ $(( $(date +%s) - start )) -lt "$HEALTH_TIMEOUT" ] || fail "replica on :$port not healthy within ${HEALTH_TIMEOUT}s"
    sleep 2
  done
done
log "both replicas answer /healthz after $(( $(date +%s) - start ))s"

# --- one recommendation through two replicas ---------------------------------------------------------
body='{"model": {"name": "mlp"}, "time_budget_s": 20}'
read -r code resp <<< "$(http POST "http://127.0.0.1:8001/v1/recommendations" "$body")"
[ "$code" = 202 ] || [ "$code" = 200 ] || fail "POST :8001/v1/recommendations -> $code $resp"
id=$(json_get id <<< "$resp")
[ -n "$id" ] || fail "POST answered without an id: $resp"
log "POST :8001/v1/recommendations -> $code, id=$id"
deadline=$(( $(date +%s) + JOB_TIMEOUT ))
while :; do
  read -r code resp <<< "$(http GET "http://127.0.0.1:8002/v1/recommendations/$id")"
  [ "$code" = 200 ] || fail "GET :8002/v1/recommendations/$id -> $code $resp"
  status=$(json_get status <<< "$resp")
  case "$status" in succeeded|failed|cancelled) break ;; esac
  [ "$(date +%s)" -lt "$deadline" ] || fail "the job is still $status after ${JOB_TIMEOUT}s"
  sleep 2
done
[ "$status" = succeeded ] || fail "the job ended $status: $(json_get error.message <<< "$resp")"
log "GET :8002/v1/recommendations/$id -> succeeded, recommended_batch_size=$(json_get result.recommended_batch_size <<< "$resp")"

read -r code resp <<< "$(http GET "http://127.0.0.1:8002/v1/workers")"
[ "$code" = 200 ] || fail "GET :8002/v1/workers -> $code $resp"
alive=$(python3 -c 'import json, sys; print(sum(1 for w in json.load(sys.stdin) if w["alive"]))' <<< "$resp")
[ "$alive" -ge 1 ] || fail "GET /v1/workers lists no live worker: $resp"
log "GET :8002/v1/workers -> $alive live worker(s)"

log "compose down -v"
compose down -v -t 10 > "$WORK/down.log" 2>&1 || { cat "$WORK/down.log"; fail "compose down failed"; }
COMPOSE_UP=
echo "PASS: compose stack (PostgreSQL from $POSTGRES_IMAGE, 2 replicas, 1 worker): recommendation $id POSTed to api-1, read succeeded from api-2"
