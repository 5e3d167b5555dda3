#!/usr/bin/env bash
# End-to-end test of the compose cluster with the already-built binaries (make compose-test):
# images, a control cell and two data cells of three replicas over three zones, a router and
# Prometheus; enrolment and authentication through the published router port; cell 1's leader cut
# off its networks (enrolment goes on, Prometheus fires NidReplicaDown), healed (it catches up);
# a whole zone stopped (every cell still serves; replicas exit 0 on SIGTERM); the dashboard's
# queries return data; every log line on stderr is JSON. Then everything is torn down.
#
# Usage: deploy/compose/test.sh [BIN_DIR]   (default ~/.cache/nid/target/debug); runs as root.
# Env: NID_KEEP=1 leaves the cluster up on exit (for a look around; `docker-compose -p nidtest down -v`).
# Prints each step and "N passed, N failed"; exits non-zero on any failure.
# Functions run through check/eventually, which shellcheck cannot follow.
# shellcheck disable=SC2329
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin_dir="${1:-$HOME/.cache/nid/target/debug}"
export NID_IMAGE_TAG="${NID_IMAGE_TAG:-test}"
project=nidtest
compose=(docker-compose -f "$here/docker-compose.yml" -p "$project")
nidctl="$bin_dir/nidctl"
started_at=$SECONDS
passed=0
failed=0

say() { printf '[%4ss] %s\n' "$((SECONDS - started_at))" "$*"; }
pass() { passed=$((passed + 1)); say "PASS $*"; }
fail() { failed=$((failed + 1)); say "FAIL $*"; }
check() { # DESCRIPTION COMMAND...
  local d="$1"; shift
  if "$@"; then pass "$d"; else fail "$d"; fi
}
# Retries COMMAND until it succeeds or TIMEOUT seconds pass.
eventually() { # TIMEOUT COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 2
  done
}
finish() {
  echo
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
  exit $?
}

venv_bin="$(bash "$repo/deploy/scripts/ensure-tools.sh" --docker | tail -1)" || { fail "install the tools"; finish; }
py="$venv_bin/python"
dockerd_state="$(bash "$repo/deploy/scripts/dockerd.sh" start)" || { fail "start a docker engine"; finish; }
say "docker engine: $dockerd_state"

cleanup() {
  if [ "${NID_KEEP:-0}" = 1 ]; then
    say "NID_KEEP=1: leaving project $project up"
  else
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
  fi
  if [ "$dockerd_state" = started ] && [ "${NID_KEEP:-0}" != 1 ]; then
    bash "$repo/deploy/scripts/dockerd.sh" stop
  fi
}
trap cleanup EXIT

for b in nid-cell nid-router nidctl; do
  [ -x "$bin_dir/$b" ] || { fail "binary $bin_dir/$b exists (build the workspace first)"; finish; }
done
# The interfaces the compose cluster relies on; a binary without one fails here, by name.
interfaces_present() {
  local ok=0
  "$nidctl" cluster init --help >/dev/null 2>&1 || { say "  nidctl has no 'cluster init'"; ok=1; }
  "$nidctl" probe --help >/dev/null 2>&1 || { say "  nidctl has no 'probe'"; ok=1; }
  "$bin_dir/nid-cell" --help 2>&1 | grep -q -- --log-format || { say "  nid-cell has no --log-format"; ok=1; }
  "$bin_dir/nid-router" --help 2>&1 | grep -q -- --log-format || { say "  nid-router has no --log-format"; ok=1; }
  return "$ok"
}
check "the binaries have nidctl cluster init, nidctl probe and --log-format" interfaces_present || true
[ "$failed" -eq 0 ] || finish
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1

say "building images from $bin_dir"
check "images build" bash "$repo/deploy/images/build.sh" "$bin_dir"
check "secrets generated (keys, tokens, a cluster CA and one certificate per process)" env NIDCTL="$nidctl" bash "$here/gen-secrets.sh"
# Every host-side nidctl call speaks mutual TLS under the cluster CA (as admin unless --as says).
tls="$here/secrets/tls/clients"
export NIDCTL_TLS_DIR="$tls"

