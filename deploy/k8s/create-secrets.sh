#!/usr/bin/env bash
# Prints the Secrets the manifests expect, for `kubectl apply -f -`:
#   nid-cluster-secrets   keyring (cells' master keys), id-scheme-seed (cells and the init Job)
#   nid-router-secrets    partner.key (partner-credential key), admin.token (routers; control replicas)
#   nid-tls-cell-<id>     one per cell, control cell 0 included: ca.pem and, per StatefulSet ordinal
#                         i, <i>.pem/<i>.key, the certificate of node i+1 (control-<node> for cell
#                         0, cell-<id>-<node> otherwise). Each replica mounts only its own pair.
#   nid-tls-router        ca.pem, router.pem/.key (every router presents the one `router` identity)
#   nid-tls-init          ca.pem, admin.pem/.key (the cluster-init Job)
#
#   deploy/k8s/create-secrets.sh NAMESPACE DATA_CELLS [STATE_DIR] | kubectl apply -f -
#   deploy/k8s/create-secrets.sh nid 3 | kubectl apply -f -        # the prod overlay (cells 0..3)
#
# Everything is generated once into STATE_DIR (default ./nid-secrets-NAMESPACE, 0700) and reused
# on every later run: run it again with more cells after adding one and only the new cell's
# certificates are issued. The keys never change for the life of the cluster's data, so keep
# STATE_DIR in your secret manager and never in git. STATE_DIR/tls/ca holds the CA's private key;
# STATE_DIR/tls/clients holds ca.pem and an admin pair for nidctl
# (`nidctl --tls-dir STATE_DIR/tls/clients ...`). Certificates are valid 397 days.
#
# Certificates come from `nidctl cert` ($NIDCTL, else nidctl on the PATH, else the workspace build).
set -euo pipefail
usage="usage: $0 NAMESPACE DATA_CELLS [STATE_DIR]"
namespace="${1:?$usage}"
cells="${2:?$usage}"
state="${3:-./nid-secrets-$namespace}"
case "$cells" in
  '' | *[!0-9]*) echo "create-secrets.sh: DATA_CELLS must be a number ($usage)" >&2; exit 2 ;;
esac

nidctl="${NIDCTL:-$(command -v nidctl || echo "$HOME/.cache/nid/target/debug/nidctl")}"
if [ ! -x "$nidctl" ]; then
  echo "create-secrets.sh: nidctl not found (build the workspace, or set NIDCTL=/path/to/nidctl)" >&2
  exit 1
fi

(umask 077 && mkdir -p "$state/tls/ca" "$state/tls/clients")
hex32() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
keep() { # NAME CONTENT: written once, never replaced
  [ -e "$state/$1" ] || (umask 077 && printf '%s\n' "$2" >"$state/$1")
}
keep keyring "1:$(hex32)"
keep id-scheme-seed "$(hex32)"
keep partner.key "$(hex32)"
keep admin.token "$(hex32)"

ca="$state/tls/ca"
"$nidctl" cert init-ca --dir "$ca" >/dev/null
issue() { # NAME: once
  [ -e "$ca/$1.pem" ] || "$nidctl" cert issue --dir "$ca" --days 397 "$1" >/dev/null
}
b64() { base64 -w0 <"$1"; }

secret() { # NAME, then lines "KEY FILE" on stdin
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\ntype: Opaque\ndata:\n' "$1" "$namespace"
  local key file
  while read -r key file; do
    printf '  %s: %s\n' "$key" "$(b64 "$file")"
  done
}

secret nid-cluster-secrets <<EOF
keyring $state/keyring
id-scheme-seed $state/id-scheme-seed
EOF
secret nid-router-secrets <<EOF
partner.key $state/partner.key
admin.token $state/admin.token
EOF

for cell in $(seq 0 "$cells"); do
  lines="ca.pem $ca/ca.pem"
  for ordinal in 0 1 2; do
    node=$((ordinal + 1))
    if [ "$cell" = 0 ]; then name="control-$node"; else name="cell-$cell-$node"; fi
    issue "$name"
    lines+=$'\n'"$ordinal.pem $ca/$name.pem"$'\n'"$ordinal.key $ca/$name.key"
  done
  secret "nid-tls-cell-$cell" <<<"$lines"
done

issue router
secret nid-tls-router <<EOF
ca.pem $ca/ca.pem
router.pem $ca/router.pem
router.key $ca/router.key
EOF
issue admin
secret nid-tls-init <<EOF
ca.pem $ca/ca.pem
admin.pem $ca/admin.pem
admin.key $ca/admin.key
EOF
(umask 077 && cp -f "$ca/ca.pem" "$ca/admin.pem" "$ca/admin.key" "$state/tls/clients/")
echo "create-secrets.sh: state in $state (keep it secret; nidctl --tls-dir $state/tls/clients)" >&2
