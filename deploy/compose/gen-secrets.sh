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
#   tls/             a cluster CA and a certificate per process (EC P-256, 397 days), for mTLS:
#                    generated and mounted now, used once the binaries take TLS flags
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

processes=(control-a control-b control-c cell-1-a cell-1-b cell-1-c cell-2-a cell-2-b cell-2-c router)
if command -v openssl >/dev/null; then
  if [ ! -e "$dir/tls/ca.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 397 \
      -subj "/CN=nid compose cluster CA" -keyout "$dir/tls/ca.key" -out "$dir/tls/ca.pem" 2>/dev/null
  fi
  for p in "${processes[@]}"; do
    [ -e "$dir/tls/$p.pem" ] && continue
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$p" \
      -keyout "$dir/tls/$p.key" -out "$dir/tls/$p.csr" 2>/dev/null
    openssl x509 -req -in "$dir/tls/$p.csr" -CA "$dir/tls/ca.pem" -CAkey "$dir/tls/ca.key" \
      -CAcreateserial -days 397 -out "$dir/tls/$p.pem" \
      -extfile <(printf 'subjectAltName=DNS:%s,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' "$p") 2>/dev/null
    rm -f "$dir/tls/$p.csr"
  done
  rm -f "$dir/tls/ca.srl"
else
  echo "gen-secrets.sh: openssl missing: no certificates generated (mTLS is not used yet)" >&2
fi

if [ "$(id -u)" = 0 ]; then
  find "$dir" -type f -exec chown 10001:10001 {} + -exec chmod 0400 {} +
else
  echo "gen-secrets.sh: not root: the secrets are made world-readable (0444) so the containers' user can read them" >&2
  find "$dir" -type f -exec chmod 0444 {} +
fi
echo "secrets in $dir"
