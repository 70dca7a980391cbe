#!/usr/bin/env bash
# Smoke test of the Dockerfile with podman (no Docker engine needed):
#   build the image -> `batchsize migrate` in it -> run it detached on a named volume -> wait for
#   /healthz -> check the image's HEALTHCHECK, the non-root user and the SQLite file on /data ->
#   POST a small recommendation and GET it back (until it finishes) -> restart -> GET it again
#   (it lives on the volume) -> clean up. Prints PASS or FAIL; exits 0 only on PASS.
#
# Needs: podman (apt-get install podman buildah runc), python3 on the host; debootstrap only when no
# python:3.11-slim-bookworm image can be had (see BASE_IMAGE below). Run as root or rootless podman.
#
# Settings (environment):
#   IMAGE            tag to build                      (localhost/batchsize-service:smoke)
#   BASE_IMAGE       FROM image; empty: python:3.11-slim-bookworm if present or pullable, else a
#                    Debian bookworm stand-in with python3 built here with debootstrap
#   TORCH_SPEC       torch to install                  (torch==2.13.0+cpu when WHEELS holds that
#                    wheel, else the Dockerfile's default: the CUDA build from PyPI, several GB)
#   WHEELS           host folder of wheels for pip's find-links during the build (/opt/wheels)
#   PULL_TIMEOUT     seconds to try pulling python:3.11-slim-bookworm (60)
#   PORT             host port published for the API   (18000)
#   HEALTH_TIMEOUT   seconds to wait for /healthz      (180)
#   JOB_TIMEOUT      seconds to wait for the job to finish (180)
#   REQUIRE_SUCCESS  1: the recommendation must end `succeeded`; 0: any stored status will do (1)
#   KEEP_IMAGE       1: keep the built image for a faster rerun (1)
#   RUN_ARGS         extra `podman run` arguments, e.g. "--device nvidia.com/gpu=all" (CDI) on a GPU host
#   EXPECT_DEVICE    cpu or cuda: the device GET /v1/device must report (not checked when empty)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-localhost/batchsize-service:smoke}"
BASE_IMAGE="${BASE_IMAGE:-}"
WHEELS="${WHEELS:-/opt/wheels}"
PORT="${PORT:-18000}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-180}"
JOB_TIMEOUT="${JOB_TIMEOUT:-180}"
PULL_TIMEOUT="${PULL_TIMEOUT:-60}"
REQUIRE_SUCCESS="${REQUIRE_SUCCESS:-1}"
KEEP_IMAGE="${KEEP_IMAGE:-1}"
RUN_ARGS="${RUN_ARGS:-}"
EXPECT_DEVICE="${EXPECT_DEVICE:-}"
NAME="batchsize-smoke-$$"
VOLUME="batchsize-smoke-data-$$"
STANDIN="localhost/batchsize-standin-python:3.11-bookworm"
WORK="$(mktemp -d)"

log() { printf '==> %s\n' "$*" >&2; }
fail() {
  printf 'FAIL: %s\n' "$*"
  if podman container exists "$NAME" 2>/dev/null; then
    echo "--- last container logs ---"
    podman logs --tail 40 "$NAME" 2>&1 || true
  fi
  exit 1
}

