#!/usr/bin/env bash
# End-to-end check of the Dockerfile and docker-compose.yml on a machine with a Docker engine and
# no container registry:
#   1. makes the base image (deploy/base-image.sh; reused while present);
#   2. builds the runtime-prebuilt image from the host-built binaries (target/debug by default);
#   3. brings the stack up with a token under a unique compose project, two workers, a free port;
#   4. submits exec tasks with taskctl from the host and checks that both workers ran some;
#   5. parks tasks on a queue no worker serves, restarts the broker container, kills taskd with
#      SIGKILL (Docker's restart policy brings it back), then replaces the container (what an
#      upgrade does), and checks each time that finished results and parked tasks survived and
#      that the workers came back and run new tasks;
#   6. brings a second stack up without a token (TASKD_TOKEN unset) and runs a task on it;
#   7. tears everything down (containers, networks, volumes, image), also on failure or timeout.
#
# Env: TASKD_BIN_DIR (dir with taskd, taskworker, taskctl; default <repo>/target/debug),
#      TASKD_BASE_IMAGE (default taskd-base:bookworm, made by deploy/base-image.sh),
#      TASKD_COMPOSE_TEST_IMAGE (test this ready image instead of building one from TASKD_BIN_DIR;
#        the host's taskctl still comes from TASKD_BIN_DIR),
#      TASKD_COMPOSE_TEST_TIMEOUT (seconds for the whole run, default 420),
#      TASKD_COMPOSE_TEST_KEEP=1 (leave the stacks up for inspection; tear down by hand).
set -euo pipefail

# The whole run is bounded: re-run this script under timeout (TERM, then KILL 60 s later).
if [ -z "${TASKD_COMPOSE_TEST_BOUNDED:-}" ]; then
    export TASKD_COMPOSE_TEST_BOUNDED=1
    exec timeout --kill-after=60 "${TASKD_COMPOSE_TEST_TIMEOUT:-420}" bash "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${TASKD_BIN_DIR:-$ROOT/target/debug}"
BASE_IMAGE="${TASKD_BASE_IMAGE:-taskd-base:bookworm}"
RUN_ID="$$-${RANDOM}"
PROJECT="taskd-ci-${RUN_ID}"          # the main stack (with a token)
PROJECT_OPEN="taskd-ci-open-${RUN_ID}" # the second stack (no token)
PROJECTS=()                           # those brought up, for the teardown
IMAGE="${TASKD_COMPOSE_TEST_IMAGE:-taskd:ci-${RUN_ID}}"
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
# compose_p PROJECT ARGS...: compose on our file under PROJECT.
compose_p() {
    local project=$1
    shift
    "${COMPOSE_CMD[@]}" -p "$project" -f "$ROOT/docker-compose.yml" "$@"
}
compose() { compose_p "$PROJECT" "$@"; }

