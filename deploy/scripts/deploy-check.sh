#!/usr/bin/env bash
# Every offline check of deploy/ (make deploy-check; CI runs it). Seconds, no docker engine needed.
#   ShellCheck, hadolint, yamllint, docker-compose config, promtool (config, rules, rule tests),
#   rule hygiene and dashboard checks, kustomize render + kubernetes-validate --strict + structure
#   test of every overlay, the broken fixtures (each must be rejected), the logging configs.
# Prints one line per check and "N passed, N failed"; exits non-zero on any failure.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 1
deploy=deploy
K8S_VERSION=1.32.0   # the Kubernetes minor the manifests target (pod-index label GA)
out="$deploy/.out"
rm -rf "$out" && mkdir -p "$out"

venv_bin="$(bash "$deploy/scripts/ensure-tools.sh" | tail -1)" || { echo "deploy-check: cannot install the tools"; exit 1; }
export PATH="$venv_bin:$PATH"
py="$venv_bin/python"

passed=0
failed=0
failures=()
step() { # NAME COMMAND...
  local name="$1"; shift
  local log started
  log="$out/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '-').log"
  started=$SECONDS
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    printf 'ok    %-58s %3ss\n' "$name" "$((SECONDS - started))"
  else
    failed=$((failed + 1))
    failures+=("$name")
    printf 'FAIL  %-58s %3ss\n' "$name" "$((SECONDS - started))"
    sed 's/^/      /' "$log" | tail -25
  fi
}

mapfile -t shells < <(find "$deploy" -name '*.sh' -not -path "$deploy/.out/*" | sort)
step "shellcheck (${#shells[@]} scripts)" shellcheck "${shells[@]}"
step "hadolint deploy/images/Dockerfile.*" hadolint "$deploy"/images/Dockerfile.*
step "yamllint deploy/" yamllint --strict -c "$deploy/.yamllint.yml" "$deploy"

if command -v docker-compose >/dev/null; then
  step "docker-compose config (all profiles)" \
    docker-compose -f "$deploy/compose/docker-compose.yml" --profile grafana --profile logging config -q
else
  echo "SKIP  docker-compose is not installed (ensure-tools.sh --docker installs it)"
fi

# Prometheus configs: rule_files pointed at the repository's rules; Debian's promtool has no
# Kubernetes service discovery, so the k8s config is checked with static targets in its place.
sed "s#/etc/prometheus/rules/#$PWD/$deploy/monitoring/rules/#" "$deploy/compose/prometheus.yml" >"$out/prometheus-compose.yml"
"$py" - "$deploy/monitoring/prometheus-k8s.yml" "$out/prometheus-k8s.yml" "$PWD/$deploy/monitoring/rules/" <<'PY'
import sys, yaml
src, dst, rules = sys.argv[1:]
doc = yaml.safe_load(open(src))
doc["rule_files"] = [r.replace("/etc/prometheus/rules/", rules) for r in doc["rule_files"]]
for job in doc["scrape_configs"]:
    if job.pop("kubernetes_sd_configs", None) is not None:
        job["static_configs"] = [{"targets": ["placeholder:9100"]}]
yaml.safe_dump(doc, open(dst, "w"))
PY
step "promtool check config (compose)" promtool check config "$out/prometheus-compose.yml"
step "promtool check config (kubernetes, SD stubbed)" promtool check config "$out/prometheus-k8s.yml"
step "promtool check rules" promtool check rules "$deploy"/monitoring/rules/*.rules.yml
step "promtool test rules" promtool test rules "$deploy"/monitoring/tests/*.test.yml
step "rule hygiene, runbook, dashboard PromQL parse" "$py" "$deploy/scripts/check_monitoring.py"
step "dashboard JSON is fresh (generate.py --check)" "$py" "$deploy/monitoring/dashboards/generate.py" --check
step "logging configs (structure)" "$py" "$deploy/scripts/check_logging.py"

# create-secrets.sh issues certificates with the workspace's nidctl.
nidctl="${NIDCTL:-${CARGO_TARGET_DIR:-$HOME/.cache/nid/target}/debug/nidctl}"
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  for overlay in dev prod; do
    rendered="$out/k8s-$overlay.yaml"
    step "kustomize render overlays/$overlay" sh -c "kubectl kustomize '$deploy/k8s/overlays/$overlay' >'$rendered'"
    step "kubernetes-validate --strict $K8S_VERSION overlays/$overlay" \
      kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$rendered"
    step "structure test overlays/$overlay" "$py" "$deploy/k8s/tests/structure.py" "$rendered"
    if [ -x "$nidctl" ]; then
      # The Secrets create-secrets.sh prints for this overlay's cells: valid, rerun-stable, and
      # holding every key the pods mount, each certificate naming the replica that mounts it.
      cells="$(grep -c '^\[\[cells\]\]' "$deploy/k8s/overlays/$overlay/cluster.toml")"
      secrets="$out/secrets-$overlay.yaml"
      state="$out/secrets-state-$overlay"
      step "create-secrets.sh ($overlay, $cells data cells) is valid and stable on rerun" sh -c \
        "NIDCTL='$nidctl' bash '$deploy/k8s/create-secrets.sh' nid-$overlay '$cells' '$state' --new >'$secrets' 2>/dev/null \
         && kubernetes-validate --strict --quiet -k '$K8S_VERSION' '$secrets' \
         && NIDCTL='$nidctl' bash '$deploy/k8s/create-secrets.sh' nid-$overlay '$cells' '$state' 2>/dev/null | cmp - '$secrets'"
      step "structure test overlays/$overlay against its Secrets" \
        "$py" "$deploy/k8s/tests/structure.py" "$rendered" --secrets "$secrets"
    else
      echo "SKIP  !!! $nidctl is not built: create-secrets.sh and the Secrets the pods mount were NOT checked"
    fi
  done
  step "kustomize render + validate deploy/monitoring" sh -c \
    "kubectl kustomize '$deploy/monitoring' >'$out/k8s-monitoring.yaml' && kubernetes-validate --strict --quiet -k '$K8S_VERSION' '$out/k8s-monitoring.yaml'"
  for fixture in "$deploy"/k8s/tests/fixtures/*/; do
    name="$(basename "$fixture")"
    mapfile -t expect <"$fixture/expect-fail.txt"
    step "broken fixture $name is rejected" sh -c \
      "kubectl kustomize '$fixture' >'$out/fixture-$name.yaml' && kubernetes-validate --strict --quiet -k '$K8S_VERSION' '$out/fixture-$name.yaml' \
       && '$py' '$deploy/k8s/tests/structure.py' '$out/fixture-$name.yaml' --expect-fail \"\$@\"" sh "${expect[@]}"
  done
else
  echo "SKIP  !!! kubectl (with kustomize) is not installed: the Kubernetes render, validation and"
  echo "SKIP  !!! structure checks did NOT run. Install kubectl >= 1.27 to run them."
fi

echo
if [ "$failed" -gt 0 ]; then
  echo "deploy-check: failed: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
