#!/usr/bin/env bash
# Prints the two Secrets the manifests expect, with fresh random keys, for `kubectl apply -f -`:
#   nid-cluster-secrets  keyring (cells' master keys), id-scheme-seed (cells and the init Job)
#   nid-router-secrets   partner.key (partner-credential key), admin.token
# Run it once per cluster; keep the output out of git (and prefer your secret manager: the keys
# never change for the life of the cluster's data).
#   deploy/k8s/create-secrets.sh nid | kubectl apply -f -
set -euo pipefail
namespace="${1:?usage: $0 NAMESPACE}"
hex32() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
b64() { printf '%s\n' "$1" | base64 -w0; }
cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: nid-cluster-secrets
  namespace: $namespace
type: Opaque
data:
  keyring: $(b64 "1:$(hex32)")
  id-scheme-seed: $(b64 "$(hex32)")
---
apiVersion: v1
kind: Secret
metadata:
  name: nid-router-secrets
  namespace: $namespace
type: Opaque
data:
  partner.key: $(b64 "$(hex32)")
  admin.token: $(b64 "$(hex32)")
YAML
