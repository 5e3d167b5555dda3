#!/usr/bin/env bash
# Starts a docker engine when none answers, and stops only the one it started.
#   dockerd.sh start   prints "started" (this script started dockerd; pidfile written) or "running"
#   dockerd.sh stop    stops dockerd by the pidfile this script wrote, if any; never by name
# Runs as root (dockerd needs it). Debian's docker.io is installed by ensure-tools.sh --docker.
set -euo pipefail

state="${NID_DOCKERD_STATE:-$HOME/.cache/nid/dockerd}"
pidfile="$state/dockerd.pid"
log() { echo "dockerd.sh: $*" >&2; }

case "${1:-}" in
  start)
    if docker version >/dev/null 2>&1; then
      echo running
      exit 0
    fi
    command -v dockerd >/dev/null || { log "dockerd is not installed (ensure-tools.sh --docker)"; exit 1; }
    [ "$(id -u)" = 0 ] || { log "starting dockerd needs root"; exit 1; }
    mkdir -p "$state"
    log "starting dockerd (log $state/dockerd.log)"
    nohup dockerd --pidfile "$pidfile" >"$state/dockerd.log" 2>&1 &
    for _ in $(seq 1 120); do
      if docker version >/dev/null 2>&1; then
        echo started
        exit 0
      fi
      sleep 0.5
    done
    log "dockerd did not answer within 60 s; last log lines:"
    tail -20 "$state/dockerd.log" >&2 || true
    exit 1
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      fi
      rm -f "$pidfile"
    fi
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
