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
#   deploy/k8s/create-secrets.sh NAMESPACE DATA_CELLS STATE_DIR [--new] | kubectl apply -f -
#   deploy/k8s/create-secrets.sh nid 3 ~/nid-secrets --new | kubectl apply -f -   # a new cluster
#   deploy/k8s/create-secrets.sh nid 4 ~/nid-secrets | kubectl apply -f -         # cell 4 added
#
# Everything is generated once into STATE_DIR (0700) and reused on every later run: run it again
# with more cells after adding one and only the new cell's certificates are issued. The keyring,
# seed, keys and CA are created only with --new, so a run pointed at the wrong directory fails
# instead of printing fresh ones over a running cluster's. They never change for the life of the
# cluster's data: keep STATE_DIR in your secret manager and never in git. STATE_DIR/tls/ca holds
# the CA's private key (needed only to issue; a run that issues nothing works without it);
# STATE_DIR/tls/clients holds ca.pem and an admin pair for nidctl
# (`nidctl --tls-dir STATE_DIR/tls/clients ...`). Certificates are valid 397 days.
#
# Certificates come from `nidctl cert` ($NIDCTL, else nidctl on the PATH, else the workspace build).
set -euo pipefail
usage="usage: $0 NAMESPACE DATA_CELLS STATE_DIR [--new]"
namespace="${1:?$usage}"
cells="${2:?$usage}"
state="${3:?$usage}"
new=0
case "${4:-}" in
  --new) new=1 ;;
  '') ;;
  *) echo "create-secrets.sh: unknown argument ${4} ($usage)" >&2; exit 2 ;;
esac
case "$cells" in
  '' | *[!0-9]*) echo "create-secrets.sh: DATA_CELLS must be a number ($usage)" >&2; exit 2 ;;
esac
fail() { echo "create-secrets.sh: $*" >&2; exit 1; }
if [ "$new" = 0 ] && [ ! -e "$state/keyring" ]; then
  fail "$state holds no keyring: give --new to create a new cluster's secrets (never for a running cluster's namespace)"
fi

nidctl="${NIDCTL:-$(command -v nidctl || echo "$HOME/.cache/nid/target/debug/nidctl")}"
if [ ! -x "$nidctl" ]; then
  echo "create-secrets.sh: nidctl not found (build the workspace, or set NIDCTL=/path/to/nidctl)" >&2
  exit 1
fi

(umask 077 && mkdir -p "$state/tls/ca" "$state/tls/clients")
hex32() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
keep() { # NAME CONTENT: written once (with --new), never replaced
  [ -e "$state/$1" ] && return 0
  [ "$new" = 1 ] || fail "$state/$1 is missing (the other files are there): restore it from your secret manager"
  (umask 077 && printf '%s\n' "$2" >"$state/$1")
}
keep keyring "1:$(hex32)"
keep id-scheme-seed "$(hex32)"
keep partner.key "$(hex32)"
keep admin.token "$(hex32)"

ca="$state/tls/ca"
if [ ! -e "$ca/ca.pem" ]; then
  [ "$new" = 1 ] || fail "$ca/ca.pem is missing: restore the CA from your secret manager"
  "$nidctl" cert init-ca --dir "$ca" >/dev/null
fi
issue() { # NAME: once, with the CA's key
  [ -e "$ca/$1.pem" ] && return 0
  [ -e "$ca/ca.key" ] || fail "$1 needs a certificate and $ca/ca.key is not here: put the CA key back to issue it"
  "$nidctl" cert issue --dir "$ca" --days 397 "$1" >/dev/null
}

secret() { # NAME, then lines "KEY FILE" on stdin
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\ntype: Opaque\ndata:\n' "$1" "$namespace"
  local key file value
  while read -r key file; do
    value="$(base64 -w0 <"$file")" || fail "cannot read $file"
    printf '  %s: %s\n' "$key" "$value"
  done
}

# Everything is written to a temporary file and printed only when complete: a failure half-way
# must not hand `kubectl apply` half of the Secrets.
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
exec 3>&1 >"$out"

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
exec >&3
cat "$out"
echo "create-secrets.sh: state in $state (keep it secret; nidctl --tls-dir $state/tls/clients)" >&2