say "starting the cluster"
if ! "${compose[@]}" up -d >"$HOME/.cache/nid/compose-test-up.log" 2>&1; then
  fail "docker-compose up"; tail -20 "$HOME/.cache/nid/compose-test-up.log"
  "${compose[@]}" logs --tail 20 init router 2>&1 | tail -40
  finish
fi
pass "docker-compose up (9 replicas healthy, cluster init exited 0, router started)"

container() { "${compose[@]}" ps -q "$1"; }
health() { docker inspect -f '{{.State.Health.Status}}' "$(container "$1")" 2>/dev/null; }
router_healthy() { [ "$(health router)" = healthy ]; }
check "router container healthy" eventually 60 router_healthy
router="$("${compose[@]}" port router 7000)"
prom="$("${compose[@]}" port prometheus 9090)"
say "router at $router, Prometheus at $prom"

admin_token="$here/secrets/admin.token"
# The nidctl image, on the host network, registers the partner (the image works; the admin path too).
api_key="$(docker run --rm --network host -v "$admin_token:/run/secrets/admin.token:ro" \
  -v "$here/secrets/tls/admin:/run/tls:ro" "nidctl:$NID_IMAGE_TAG" \
  partner add e2e-partner --allow demographic,pin,totp --router "$router" --admin-token-file /run/secrets/admin.token \
  --tls-dir /run/tls 2>/dev/null | tail -1)"
check "partner registered through the router with the nidctl image" test -n "$api_key"
# The partner's certificate: its API key is honoured only over a connection holding it.
partner_cert() {
  "$nidctl" cert issue --dir "$here/secrets/tls/ca" --days 30 partner-e2e-partner >/dev/null &&
    cp -f "$here/secrets/tls/ca/partner-e2e-partner.pem" "$here/secrets/tls/ca/partner-e2e-partner.key" "$tls/"
}
check "the partner's certificate issued (nidctl cert issue)" partner_cert

# Outsiders are refused: a plaintext client, and a client whose certificate another CA issued.
refused_plaintext() { ! env -u NIDCTL_TLS_DIR "$nidctl" status --router "$router" >/dev/null 2>&1; }
check "a plaintext client is refused by the router" refused_plaintext
stranger="$(mktemp -d)"
refused_stranger() {
  "$nidctl" cert init-ca --dir "$stranger" >/dev/null && "$nidctl" cert issue --dir "$stranger" admin >/dev/null &&
    ! "$nidctl" status --router "$router" --tls-dir "$stranger" >/dev/null 2>&1
}
check "a client holding an admin certificate of another CA is refused" refused_stranger
rm -rf "$stranger"
answers_admin() { "$nidctl" status --router "$router" >/dev/null 2>&1; }
check "the cluster's admin certificate is served" answers_admin

uins=()
enroll() { # RID
  local uin
  uin="$("$nidctl" enroll --as enroller-compose --rid "$1" --name "Person $1" --dob 1990-01-01 --pin 2468 --router "$router" 2>>"$HOME/.cache/nid/compose-test-nidctl.log")" || return 1
  [ -n "$uin" ] && uins+=("$uin")
}
enroll_many() { # PREFIX COUNT
  local ok=0 i
  for i in $(seq 1 "$2"); do enroll "$1-$i" && ok=$((ok + 1)); done
  say "enrolled $ok of $2 ($1)"
  [ "$ok" -eq "$2" ]
}
auth_all() { # EXPECTED_EXIT PIN
  local bad=0 u rc
  for u in "${uins[@]}"; do
    "$nidctl" auth --as partner-e2e-partner "$u" --pin "$2" --api-key "$api_key" --router "$router" >/dev/null 2>>"$HOME/.cache/nid/compose-test-nidctl.log"
    rc=$?
    [ "$rc" -eq "$1" ] || bad=$((bad + 1))
  done
  [ "$bad" -eq 0 ]
}
run="$(date +%s)"
check "enrol 20 people through the published router port" enroll_many "E2E-$run-A" 20
check "authenticate each of them (PIN, yes)" auth_all 0 2468
answered_no() { "$nidctl" auth --as partner-e2e-partner "${uins[0]:-000000000000}" --pin 1111 --api-key "$api_key" --router "$router" >/dev/null 2>&1; [ $? -eq 4 ]; }
check "a wrong PIN is answered no (exit 4)" answered_no

