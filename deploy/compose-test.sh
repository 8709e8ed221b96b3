#!/usr/bin/env bash
# End-to-end check of the Dockerfile and docker-compose.yml on a machine with a Docker engine and
# no container registry:
#   1. makes the base image (deploy/base-image.sh; reused while present);
#   2. builds the runtime-prebuilt image from the host-built binaries (target/debug by default);
#   3. brings the stack up under a unique compose project with two workers on a free port;
#   4. submits exec tasks with taskctl from the host and checks that both workers ran some;
#   5. parks tasks on a queue no worker serves, restarts the broker container, and checks that
#      finished results and parked tasks survived and that the workers came back;
#   6. tears everything down (containers, network, volumes, image), also on failure or timeout.
#
# Env: TASKD_BIN_DIR (dir with taskd, taskworker, taskctl; default <repo>/target/debug),
#      TASKD_COMPOSE_TEST_TIMEOUT (seconds for the whole run, default 420),
#      TASKD_COMPOSE_TEST_TOKEN (token for the stack; default a random one, "none" for no token),
#      TASKD_COMPOSE_TEST_KEEP=1 (leave the stack up for inspection; tear down by hand).
set -euo pipefail

# The whole run is bounded: re-run this script under timeout (TERM, then KILL 60 s later).
if [ -z "${TASKD_COMPOSE_TEST_BOUNDED:-}" ]; then
    export TASKD_COMPOSE_TEST_BOUNDED=1
    exec timeout --kill-after=60 "${TASKD_COMPOSE_TEST_TIMEOUT:-420}" bash "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${TASKD_BIN_DIR:-$ROOT/target/debug}"
BASE_IMAGE="${TASKD_BASE_IMAGE:-taskd-base:bookworm}"
PROJECT="taskd-ci-$$-${RANDOM}"
IMAGE="taskd:${PROJECT}"
EXEC_TASKS=20
PARKED_TASKS=3
PARKED_QUEUE="ci-parked"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/taskd-compose-test.XXXXXX")"
STARTED=$SECONDS
FAILED=0

say() { printf '[compose-test %3ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
pass() { printf 'PASS: %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*"
    FAILED=1
    exit 1
}

# ---- docker compose v2 plugin or docker-compose v1 ---------------------------------------------
if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE_CMD=(docker-compose)
else
    fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

# ---- teardown, also on failure and on timeout --------------------------------------------------
# A trap can fire while a command's output is redirected to a log; fds 3 and 4 keep the real ones.
exec 3>&1 4>&2
teardown() {
    local rc=$?
    exec 1>&3 2>&4
    # Finish the teardown even when the timeout's TERM arrives now (KILL comes 60 s later).
    trap - EXIT
    trap '' INT TERM
    if [ "$rc" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
        say "failed (exit $rc); last logs of the stack:"
        compose logs --no-color --tail 40 2>&1 | sed 's/^/  | /' || true
    fi
    if [ "${TASKD_COMPOSE_TEST_KEEP:-}" = 1 ]; then
        say "KEEP: project $PROJECT left up (${COMPOSE_CMD[*]} -p $PROJECT -f $ROOT/docker-compose.yml down -v)"
    else
        say "tearing down project $PROJECT"
        compose down -v --remove-orphans -t 10 >"$WORK/down.log" 2>&1 ||
            { say "compose down failed:"; cat "$WORK/down.log"; }
        docker image rm -f "$IMAGE" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ] && [ "$FAILED" -eq 0 ]; then
        printf 'compose-test: PASS (%ds)\n' "$((SECONDS - STARTED))"
    else
        printf 'compose-test: FAIL (exit %d after %ds)\n' "$rc" "$((SECONDS - STARTED))"
        [ "$rc" -eq 0 ] && rc=1
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'say "interrupted (timeout?)" >&3; exit 124' INT TERM

# ---- the host's taskctl, with the token --------------------------------------------------------
for bin in taskd taskworker taskctl; do
    [ -x "$BIN_DIR/$bin" ] ||
        fail "binary $BIN_DIR/$bin missing: cargo build -p taskd-server --bin taskd -p taskd-worker --bin taskworker -p taskd-client --bin taskctl"
done
TASKCTL="$BIN_DIR/taskctl"
case "${TASKD_COMPOSE_TEST_TOKEN:-}" in
    none) export TASKD_TOKEN="" ;;
    "") TASKD_TOKEN="ci-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"; export TASKD_TOKEN ;;
    *) export TASKD_TOKEN="$TASKD_COMPOSE_TEST_TOKEN" ;;