cleanup() {
  podman rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
  podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  [ "$KEEP_IMAGE" = 1 ] || podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# podman inside a container/VM: runc, cgroupfs, file events and an explicit nofile limit avoid the
# usual systemd/crun assumptions. An operator's own CONTAINERS_CONF wins.
# Container ulimits: podman's defaults (nofile 1048576, nproc 32768) capped at the host's hard limits,
# which a container may not exceed without CAP_SYS_RESOURCE ("error setting rlimit ... not permitted").
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

# HTTP from the host with the stdlib: prints "STATUS BODY" (status 0: no answer).
status_of() { http "$@" | { read -r code _; echo "$code"; cat > /dev/null; }; }
http() {
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
except Exception as e:  # not listening yet, reset, ...
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
wait_healthy() {  # sets WAITED to the seconds it took, or fails
  local start now status
  start=$(date +%s)
  while :; do
    status=$(status_of GET "http://127.0.0.1:$PORT/healthz")
    now=$(date +%s)
    [ "$status" = 200 ] && { WAITED=$((now - start)); return; }
    [ "$(podman inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ] || fail "container exited before /healthz answered"
    [ $((now - start)) -lt "$HEALTH_TIMEOUT" ] || fail "/healthz did not answer 200 within ${HEALTH_TIMEOUT}s"
    sleep 1
  done
}

# --- base image -------------------------------------------------------------------------------------
if [ -z "$BASE_IMAGE" ]; then
  if podman image exists python:3.11-slim-bookworm; then
    BASE_IMAGE=python:3.11-slim-bookworm
  elif podman image exists "$STANDIN"; then
    BASE_IMAGE="$STANDIN"  # made by an earlier run here; `podman rmi` it to try pulling again
  elif timeout "$PULL_TIMEOUT" podman pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
    BASE_IMAGE=python:3.11-slim-bookworm
  else
    BASE_IMAGE="$STANDIN"
    command -v debootstrap >/dev/null || fail "no python:3.11-slim-bookworm and no debootstrap for a stand-in"
    log "python:3.11-slim-bookworm cannot be pulled: building stand-in $STANDIN with debootstrap"
    MIRROR=$("$ROOT/scripts/apt_mirror") || fail "no Debian mirror configured for apt"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    rm -rf "$WORK/rootfs/var/lib/apt/lists/"* "$WORK/rootfs/var/cache/apt/"*
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$STANDIN" >/dev/null
    rm -rf "$WORK/rootfs"
  fi
fi
log "base image: $BASE_IMAGE"

# --- build ------------------------------------------------------------------------------------------
# pip inside the build sees the host's CA bundle (for a TLS-intercepting proxy) and, when WHEELS exists,
# a local wheel folder; both come in as read-only mounts through /etc/pip.conf and leave no layer.
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
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
if [ -z "${TORCH_SPEC:-}" ] && compgen -G "$WHEELS/torch-2.13.0+cpu-*.whl" >/dev/null; then
  TORCH_SPEC="torch==2.13.0+cpu"
fi
[ -n "${TORCH_SPEC:-}" ] && build_args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
log "building $IMAGE (TORCH_SPEC=${TORCH_SPEC:-Dockerfile default})"
build_start=$(date +%s)
podman build --format docker --network host --ulimit "${ULIMITS[0]}" --ulimit "${ULIMITS[1]}" "${mounts[@]}" "${build_args[@]}" -t "$IMAGE" "$ROOT" \
  > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "podman build failed"; }
build_s=$(( $(date +%s) - build_start ))
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
log "built in ${build_s}s, image size $((size / 1000000)) MB"

healthcheck=$(podman image inspect -f '{{json .Config.Healthcheck}}' "$IMAGE" 2>/dev/null || echo null)
case "$healthcheck" in *healthz*) ;; *) fail "image has no HEALTHCHECK against /healthz: $healthcheck" ;; esac
# buildah leaves empty mount points (/wheels, /etc/pip.conf) behind; nothing that was mounted may stay.
podman run --rm --no-healthcheck --entrypoint /bin/sh "$IMAGE" -c \
  'test -z "$(ls -A /wheels 2>/dev/null)" && ! test -s /etc/pip.conf' \
  || fail "build-time mounts left content in the image"
ca() { podman run --rm --no-healthcheck --entrypoint sha256sum "$1" /etc/ssl/certs/ca-certificates.crt 2>/dev/null; }
[ "$(ca "$IMAGE")" = "$(ca "$BASE_IMAGE")" ] || fail "the host's CA bundle was baked into the image"

# --- migrate, then serve on a volume -------------------------------------------------------------------
podman volume create "$VOLUME" >/dev/null
log "batchsize migrate (in the image, on the volume)"
podman run --rm --no-healthcheck -v "$VOLUME:/data" "$IMAGE" migrate || fail "batchsize migrate failed in the container"

log "starting $NAME on 127.0.0.1:$PORT"
# --health-interval=disable: no systemd timer (often no systemd here); `podman healthcheck run` below
# runs the image's HEALTHCHECK command on demand instead.
# shellcheck disable=SC2086  # RUN_ARGS is a list of words on purpose
podman run -d --name "$NAME" -v "$VOLUME:/data" -p "127.0.0.1:$PORT:8000" --health-interval=disable \
  $RUN_ARGS "$IMAGE" >/dev/null 2>"$WORK/run.err" \
  || { cat "$WORK/run.err"; fail "podman run failed"; }
wait_healthy
healthy_s=$WAITED
log "/healthz answered 200 after ${healthy_s}s"

