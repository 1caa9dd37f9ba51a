#!/usr/bin/env bash
# A private Docker engine for tests: its own data root, exec root, pid file and socket under
# one state folder, so it never touches a system dockerd (or /var/lib/docker).
#
#   docker/dockerd.sh start    start it (no-op if already running), wait until it answers
#   docker/dockerd.sh stop     stop it by its PID, unmount what it left, keep the data root
#   docker/dockerd.sh purge    stop, then delete the state folder (images included)
#   docker/dockerd.sh status   exit 0 when it answers
#   eval "$(docker/dockerd.sh env)"   point docker / docker-compose at it (DOCKER_HOST)
#
# State folder: $BNSERVE_DOCKERD_DIR (default /tmp/bnserve-dockerd). Needs root and Debian's
# docker.io (dockerd, containerd, runc). The engine runs without a bridge and without iptables
# rules: containers and builds must use host networking (docker/compose.test.yml does).
set -euo pipefail

DIR=${BNSERVE_DOCKERD_DIR:-/tmp/bnserve-dockerd}
SOCK=$DIR/docker.sock
PIDFILE=$DIR/dockerd.pid
EXEC_ROOT=$DIR/exec
DATA_ROOT=$DIR/data
LOG=$DIR/dockerd.log
DOCKER=${DOCKER:-docker}

answers() { DOCKER_HOST=unix://$SOCK $DOCKER version >/dev/null 2>&1; }

running_pid() {
    [[ -f $PIDFILE ]] || return 1
    local pid
    pid=$(cat "$PIDFILE")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
    if running_pid >/dev/null && answers; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || { echo "error: dockerd needs root" >&2; return 1; }
    command -v dockerd >/dev/null || { echo "error: dockerd not installed (apt-get install docker.io)" >&2; return 1; }
    mkdir -p "$DIR" "$DATA_ROOT" "$EXEC_ROOT"
    rm -f "$PIDFILE" "$SOCK"
    # setsid: the engine outlives this shell but gets no signals meant for the caller's group
    setsid dockerd \
        --host "unix://$SOCK" \
        --data-root "$DATA_ROOT" \
        --exec-root "$EXEC_ROOT" \
        --pidfile "$PIDFILE" \
        --bridge none --iptables=false --ip-masq=false --ip6tables=false \
        --userland-proxy=false \
        >"$LOG" 2>&1 </dev/null &
    local i
    for ((i = 0; i < 120; i++)); do
        if answers; then
            return 0
        fi
        if ! kill -0 $! 2>/dev/null; then
            echo "error: dockerd exited; last lines of $LOG:" >&2
            tail -n 20 "$LOG" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "error: dockerd did not answer within 60 s; see $LOG" >&2
    return 1
}

stop() {
    local pid i
    if pid=$(running_pid); then
        kill -TERM "$pid"
        for ((i = 0; i < 60; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "dockerd $pid still running after 30 s; sending SIGKILL" >&2
            kill -KILL "$pid" || true
        fi
    fi
    # mounts dockerd leaves behind when it dies hard: the netns bind mount, overlay layers
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$DIR/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r)
    rm -f "$PIDFILE" "$SOCK"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    purge)
        stop
        rm -rf --one-file-system "$DIR"
        ;;
    status) answers ;;
    env) echo "export DOCKER_HOST=unix://$SOCK" ;;
    *)
        echo "usage: $0 start|stop|purge|status|env" >&2
        exit 2
        ;;
esac