# Prometheus helpers.
query() { curl -fsS --max-time 5 "http://$prom/api/v1/query" --data-urlencode "query=$1"; }
has_data() { query "$1" | "$py" -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'; }
alert_firing() { # ALERTNAME LABEL=VALUE
  curl -fsS --max-time 5 "http://$prom/api/v1/alerts" | "$py" -c '
import json, sys
name, (k, v) = sys.argv[1], sys.argv[2].split("=", 1)
alerts = json.load(sys.stdin)["data"]["alerts"]
sys.exit(0 if any(a["labels"].get("alertname") == name and a["labels"].get(k) == v and a["state"] == "firing" for a in alerts) else 1)' "$1" "$2"
}
both_cells_wrote() { [ "$(query 'count(sum by (cell) (nid_raft_proposals_committed_total{job="nid-cell",role="data"}) > 0)' | "$py" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')" = 2 ]; }
check "Prometheus scrapes every replica and the router (10 targets up)" eventually 60 has_data 'count(up{job=~"nid-cell|nid-router"} == 1) == 10'
check "both data cells committed enrolments" eventually 30 both_cells_wrote

# Cell 1's leader cut off every network it is on: the hardest single-replica failure (an
# election, and the router must stop waiting on a leader that no longer answers).
leader_line="$("$nidctl" status --router "$router" 2>/dev/null | awk '$1 == 1 && $5 == "*" {print $3, $4; exit}')"
victim="${leader_line%%:*}"
victim_zone="${leader_line##* }"
if [ -z "$leader_line" ]; then victim=cell-1-b; victim_zone=zone-b; fi
victim_id="$(container "$victim")"
victim_networks=("${project}_${victim_zone}" "${project}_interzone")
say "cutting cell 1's leader $victim off ${victim_networks[*]}"
for n in "${victim_networks[@]}"; do docker network disconnect "$n" "$victim_id"; done
# A client retries an enrolment that failed (enrolment is idempotent by RID): up to 4 attempts.
cut_at=$SECONDS
timeouts=0
first_ok=""
enroll_retrying() { # PREFIX COUNT
  local i attempt
  for i in $(seq 1 "$2"); do
    for attempt in 1 2 3 4; do
      if enroll "$1-$i"; then
        [ -n "$first_ok" ] || first_ok=$((SECONDS - cut_at))
        break
      fi
      timeouts=$((timeouts + 1))
      [ "$attempt" = 4 ] && return 1
    done
  done
}
check "enrolment continues with cell 1's leader cut off (10 more, a client retrying)" enroll_retrying "E2E-$run-B" 10
say "first enrolment after the cut succeeded after ${first_ok:-?}s; $timeouts attempts failed and were retried"
check "authentication continues with $victim cut off" auth_all 0 2468
say "waiting for Prometheus to fire NidReplicaDown (for: 1m)"
check "NidReplicaDown fires for $victim" eventually 150 alert_firing NidReplicaDown instance="$victim"
check "NidCellQuorumAtRisk fires for cell 1" eventually 30 alert_firing NidCellQuorumAtRisk cell=1

say "healing $victim"
for n in "${victim_networks[@]}"; do docker network connect --alias "$victim" "$n" "$victim_id"; done
# Caught up: within a few entries of the cell's commit index. Not exactly 0: the leaders' sweeps
# keep committing, and the replicas are scraped at different moments, so a healthy follower can
# read one or two entries behind the leader's latest commit index.
caught_up() { has_data "up{instance=\"$victim\"} == 1 and on (instance) nid:raft_apply_lag:entries{instance=\"$victim\"} <= 3"; }
check "$victim is scraped again and has caught up (apply lag <= 3 entries)" eventually 90 caught_up
if ! caught_up; then
  for q in "up{instance=\"$victim\"}" "nid:raft_apply_lag:entries{cell=\"1\"}" \
    "nid_raft_commit_index{cell=\"1\"}" "nid_raft_applied_index{cell=\"1\"}"; do
    say "  $q -> $(query "$q" | "$py" -c 'import json,sys; print([(r["metric"].get("instance"), r["value"][1]) for r in json.load(sys.stdin)["data"]["result"]])')"
  done
fi
status_shows_up() { "$nidctl" status --router "$router" 2>/dev/null | grep -E "^ +1 +[0-9]+ +$victim:7000 " | grep -q ' up *$'; }
check "nidctl status (through the router) shows $victim up again" eventually 60 status_shows_up
"$nidctl" status --router "$router" 2>&1 | sed 's/^/        /'

# Dashboard queries after traffic: every query that must have data has some.
dashboard_data() {
  local missing=0 line expr panel
  while IFS= read -r line; do
    expr="$("$py" -c 'import json,sys; print(json.loads(sys.argv[1])["expr"])' "$line")"
    panel="$("$py" -c 'import json,sys; print(json.loads(sys.argv[1])["panel"])' "$line")"
    if ! has_data "$expr"; then
      say "  no data: panel '$panel': $expr"
      missing=$((missing + 1))
    fi
  done < <("$py" "$repo/deploy/monitoring/dashboards/generate.py" --queries | "$py" -c '
import json, sys
for l in sys.stdin:
    if json.loads(l)["expect_data"]: print(l.strip())')
  [ "$missing" -eq 0 ]
}
check "every dashboard query expected to have data returns data from Prometheus" eventually 60 dashboard_data

# Logs: every stderr line of a cell and the router is a JSON object with timestamp, level, target.
json_logs() { # SERVICE
  docker logs "$(container "$1")" 2>&1 >/dev/null | "$py" -c '
import json, sys
n = bad = 0
for line in sys.stdin:
    if not line.strip(): continue
    n += 1
    try:
        o = json.loads(line)
        ok = isinstance(o, dict) and all(k in o for k in ("timestamp", "level", "target"))
    except ValueError:
        ok = False
    if not ok:
        bad += 1
        if bad <= 3: print("  not a JSON log line:", line.strip()[:160])
sys.exit(0 if n and not bad else 1)'
}
check "cell-1-a logs JSON lines on stderr" json_logs cell-1-a
check "router logs JSON lines on stderr" json_logs router

# A whole zone stops: SIGTERM to every zone-c replica.
zone_c=(control-c cell-1-c cell-2-c)
say "stopping zone-c: ${zone_c[*]}"
t0=$SECONDS
"${compose[@]}" stop "${zone_c[@]}" >/dev/null 2>&1
stop_secs=$((SECONDS - t0))
exited_cleanly() {
  local s code
  for s in "${zone_c[@]}"; do
    code="$(docker inspect -f '{{.State.ExitCode}}' "$(container "$s")")"
    [ "$code" = 0 ] || { say "  $s exited $code"; return 1; }
  done
}
check "zone-c replicas exit 0 on SIGTERM (stop took ${stop_secs}s, grace 30s)" exited_cleanly
before=${#uins[@]}
check "enrolment continues in both data cells with zone-c down (10 more)" enroll_many "E2E-$run-C" 10
check "every person enrolled so far authenticates with zone-c down ($before + 10)" auth_all 0 2468
register_partner() { "$nidctl" partner add e2e-partner-2 --allow pin --router "$router" --admin-token-file "$admin_token" >/dev/null 2>&1; }
check "the control cell serves with zone-c down (register a partner)" register_partner
status_answers() { "$nidctl" status --router "$router" 2>&1 | sed 's/^/        /'; }
check "nidctl status answers with zone-c down" status_answers
written_after_zone_loss() { has_data 'count(sum by (cell) (increase(nid_raft_proposals_committed_total{job="nid-cell",role="data",zone!="zone-c"}[1m])) > 0) == 2'; }
check "both data cells committed writes during the zone loss" eventually 30 written_after_zone_loss
"${compose[@]}" start "${zone_c[@]}" >/dev/null 2>&1
zone_back() { has_data 'count(up{job="nid-cell",zone="zone-c"} == 1) == 3'; }
check "zone-c replicas are back" eventually 60 zone_back

finish