esac
unset TASKD_BROKER
taskctl() { "$TASKCTL" --broker "127.0.0.1:$PORT" "$@"; }

# json EXPR < input: evaluates a Python expression over the parsed JSON `j` and prints it.
json() { python3 -c 'import json,sys; j=json.load(sys.stdin); r=eval(sys.argv[1]); print(r if not isinstance(r,(list,dict)) else json.dumps(r))' "$1"; }

# wait_for SECONDS WHAT CMD...: runs CMD every 0.5 s until it succeeds, at most SECONDS.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for $what"
        sleep 0.5
    done
}

# ---- 1. base image -----------------------------------------------------------------------------
say "base image $BASE_IMAGE"
TASKD_BASE_IMAGE="$BASE_IMAGE" "$ROOT/deploy/base-image.sh" || fail "making the base image"
pass "base image $BASE_IMAGE present"

# ---- 2. runtime image from the host's binaries -------------------------------------------------
mkdir -p "$WORK/context/dist"
for bin in taskd taskworker taskctl; do
    # Debug info is of no use in the image and makes the build context large.
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug -o "$WORK/context/dist/$bin" "$BIN_DIR/$bin"
    else
        cp "$BIN_DIR/$bin" "$WORK/context/dist/$bin"
    fi
done
say "building $IMAGE (target runtime-prebuilt)"
if ! docker build -f "$ROOT/Dockerfile" --target runtime-prebuilt \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg BIN_DIR=dist \
    -t "$IMAGE" "$WORK/context" >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log"
    fail "docker build of the runtime-prebuilt target"
fi
pass "image $IMAGE built"

ldd_out="$(docker run --rm --entrypoint ldd "$IMAGE" /usr/local/bin/taskd 2>&1)" ||
    fail "ldd of taskd in the image: $ldd_out"
if grep -q 'not found' <<<"$ldd_out"; then fail "taskd misses libraries in the image: $ldd_out"; fi
user="$(docker run --rm --entrypoint id "$IMAGE" -u)"
[ "$user" = 10001 ] || fail "image runs as uid $user, want 10001"
pass "image runs as uid 10001 and taskd's libraries resolve"

# ---- 3. the stack: broker + 2 workers on a free port -------------------------------------------
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export TASKD_IMAGE="$IMAGE" TASKD_PORT="$PORT" TASKWORKER_CONCURRENCY=2
say "compose up project $PROJECT, broker on 127.0.0.1:$PORT, 2 workers"
if ! compose up -d --no-build --scale worker=2 >"$WORK/up.log" 2>&1; then
    cat "$WORK/up.log"
    fail "compose up"
fi
wait_for 60 "the broker to serve on 127.0.0.1:$PORT" taskctl health
pass "broker healthy on 127.0.0.1:$PORT"

broker_health() {
    docker inspect --format '{{.State.Health.Status}}' "$(compose ps -q broker)"
}
[ "$(broker_health)" = healthy ] || fail "the broker container is not healthy: $(broker_health)"
pass "the broker's compose healthcheck (taskctl health inside the container) says healthy"

# Worker container hostnames (= short container ids), to match the tasks' outputs against.
mapfile -t WORKER_IDS < <(compose ps -q worker)
[ "${#WORKER_IDS[@]}" -eq 2 ] || fail "want 2 worker containers, have ${#WORKER_IDS[@]}"
WORKER_HOSTS=()
for id in "${WORKER_IDS[@]}"; do
    WORKER_HOSTS+=("$(docker inspect --format '{{.Config.Hostname}}' "$id")")
done
say "worker containers: ${WORKER_HOSTS[*]}"

workers_connected() {
    local n
    n="$(taskctl --json workers | json 'len(j["workers"] if isinstance(j, dict) else j)')" || return 1
    [ "$n" -ge "$1" ]
}
wait_for 60 "2 workers to connect" workers_connected 2
pass "2 workers connected"

# ---- 4. exec tasks from the host, run by both workers ------------------------------------------
say "submitting $EXEC_TASKS exec tasks"
: >"$WORK/exec.ids"
for i in $(seq 1 "$EXEC_TASKS"); do
    taskctl --json exec -- sh -c 'sleep 0.2; hostname' >"$WORK/exec.$i.json" ||
        fail "taskctl exec #$i"
    json 'j["id"]' <"$WORK/exec.$i.json" >>"$WORK/exec.ids" || fail "no id in: $(cat "$WORK/exec.$i.json")"