# ---- teardown, also on failure and on timeout --------------------------------------------------
# A trap can fire while a command's output is redirected to a log; fds 3 and 4 keep the real ones.
exec 3>&1 4>&2
teardown() {
    local rc=$? project
    exec 1>&3 2>&4
    # Finish the teardown even when the timeout's TERM arrives now (KILL comes 60 s later).
    trap - EXIT
    trap '' INT TERM
    for project in "${PROJECTS[@]}"; do
        if [ "$rc" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
            say "failed (exit $rc); last logs of $project:"
            compose_p "$project" logs --no-color --tail 30 2>&1 | sed 's/^/  | /' || true
        fi
        if [ "${TASKD_COMPOSE_TEST_KEEP:-}" = 1 ]; then
            say "KEEP: $project left up (${COMPOSE_CMD[*]} -p $project -f $ROOT/docker-compose.yml down -v)"
            continue
        fi
        say "tearing down $project"
        compose_p "$project" down -v --remove-orphans -t 10 >"$WORK/down.log" 2>&1 ||
            { say "compose down of $project failed:"; cat "$WORK/down.log"; }
    done
    if [ "${TASKD_COMPOSE_TEST_KEEP:-}" != 1 ] && [ -z "${TASKD_COMPOSE_TEST_IMAGE:-}" ]; then
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

# ---- helpers -----------------------------------------------------------------------------------
for bin in taskd taskworker taskctl; do
    [ -x "$BIN_DIR/$bin" ] ||
        fail "binary $BIN_DIR/$bin missing: cargo build -p taskd-server --bin taskd -p taskd-worker --bin taskworker -p taskd-client --bin taskctl"
done
TASKCTL="$BIN_DIR/taskctl"
# Nothing of the caller's environment leaks into the stacks or the host's taskctl.
unset TASKD_BROKER TASKD_TOKEN TASKWORKER_QUEUES TASKWORKER_CONCURRENCY TASKD_IMAGE TASKD_PORT
TOKEN="ci-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

# taskctl ARGS...: the host's taskctl against the main stack, with its token.
taskctl() { "$TASKCTL" --broker "127.0.0.1:$PORT" --token "$TOKEN" "$@"; }

# json EXPR < input: prints a Python expression over the parsed JSON document `j`.
json() {
    python3 -c 'import json, sys
j = json.load(sys.stdin)
r = eval(sys.argv[1])
print(json.dumps(r) if isinstance(r, (list, dict)) else r)' "$1"
}

# free_port: a TCP port free on 127.0.0.1 right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

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

# workers_connected N: at least N workers are connected to the main stack's broker.
workers_connected() {
    local n
    n="$(taskctl --json workers | json 'sum(1 for w in j if w["connected"])')" || return 1
    [ "$n" -ge "$1" ]
}

# field ID EXPR: EXPR over the JSON of `taskctl get ID`.
field() { taskctl --json get "$1" | json "$2"; }

if [ -n "${TASKD_COMPOSE_TEST_IMAGE:-}" ]; then
    docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "image $IMAGE (TASKD_COMPOSE_TEST_IMAGE) not found"
    say "testing the ready image $IMAGE"
else
    # ---- 1. base image
    say "base image $BASE_IMAGE"
    TASKD_BASE_IMAGE="$BASE_IMAGE" "$ROOT/deploy/base-image.sh" || fail "making the base image"
    pass "base image $BASE_IMAGE present"

    # ---- 2. runtime image from the host's binaries
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
    if ! docker build --force-rm -f "$ROOT/Dockerfile" --target runtime-prebuilt \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg BIN_DIR=dist \
        -t "$IMAGE" "$WORK/context" >"$WORK/build.log" 2>&1; then
        tail -n 40 "$WORK/build.log"
        fail "docker build of the runtime-prebuilt target"
    fi
    pass "image $IMAGE built"
fi

for bin in taskd taskworker taskctl; do
    ldd_out="$(docker run --rm --entrypoint ldd "$IMAGE" "/usr/local/bin/$bin" 2>&1)" ||
        fail "ldd of $bin in the image: $ldd_out"
    if grep -q 'not found' <<<"$ldd_out"; then fail "$bin misses libraries in the image: $ldd_out"; fi
done
user="$(docker run --rm --entrypoint id "$IMAGE" -u)"
[ "$user" = 10001 ] || fail "image runs as uid $user, want 10001"
pass "image runs as uid 10001; the libraries of all three binaries resolve"

# ---- 3. the main stack: token, broker + 2 workers on a free port -------------------------------
export TASKD_IMAGE="$IMAGE"
# stack_up PROJECT LOG ARGS...: `compose up -d --no-build ARGS` under PROJECT with the broker on a
# free host port (again on another one if it was taken meanwhile); sets STACK_PORT.
stack_up() {
    local project=$1 log=$2 try
    shift 2
    PROJECTS+=("$project")
    for try in 1 2 3; do
        STACK_PORT="$(free_port)"
        if TASKD_PORT="$STACK_PORT" compose_p "$project" up -d --no-build "$@" >"$log" 2>&1; then
            return 0
        fi
        grep -qiE 'port is already allocated|address already in use' "$log" || break
        say "port $STACK_PORT was taken meanwhile (try $try); again on another"
        compose_p "$project" down -v -t 1 >/dev/null 2>&1 || true
    done
    cat "$log"
    return 1
}

say "compose up $PROJECT: 2 workers, token set"
TASKD_TOKEN="$TOKEN" TASKWORKER_CONCURRENCY=2 stack_up "$PROJECT" "$WORK/up.log" --scale worker=2 ||
    fail "compose up"
PORT=$STACK_PORT
wait_for 60 "the broker to serve on 127.0.0.1:$PORT" taskctl health
pass "broker serves on 127.0.0.1:$PORT (published port)"

health="$(docker inspect --format '{{.State.Health.Status}}' "$(compose ps -q broker)")"
[ "$health" = healthy ] || fail "the broker container is $health, want healthy"
pass "the compose healthcheck (taskctl health inside the broker) says healthy"

rc=0
"$TASKCTL" --broker "127.0.0.1:$PORT" ls >/dev/null 2>&1 || rc=$?
[ "$rc" -eq 4 ] || fail "taskctl ls without the token exited $rc, want 4 (token refused)"
pass "a call without the token is refused (exit 4)"

# Worker container hostnames (= short container ids): the tasks print them.
mapfile -t worker_ids < <(compose ps -q worker)
[ "${#worker_ids[@]}" -eq 2 ] || fail "want 2 worker containers, have ${#worker_ids[@]}"
WORKER_HOSTS=()
for id in "${worker_ids[@]}"; do
    WORKER_HOSTS+=("$(docker inspect --format '{{.Config.Hostname}}' "$id")")
done
say "worker containers: ${WORKER_HOSTS[*]}"

wait_for 60 "2 workers to connect" workers_connected 2
taskctl --json workers >"$WORK/workers.json"
for host in "${WORKER_HOSTS[@]}"; do
    json "[w['peer_addr'] for w in j if w['connected'] and w['host'] == '$host']" <"$WORK/workers.json" |
        grep -q . || fail "worker container $host is not among the connected workers: $(cat "$WORK/workers.json")"
done
pass "both worker containers connected ($(json '", ".join(w["worker_id"] + " from " + w["peer_addr"] for w in j)' <"$WORK/workers.json"))"

# ---- 4. exec tasks from the host, run by both workers ------------------------------------------
# Submitted all at once, each running 1 s: a worker holds at most 2 (its slots), so the other
# worker must get some, whatever order the broker prefers workers in.
say "submitting $EXEC_TASKS exec tasks from the host"
pids=()
for i in $(seq 1 "$EXEC_TASKS"); do
    taskctl --json exec -- sh -c 'sleep 1; hostname' >"$WORK/submit.$i.json" 2>&1 &
    pids+=("$!")
done
for i in $(seq 1 "$EXEC_TASKS"); do
    wait "${pids[$((i - 1))]}" || fail "taskctl exec #$i: $(cat "$WORK/submit.$i.json")"
done
: >"$WORK/exec.ids"
for i in $(seq 1 "$EXEC_TASKS"); do
    json 'j["id"]' <"$WORK/submit.$i.json" >>"$WORK/exec.ids" ||
        fail "no id in the reply to exec #$i: $(cat "$WORK/submit.$i.json")"
done
mapfile -t EXEC_IDS <"$WORK/exec.ids"
rc=0
taskctl wait --timeout 120s "${EXEC_IDS[@]}" >"$WORK/wait.log" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat "$WORK/wait.log"; fail "taskctl wait for the $EXEC_TASKS tasks exited $rc"; }
pass "$EXEC_TASKS exec tasks submitted from the host succeeded"

# One line per task: state, the hostname it printed, the worker id of its last attempt.
outcomes() {
    local id
    for id in "${EXEC_IDS[@]}"; do
        field "$id" '" ".join([j["state"], j["outcome"]["exec"]["stdout"].strip(), j["attempts"][-1]["worker_id"]])' ||
            return 1
    done
}
outcomes >"$WORK/outcomes" || fail "reading the outcomes"
for host in "${WORKER_HOSTS[@]}"; do
    ran="$(awk -v h="$host" '$1 == "succeeded" && $2 == h && index($3, h "-") == 1' "$WORK/outcomes" | wc -l)"
    [ "$ran" -ge 1 ] || fail "worker $host ran none of the tasks: $(cut -d' ' -f2 "$WORK/outcomes" | sort | uniq -c | tr -s ' \n' ' ')"
    say "worker $host ran $ran tasks"
done
pass "both workers ran tasks (stdout hostnames agree with the attempts' worker ids)"

# ---- 5. parked tasks; broker restart, then broker replacement ----------------------------------
: >"$WORK/parked.ids"
for i in $(seq 1 "$PARKED_TASKS"); do
    taskctl --json exec --queue "$PARKED_QUEUE" -- echo "parked $i" >"$WORK/submit.json" ||
        fail "submitting parked task #$i"
    json 'j["id"]' <"$WORK/submit.json" >>"$WORK/parked.ids"
done
mapfile -t PARKED_IDS <"$WORK/parked.ids"

# check_parked WHEN: every parked task is queued, and the queue counts them.
check_parked() {
    local id state depth
    for id in "${PARKED_IDS[@]}"; do
        state="$(field "$id" 'j["state"]')" || fail "get parked $id $1"
        [ "$state" = queued ] || fail "parked task $id is $state $1, want queued"
    done
    depth="$(taskctl --json queues | json "sum(q['queued'] for q in j if q['name'] == '$PARKED_QUEUE')")"
    [ "$depth" -eq "$PARKED_TASKS" ] || fail "queue $PARKED_QUEUE has $depth queued $1, want $PARKED_TASKS"
    pass "$PARKED_TASKS tasks queued on $PARKED_QUEUE (no worker serves it) $1"
}
check_parked "before the restart"

# check_durable WHEN: finished results unchanged, parked tasks still queued, workers back.
check_durable() {
    wait_for 60 "the broker to serve again $1" taskctl health
    pass "broker serves again $1"
    outcomes >"$WORK/outcomes.after" || fail "reading the outcomes $1"
    cmp -s "$WORK/outcomes" "$WORK/outcomes.after" ||
        fail "finished results changed $1: $(diff "$WORK/outcomes" "$WORK/outcomes.after" | head -5)"
    pass "$EXEC_TASKS finished results unchanged $1"
    check_parked "$1"
    wait_for 90 "both workers to reconnect $1" workers_connected 2
    taskctl --json exec --wait --wait-timeout 60s -- hostname >"$WORK/after.json" ||
        fail "exec --wait $1: $(cat "$WORK/after.json")"
    pass "both workers reconnected and a new task ran $1"
}

say "restarting the broker container (compose restart broker)"
compose restart -t 20 broker >"$WORK/restart.log" 2>&1 ||
    { cat "$WORK/restart.log"; fail "compose restart broker"; }
check_durable "after compose restart broker"

# A crash: SIGKILL to taskd itself (the child of the container's init); the restart policy
# (unless-stopped) must bring it back, with every acknowledged write.
broker_cid="$(compose ps -q broker)"
init_pid="$(docker inspect --format '{{.State.Pid}}' "$broker_cid")"
restarts_before="$(docker inspect --format '{{.RestartCount}}' "$broker_cid")"
taskd_pid="$(ps -o pid= --ppid "$init_pid" | tr -d ' ' | head -n 1)"
[ -n "$taskd_pid" ] || fail "no taskd process under the broker container's init ($init_pid)"
say "killing taskd (host pid $taskd_pid) with SIGKILL"
kill -KILL "$taskd_pid"
restarted() { [ "$(docker inspect --format '{{.RestartCount}}' "$broker_cid")" -gt "$restarts_before" ]; }
wait_for 60 "Docker to restart the killed broker" restarted
check_durable "after taskd was killed (SIGKILL) and Docker restarted it"

# A new broker container on the same named volume: what an upgrade to a new image does.
say "replacing the broker container (compose up --force-recreate --no-deps broker)"
TASKD_PORT="$PORT" TASKD_TOKEN="$TOKEN" \
    compose up -d --no-build --force-recreate --no-deps broker >"$WORK/recreate.log" 2>&1 ||
    { cat "$WORK/recreate.log"; fail "replacing the broker container"; }
check_durable "after the broker container was replaced"

# ---- 6. a stack without a token (TASKD_TOKEN unset) --------------------------------------------
say "compose up $PROJECT_OPEN: no token, 1 worker"
stack_up "$PROJECT_OPEN" "$WORK/up-open.log" || fail "compose up without a token"
OPEN_PORT=$STACK_PORT
out="$("$TASKCTL" --broker "127.0.0.1:$OPEN_PORT" exec --wait --wait-timeout 60s -- echo open-ok 2>&1)" ||
    fail "exec --wait on the stack without a token: $out"
[ "$out" = open-ok ] || fail "the task on the stack without a token printed '$out'"
pass "stack without a token: healthy, and a task from the host ran"

# ---- 7. teardown by the EXIT trap --------------------------------------------------------------
say "all checks passed"