podman healthcheck run "$NAME" >/dev/null 2>&1 || fail "the image's HEALTHCHECK command failed in the running container"
uid=$(podman exec "$NAME" python -c 'import os; print(os.getuid())')
[ "$uid" != 0 ] || fail "the service runs as root"
podman exec "$NAME" python -c 'import os; assert os.path.getsize("/data/batchsize.db") > 0' \
  || fail "no SQLite file at /data/batchsize.db"
log "HEALTHCHECK passes, uid=$uid, /data/batchsize.db present"

# /docs is served offline: its Swagger UI assets must be inside the installed package.
read -r code resp <<< "$(http GET "http://127.0.0.1:$PORT/docs" | tr '\n' ' ')"
[ "$code" = 200 ] || fail "GET /docs -> $code"
asset=$(grep -o 'src="/static/[^"]*"' <<< "$resp" | head -1 | cut -d'"' -f2 || true)
if [ -n "$asset" ]; then
  code=$(status_of GET "http://127.0.0.1:$PORT$asset")
  [ "$code" = 200 ] || fail "GET $asset (used by /docs) -> $code: package data missing from the image?"
fi
log "GET /docs -> 200${asset:+, $asset -> 200}"
read -r code resp <<< "$(http GET "http://127.0.0.1:$PORT/v1/device")"
[ "$code" = 200 ] || fail "GET /v1/device -> $code $resp"
device=$(json_get type <<< "$resp")
log "GET /v1/device -> 200: $device ($(json_get name <<< "$resp"))"
[ -z "$EXPECT_DEVICE" ] || [ "$device" = "$EXPECT_DEVICE" ] || fail "probes run on $device, not $EXPECT_DEVICE"

# --- a recommendation: POST, GET back, wait for it to finish -----------------------------------------
body='{"model": {"name": "mlp"}, "time_budget_s": 20}'
read -r code resp <<< "$(http POST "http://127.0.0.1:$PORT/v1/recommendations" "$body")"
[ "$code" = 202 ] || [ "$code" = 200 ] || fail "POST /v1/recommendations -> $code $resp"
id=$(json_get id <<< "$resp")
[ -n "$id" ] || fail "POST answered without an id: $resp"
log "POST /v1/recommendations -> $code, id=$id"

deadline=$(( $(date +%s) + JOB_TIMEOUT ))
while :; do
  read -r code resp <<< "$(http GET "http://127.0.0.1:$PORT/v1/recommendations/$id")"
  [ "$code" = 200 ] || fail "GET /v1/recommendations/$id -> $code $resp"
  [ "$(json_get id <<< "$resp")" = "$id" ] || fail "GET returned another recommendation: $resp"
  status=$(json_get status <<< "$resp")
  case "$status" in succeeded|failed|cancelled) break ;; esac
  [ "$(date +%s)" -lt "$deadline" ] || break
  sleep 2
done
log "GET /v1/recommendations/$id -> 200, status=$status"
if [ "$status" = succeeded ]; then
  log "recommended_batch_size=$(json_get result.recommended_batch_size <<< "$resp")," \
      "max_feasible_batch_size=$(json_get result.max_feasible_batch_size <<< "$resp")," \
      "device=$(json_get result.device.type <<< "$resp")"
elif [ "$REQUIRE_SUCCESS" = 1 ]; then
  fail "recommendation ended '$status' (error: $(json_get error.message <<< "$resp"))"
fi

# --- the answer survives a restart (it lives on the volume) -----------------------------------------
log "restarting the container"
stop_start=$(date +%s)
podman stop -t 30 "$NAME" >/dev/null 2>>"$WORK/run.err" || { cat "$WORK/run.err"; fail "podman stop failed"; }
stop_s=$(( $(date +%s) - stop_start ))
[ "$stop_s" -lt 30 ] || fail "the service ignored SIGTERM (stop took ${stop_s}s)"
podman start "$NAME" >/dev/null 2>>"$WORK/run.err" || { cat "$WORK/run.err"; fail "podman start failed"; }
wait_healthy
restart_s=$WAITED
read -r code resp <<< "$(http GET "http://127.0.0.1:$PORT/v1/recommendations/$id")"
[ "$code" = 200 ] || fail "after restart GET /v1/recommendations/$id -> $code $resp"
log "stopped on SIGTERM in ${stop_s}s; after restart (healthy in ${restart_s}s): GET -> 200, status=$(json_get status <<< "$resp")"

echo "PASS: image $IMAGE ($((size / 1000000)) MB, base $BASE_IMAGE, built in ${build_s}s), healthy in ${healthy_s}s, recommendation $id $status"