done
pass "$EXEC_TASKS exec tasks submitted"

# state_of ID: the task's state name from taskctl get --json.
state_of() { taskctl --json get "$1" | json 'j["state"]'; }
all_done() {
    local id state
    while read -r id; do
        state="$(state_of "$id")" || return 1
        case "$state" in *SUCCEEDED*) ;; *) return 1 ;; esac
    done <"$WORK/exec.ids"
}
wait_for 120 "$EXEC_TASKS exec tasks to succeed" all_done
pass "$EXEC_TASKS exec tasks succeeded"

# stdout_of ID: what the task printed.
stdout_of() { taskctl --json get "$1" | json 'j["result"]["stdout"]'; }
: >"$WORK/hosts"
while read -r id; do
    stdout_of "$id" >>"$WORK/hosts" || fail "reading the outcome of $id"
done <"$WORK/exec.ids"
for host in "${WORKER_HOSTS[@]}"; do
    n="$(grep -cx "$host" "$WORK/hosts" || true)"
    [ "$n" -ge 1 ] || fail "worker $host ran none of the $EXEC_TASKS tasks (hosts seen: $(sort "$WORK/hosts" | uniq -c | tr '\n' ' '))"
    say "worker $host ran $n tasks"
done
pass "both workers ran tasks ($(sort "$WORK/hosts" | uniq -c | tr -s ' ' | tr '\n' ';'))"

# ---- 5. parked tasks, broker restart, durability -----------------------------------------------
: >"$WORK/parked.ids"
for i in $(seq 1 "$PARKED_TASKS"); do
    taskctl --json exec --queue "$PARKED_QUEUE" -- echo "parked $i" >"$WORK/parked.$i.json" ||
        fail "submitting parked task #$i"
    json 'j["id"]' <"$WORK/parked.$i.json" >>"$WORK/parked.ids"
done
while read -r id; do
    state="$(state_of "$id")"
    case "$state" in *QUEUED*) ;; *) fail "parked task $id is $state, want QUEUED" ;; esac
done <"$WORK/parked.ids"
pass "$PARKED_TASKS tasks queued on $PARKED_QUEUE (no worker serves it)"

cp "$WORK/hosts" "$WORK/hosts.before"

# check_durable WHEN: finished results unchanged, parked tasks still queued, workers back.
check_durable() {
    wait_for 60 "the broker to serve again $1" taskctl health
    pass "broker healthy again $1"

    : >"$WORK/hosts"
    while read -r id; do
        state="$(state_of "$id")" || fail "get $id $1"
        case "$state" in *SUCCEEDED*) ;; *) fail "finished task $id is $state $1" ;; esac
        stdout_of "$id" >>"$WORK/hosts"
    done <"$WORK/exec.ids"
    cmp -s "$WORK/hosts" "$WORK/hosts.before" || fail "task outputs changed $1"
    pass "$EXEC_TASKS finished results unchanged $1"

    while read -r id; do
        state="$(state_of "$id")" || fail "get parked $id $1"
        case "$state" in *QUEUED*) ;; *) fail "parked task $id is $state $1, want QUEUED" ;; esac
    done <"$WORK/parked.ids"
    pass "$PARKED_TASKS parked tasks still queued $1"

    wait_for 90 "both workers to reconnect $1" workers_connected 2
    taskctl --json exec --wait -- hostname >"$WORK/after.json" || fail "exec --wait $1"
    pass "workers reconnected and ran a new task $1"
}

say "restarting the broker container (compose restart broker)"
compose restart -t 20 broker >"$WORK/restart.log" 2>&1 ||
    { cat "$WORK/restart.log"; fail "compose restart broker"; }
check_durable "after compose restart broker"

# A new broker container on the same named volume: what an upgrade to a new image does.
say "replacing the broker container (compose up --force-recreate --no-deps broker)"
compose up -d --no-build --force-recreate --no-deps broker >"$WORK/recreate.log" 2>&1 ||
    { cat "$WORK/recreate.log"; fail "recreating the broker container"; }
check_durable "after the broker container was replaced"

# ---- 6. teardown by the EXIT trap --------------------------------------------------------------
say "all checks passed"
