#!/usr/bin/env bash
# Generates the compose cluster's secrets under deploy/compose/secrets/ (git-ignored; never commit
# them). Existing files are kept, so a cluster restarted on its volumes keeps its keys; --force
# regenerates everything (the data sealed under the old keyring becomes unreadable: only for a
# fresh cluster).
#
#   keyring          cells' master keys, `<generation>:<64 hex>` per line (one generation)
#   id-scheme-seed   the cluster's id-scheme seed (64 hex), read by `nidctl cluster init`
#   cell.toml        the cells' --config: id_scheme_seed and keyring_file
#   partner.key      the routers' partner-credential key (64 hex)
#   admin.token      the admin token (64 hex) routers accept and nidctl presents
#   tls/ca/          the cluster CA (ca.pem, ca.key) and every certificate it issued (`nidctl cert`,
#                    397 days): control-<n>, cell-<c>-<n>, router, admin, enroller-compose
#   tls/<service>/   what one container mounts at /run/tls: ca.pem and its own NAME.pem/NAME.key
#                    only (a replica never sees another's key)
#   tls/admin/       ca.pem and the admin certificate (the init container)
#   tls/clients/     ca.pem, admin and enroller-compose, for nidctl on the host (0700, like tls/ca):
#                    nidctl --tls-dir deploy/compose/secrets/tls/clients ...
#
# Certificates come from `nidctl cert` ($NIDCTL, else nidctl on the PATH, else the workspace build).
# Renew one: nidctl cert issue --dir secrets/tls/ca --days 397 NAME, then copy NAME.pem/.key into
# the service's directory; the process picks the new pair up within seconds, without a restart.
#
# Files are 0400 and owned by uid 10001 (the images' user) when run as root, else 0444.
set -euo pipefail

dir="$(cd "$(dirname "$0")" && pwd)/secrets"
force=0
[ "${1:-}" = "--force" ] && force=1
[ "$force" = 1 ] && rm -rf "$dir"
mkdir -p "$dir/tls"
chmod 0755 "$dir" "$dir/tls"

hex32() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }

put() { # NAME CONTENT
  local path="$dir/$1"
  [ -e "$path" ] && return 0
  (umask 077 && printf '%s\n' "$2" >"$path")
}

put keyring "1:$(hex32)"
put id-scheme-seed "$(hex32)"
put cell.toml "$(printf 'id_scheme_seed = "%s"\nkeyring_file = "/run/secrets/keyring"' "$(cat "$dir/id-scheme-seed")")"
put partner.key "$(hex32)"
put admin.token "$(hex32)"

nidctl="${NIDCTL:-$(command -v nidctl || echo "$HOME/.cache/nid/target/debug/nidctl")}"
if [ ! -x "$nidctl" ]; then
  echo "gen-secrets.sh: nidctl not found (build the workspace, or set NIDCTL=/path/to/nidctl)" >&2
  exit 1
fi
ca="$dir/tls/ca"
# container -> the certificate name its process holds (the node id is the zone's position)
declare -A holder=(
  [control-a]=control-1 [control-b]=control-2 [control-c]=control-3
  [cell-1-a]=cell-1-1 [cell-1-b]=cell-1-2 [cell-1-c]=cell-1-3
  [cell-2-a]=cell-2-1 [cell-2-b]=cell-2-2 [cell-2-c]=cell-2-3
  [router]=router
)
issue() { # NAME: once, into the CA directory
  [ -e "$ca/$1.pem" ] || "$nidctl" cert issue --dir "$ca" --days 397 "$1" >/dev/null
}
place() { # DIR NAME...: ca.pem and the named pairs, nothing else
  mkdir -p "$1"
  chmod 0755 "$1"
  cp -f "$ca/ca.pem" "$1/"
  local d="$1"
  shift
  for n in "$@"; do cp -f "$ca/$n.pem" "$ca/$n.key" "$d/"; done
}
"$nidctl" cert init-ca --dir "$ca" >/dev/null
for service in "${!holder[@]}"; do
  issue "${holder[$service]}"
  place "$dir/tls/$service" "${holder[$service]}"
done
issue admin
issue enroller-compose
place "$dir/tls/admin" admin
place "$dir/tls/clients" admin enroller-compose

# What containers mount belongs to their user; the CA and the host's client keys stay with
# whoever ran this (the sudo user when run through sudo), readable by no one else.
mounted=(find "$dir" -type f -not -path "$ca/*" -not -path "$dir/tls/clients/*")
if [ "$(id -u)" = 0 ]; then
  "${mounted[@]}" -exec chown 10001:10001 {} + -exec chmod 0400 {} +
  chown -R "${SUDO_UID:-0}:${SUDO_GID:-0}" "$ca" "$dir/tls/clients"
else
  echo "gen-secrets.sh: not root: the mounted secrets are made world-readable (0444) so the containers' user can read them" >&2
  "${mounted[@]}" -exec chmod 0444 {} +
fi
chmod 0700 "$ca" "$dir/tls/clients"
find "$ca" "$dir/tls/clients" -type f -exec chmod 0600 {} +
echo "secrets in $dir"
