#!/usr/bin/env python3
"""Structural checks of rendered nid manifests: what schema validation cannot see.

    structure.py RENDERED.yaml [--expect-fail TEXT ...]

Checks: workload selectors match their pods; every Service selects pods and names existing ports;
one PodDisruptionBudget per StatefulSet (maxUnavailable 1) and none selecting nothing; zone spread
(DoNotSchedule, maxSkew 1) and host anti-affinity that select exactly the StatefulSet's own pods;
headless peer Service with publishNotReadyAddresses; restricted security contexts, probes and
resource requests; the HPA's target; placeholders filled; each cell's --peers names its own pods in
distinct zones; ConfigMaps and Secrets referenced exist (or are the documented external Secrets);
the cluster spec matches the rendered cells; mutual TLS everywhere (no --insecure, probes present
the pod's own certificate and expect the right server role, each replica mounts only its own pair
through subPathExpr, Secret files readable through fsGroup); and the NetworkPolicy reachability
matrix, evaluated the way the API server defines it (isolation per direction, union of rules,
namespace and pod selectors, named ports resolved on the destination pod) against the matrix nid
needs.

With --secrets FILE (what deploy/k8s/create-secrets.sh printed), every Secret and key the pods
reference must be in it, and each certificate must name the identity its mount gives it.

With --expect-fail, exits 0 only if some check fails and every TEXT appears in the failures (the
broken fixtures under deploy/k8s/tests/fixtures use this).
"""
import argparse
import base64
import re
import sys
import tomllib

import yaml

EXTERNAL_SECRETS = {"nid-cluster-secrets", "nid-router-secrets", "nid-tls-router", "nid-tls-init"}
CELL_TLS_SECRET = re.compile(r"nid-tls-cell-[0-9]+")
TLS_DIR = "/run/tls"
GRPC, METRICS = 7000, 9100


class Pod:
    def __init__(self, name, namespace, labels, ports, ns_labels=None, workload=None, role=None):
        self.name, self.namespace, self.labels, self.ports = name, namespace, labels, ports
        self.ns_labels = ns_labels or {"kubernetes.io/metadata.name": namespace}
        self.workload, self.role = workload, role

    def __repr__(self):
        return self.name


def selects(selector, labels):
    """A metav1.LabelSelector against labels; an empty selector selects everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


class Checker:
    def __init__(self, docs, secrets=None):
        self.docs = [d for d in docs if d]
        # name -> {key: bytes}, from create-secrets.sh's output (None: not given)
        self.secrets = None if secrets is None else {
            d["metadata"]["name"]: {k: base64.b64decode(v) for k, v in (d.get("data") or {}).items()}
            for d in secrets if d and d.get("kind") == "Secret"}
        self.failures = []
        self.passed = 0
        ns = [d for d in self.docs if d["kind"] == "Namespace"]
        self.namespace = ns[0]["metadata"]["name"] if ns else None
        self.ns_labels = {"kubernetes.io/metadata.name": self.namespace, **(ns[0]["metadata"].get("labels", {}) if ns else {})}

    def check(self, ok, message):
        if ok:
            self.passed += 1
        else:
            self.failures.append(message)

    def kind(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    @staticmethod
    def name(d):
        return f"{d['kind']}/{d['metadata']['name']}"

    def workloads(self):
        return self.kind("StatefulSet") + self.kind("Deployment") + self.kind("Job")

    @staticmethod
    def pod_spec(w):
        return w["spec"]["template"]["spec"]

    # ---- pods, as the controllers would create them ----
    def pods(self):
        pods = []
        for w in self.workloads():
            labels = w["spec"]["template"]["metadata"].get("labels", {})
            ports = {}
            for c in self.pod_spec(w)["containers"]:
                for p in c.get("ports", []):
                    ports[p.get("name", str(p["containerPort"]))] = (p["containerPort"], p.get("protocol", "TCP"))
            comp = labels.get("app.kubernetes.io/component")
            role = "control" if labels.get("nid.example/role") == "control" else comp
            n = w["spec"].get("replicas", 1) if w["kind"] != "Job" else 1
            if w["kind"] == "Deployment":
                hpa = [h for h in self.kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]]
                n = max(n, 2 if not hpa else min(hpa[0]["spec"].get("minReplicas", 1), 3))
            for i in range(n):
                extra = {}
                if w["kind"] == "StatefulSet":
                    extra = {"apps.kubernetes.io/pod-index": str(i),
                             "statefulset.kubernetes.io/pod-name": f"{w['metadata']['name']}-{i}"}
                pods.append(Pod(f"{w['metadata']['name']}-{i}", self.namespace, {**labels, **extra}, ports,
                                self.ns_labels, w, role))
        return pods

    @staticmethod
    def external_pods():
        return [
            Pod("monitoring/prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, {"web": (9090, "TCP")}, role="prometheus"),
            Pod("kube-system/kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": (53, "UDP"), "dns-tcp": (53, "TCP")}, role="dns"),
            Pod("default/outsider", "default", {"app": "outsider"}, {}, role="outsider"),
        ]

    def stray_pod(self):
        return Pod("stray-debug-pod", self.namespace, {"app": "debug"}, {}, self.ns_labels, role="stray")

    # ---- checks ----
    def run(self):
        if not self.namespace:
            self.check(False, "no Namespace object in the rendering")
            return
        for d in self.docs:
            if d["kind"] not in ("Namespace",) and "namespace" in d["metadata"]:
                self.check(d["metadata"]["namespace"] == self.namespace, f"{self.name(d)} is outside namespace {self.namespace}")
        self.check_workloads()
        self.check_services()
        self.check_pdbs()
        self.check_statefulsets()
        self.check_hpa()
        self.check_references()
        self.check_cluster_spec()
        self.check_tls()
        self.check_network_policies()

    def check_workloads(self):
        for w in self.workloads():
            n = self.name(w)
            labels = w["spec"]["template"]["metadata"].get("labels", {})
            if w["kind"] != "Job":
                self.check(bool(w["spec"]["selector"].get("matchLabels") or w["spec"]["selector"].get("matchExpressions")),
                           f"{n}: empty selector")
                self.check(selects(w["spec"]["selector"], labels), f"{n}: selector does not match its pod template labels")
                others = [o for o in self.workloads() if o is not w and o["kind"] != "Job"
                          and selects(w["spec"]["selector"], o["spec"]["template"]["metadata"].get("labels", {}))]
                self.check(not others, f"{n}: selector also matches the pods of {[self.name(o) for o in others]}")
            spec = self.pod_spec(w)
            psc = spec.get("securityContext", {})
            self.check(psc.get("runAsNonRoot") is True, f"{n}: pod securityContext.runAsNonRoot is not true")
            self.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{n}: seccompProfile is not RuntimeDefault")
            self.check(spec.get("automountServiceAccountToken") is False, f"{n}: mounts a service account token it does not need")
            for c in spec["containers"] + spec.get("initContainers", []):
                cn = f"{n} container {c['name']}"
                sc = c.get("securityContext", {})
                self.check(sc.get("readOnlyRootFilesystem") is True, f"{cn}: root filesystem is writable")
                self.check(sc.get("allowPrivilegeEscalation") is False, f"{cn}: allowPrivilegeEscalation is not false")
                self.check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cn}: capabilities are not dropped (drop: [ALL])")
                req = c.get("resources", {}).get("requests", {})
                self.check("cpu" in req and "memory" in req, f"{cn}: no cpu and memory requests")
                self.check("memory" in c.get("resources", {}).get("limits", {}), f"{cn}: no memory limit")
                self.check(":" in c["image"] and not c["image"].endswith(":latest"), f"{cn}: image {c['image']} has no pinned tag")
                if w["kind"] != "Job" and c in spec["containers"]:
                    self.check("livenessProbe" in c and "readinessProbe" in c, f"{cn}: liveness or readiness probe missing")
                for e in c.get("env", []):
                    self.check(e.get("value") != "unset", f"{cn}: env {e['name']} is still the base's placeholder")
                args = " ".join(c.get("args", []))
                self.check("--log-format=json" in args or w["kind"] == "Job" or c not in spec["containers"],
                           f"{cn}: not logging JSON (--log-format=json)")

    def pods_of(self, w):
        return [p for p in self.pods() if p.workload is w]

    def check_services(self):
        pods = self.pods()
        for s in self.kind("Service"):
            n = self.name(s)
            sel = s["spec"].get("selector")
            chosen = [p for p in pods if sel and selects({"matchLabels": sel}, p.labels)]
            self.check(bool(chosen), f"{n}: selects no pod")
            workloads = {id(p.workload) for p in chosen}
            self.check(len(workloads) <= 1, f"{n}: selects pods of several workloads")
            for port in s["spec"]["ports"]:
                tp = port.get("targetPort", port["port"])
                for p in chosen[:1]:
                    ok = tp in p.ports if isinstance(tp, str) else any(v[0] == tp for v in p.ports.values())
                    self.check(ok, f"{n}: targetPort {tp} is not a port of its pods")

    def check_pdbs(self):
        for pdb in self.kind("PodDisruptionBudget"):
            chosen = [w for w in self.workloads() if w["kind"] != "Job"
                      and selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"].get("labels", {}))]
            self.check(len(chosen) == 1, f"{self.name(pdb)}: selects {len(chosen)} workloads, not one")
        for sts in self.kind("StatefulSet"):
            labels = sts["spec"]["template"]["metadata"].get("labels", {})
            pdbs = [p for p in self.kind("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
            self.check(len(pdbs) == 1, f"{self.name(sts)}: has {len(pdbs)} PodDisruptionBudgets, not one")
            for p in pdbs:
                self.check(p["spec"].get("maxUnavailable") == 1, f"{self.name(p)}: maxUnavailable is not 1")

    def check_statefulsets(self):
        for sts in self.kind("StatefulSet"):
            n = self.name(sts)
            spec = sts["spec"]
            own = spec["template"]["metadata"].get("labels", {})
            others = [o["spec"]["template"]["metadata"].get("labels", {}) for o in self.workloads() if o is not sts]
            replicas = spec.get("replicas", 1)
            self.check(replicas >= 3 and replicas % 2 == 1, f"{n}: {replicas} replicas (a cell needs an odd number >= 3)")
            self.check(spec.get("podManagementPolicy") == "Parallel", f"{n}: podManagementPolicy is not Parallel")
            pod = spec["template"]["spec"]
            tsc = [t for t in pod.get("topologySpreadConstraints", []) if t["topologyKey"] == "topology.kubernetes.io/zone"]
            self.check(len(tsc) == 1 and tsc[0]["whenUnsatisfiable"] == "DoNotSchedule" and tsc[0]["maxSkew"] == 1,
                       f"{n}: no zone spread with maxSkew 1 and DoNotSchedule")
            for t in tsc:
                self.check(selects(t["labelSelector"], own) and not any(selects(t["labelSelector"], o) for o in others),
                           f"{n}: the zone spread's labelSelector does not select exactly this StatefulSet's pods")
            anti = pod.get("affinity", {}).get("podAntiAffinity", {})
            terms = [t.get("podAffinityTerm", t) for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", []) +
                     anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])]
            host = [t for t in terms if t["topologyKey"] == "kubernetes.io/hostname"]
            self.check(bool(host), f"{n}: no anti-affinity by host")
            for t in host:
                self.check(selects(t["labelSelector"], own) and not any(selects(t["labelSelector"], o) for o in others),
                           f"{n}: the host anti-affinity does not select exactly this StatefulSet's pods")
            svc = [s for s in self.kind("Service") if s["metadata"]["name"] == spec["serviceName"]]
            self.check(len(svc) == 1, f"{n}: serviceName {spec['serviceName']} is not a rendered Service")
            for s in svc:
                self.check(s["spec"].get("clusterIP") == "None", f"{n}: Service {spec['serviceName']} is not headless")
                self.check(s["spec"].get("publishNotReadyAddresses") is True, f"{n}: Service {spec['serviceName']} does not publish not-ready addresses")
                self.check(selects({"matchLabels": s["spec"]["selector"]}, own), f"{n}: Service {spec['serviceName']} does not select its pods")
            for vct in spec.get("volumeClaimTemplates", []):
                self.check(vct["spec"]["accessModes"] == ["ReadWriteOnce"], f"{n}: volume {vct['metadata']['name']} is not ReadWriteOnce")
            # --peers names this StatefulSet's own pods through its headless Service, zones distinct.
            c = pod["containers"][0]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if "NID_PEERS" in env:
                peers = (env["NID_PEERS"] or "").split(",")
                expect = [f"{i + 1}={sts['metadata']['name']}-{i}.{spec['serviceName']}:{GRPC}" for i in range(replicas)]
                got = [p.split("@")[0] for p in peers]
                zones = [p.split("@")[1] if "@" in p else "" for p in peers]
                self.check(got == expect, f"{n}: --peers {got} does not name its own pods {expect}")
                self.check(len(set(zones)) == len(zones) and all(zones), f"{n}: --peers zones are not distinct: {zones}")
                self.check(env.get("NID_CELL_ID") == own.get("nid.example/cell"),
                           f"{n}: NID_CELL_ID {env.get('NID_CELL_ID')} differs from its label nid.example/cell {own.get('nid.example/cell')}")
                role = "control" if env.get("NID_CELL_ID") == "0" else "data"
                self.check(env.get("NID_ROLE") == role == own.get("nid.example/role"), f"{n}: role {env.get('NID_ROLE')} does not fit cell {env.get('NID_CELL_ID')}")

    def check_hpa(self):
        for h in self.kind("HorizontalPodAutoscaler"):
            ref = h["spec"]["scaleTargetRef"]
            target = [d for d in self.kind(ref["kind"]) if d["metadata"]["name"] == ref["name"]]
            self.check(len(target) == 1, f"{self.name(h)}: scale target {ref['kind']}/{ref['name']} is not rendered")
            cpu = [m for m in h["spec"].get("metrics", []) if m.get("resource", {}).get("name") == "cpu"]
            self.check(bool(cpu), f"{self.name(h)}: does not scale on CPU")
        self.check(bool(self.kind("HorizontalPodAutoscaler")), "no HorizontalPodAutoscaler for the router")

    def check_references(self):
        configmaps = {c["metadata"]["name"] for c in self.kind("ConfigMap")}
        secrets = {s["metadata"]["name"] for s in self.kind("Secret")} | EXTERNAL_SECRETS
        for w in self.workloads():
            spec = self.pod_spec(w)
            for v in spec.get("volumes", []):
                if "configMap" in v:
                    self.check(v["configMap"]["name"] in configmaps, f"{self.name(w)}: ConfigMap {v['configMap']['name']} is not rendered")
                if "secret" in v:
                    known = v["secret"]["secretName"] in secrets or CELL_TLS_SECRET.fullmatch(v["secret"]["secretName"])
                    self.check(bool(known), f"{self.name(w)}: Secret {v['secret']['secretName']} is unknown")
                    self.check_secret_keys(w, v["secret"]["secretName"], [i["key"] for i in v["secret"].get("items", [])])
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"] + spec.get("initContainers", []):
                # A file a flag names inside a whole-Secret mount is a key of that Secret.
                for m in c.get("volumeMounts", []):
                    secret = vols.get(m["name"], {}).get("secret")
                    if not secret or secret.get("items"):
                        continue
                    for a in c.get("args", []):
                        path = a.split("=", 1)[-1]
                        if path.startswith(m["mountPath"] + "/") and "$(" not in path:
                            self.check_secret_keys(w, secret["secretName"], [path[len(m["mountPath"]) + 1:]])
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        self.check(ref["name"] in secrets, f"{self.name(w)}: Secret {ref['name']} is unknown")
                        self.check_secret_keys(w, ref["name"], [ref["key"]])

    def check_secret_keys(self, w, name, keys):
        """With --secrets: the Secret was printed and holds the keys the pod takes from it."""
        if self.secrets is None:
            return
        self.check(name in self.secrets, f"{self.name(w)}: Secret {name} is not among those create-secrets.sh printed")
        for k in keys:
            self.check(k in self.secrets.get(name, {}), f"{self.name(w)}: Secret {name} has no key {k}")

    def check_cluster_spec(self):
        specs = [c for c in self.kind("ConfigMap") if c["metadata"]["name"].startswith("cluster-spec")]
        self.check(len(specs) == 1, "no cluster-spec ConfigMap for nidctl cluster init")
        if not specs:
            return
        spec = tomllib.loads(specs[0]["data"]["cluster.toml"])
        cells = {}
        for sts in self.kind("StatefulSet"):
            env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0].get("env", [])}
            addrs = [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{GRPC}" for i in range(sts["spec"]["replicas"])]
            cells[env.get("NID_CELL_ID")] = (addrs, env.get("NID_PEERS", ""))
        self.check(spec.get("control") == cells.get("0", ([],))[0], f"cluster spec: control {spec.get('control')} is not cell 0's pods in order")
        spec_cells = {str(c["cell_id"]): c for c in spec.get("cells", [])}
        self.check(set(spec_cells) == set(cells) - {"0"}, f"cluster spec: cells {sorted(spec_cells)} differ from the rendered data cells {sorted(set(cells) - {'0'})}")
        for cid, c in spec_cells.items():
            if cid not in cells:
                continue
            peers = {p.split("=")[0]: p.split("=")[1] for p in cells[cid][1].split(",") if "=" in p}
            for r in c["replicas"]:
                self.check(peers.get(str(r["node_id"])) == f"{r['address']}@{r['zone']}",
                           f"cluster spec: cell {cid} node {r['node_id']} {r['address']}@{r['zone']} differs from the cell's --peers")

    # ---- mutual TLS ----
    def role_of(self, w):
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        return "control" if labels.get("nid.example/role") == "control" else labels.get("app.kubernetes.io/component")

    def check_tls(self):
        for w in self.workloads():
            n, spec, role = self.name(w), self.pod_spec(w), self.role_of(w)
            psc = spec.get("securityContext", {})
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            if any("secret" in v for v in volumes.values()) and psc.get("runAsUser", 0) != 0:
                # Secret files are root-owned; 0400 without fsGroup is unreadable to the process.
                self.check(psc.get("fsGroup") is not None and psc.get("fsGroup") == psc.get("runAsGroup"),
                           f"{n}: mounts Secrets as non-root user {psc.get('runAsUser')} without fsGroup = runAsGroup (the files would be unreadable)")
            for c in spec["containers"]:
                cn = f"{n} container {c['name']}"
                args = c.get("args", [])
                flat = " ".join(args)
                self.check("--insecure" not in args, f"{cn}: runs --insecure (plaintext, every caller accepted)")
                self.check(re.search(r"--tls-dir[= ]/run/tls(\s|$)", flat) is not None, f"{cn}: no --tls-dir {TLS_DIR}")
                mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == TLS_DIR]
                self.check(len(mounts) == 1, f"{cn}: nothing mounted at {TLS_DIR}")
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if probe not in c:
                        continue
                    cmd = c[probe].get("exec", {}).get("command") or []
                    self.check("probe" in cmd, f"{cn}: {probe} is not an exec of nidctl probe (the kubelet's own probes speak plaintext)")
                    if "probe" not in cmd:
                        continue
                    want = {"cell": "cell", "control": "control", "router": "router"}.get(role)
                    opts = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
                    opts.update({a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--") and "=" not in a})
                    server = opts.get("--server", "router")
                    self.check(server == want, f"{cn}: {probe} expects a {server} server, the pod is a {want}")
                    self.check(opts.get("--tls-dir") == TLS_DIR,
                               f"{cn}: {probe} does not present the pod's certificate (--tls-dir {TLS_DIR})")
                for m in mounts:
                    v = volumes.get(m["name"], {})
                    secret = v.get("secret", {})
                    if role in ("cell", "control"):
                        self.check_replica_tls(w, c, m)
                    else:
                        want = {"router": ("nid-tls-router", "router"), "admin": ("nid-tls-init", "admin")}.get(role)
                        self.check(want is not None and secret.get("secretName") == want[0],
                                   f"{cn}: {TLS_DIR} is not the Secret {want and want[0]}")
                        if want:
                            self.check_secret_certs(cn, want[0], {f"{want[1]}.pem": want[1]}, [f"{want[1]}.key"])
            if role == "control":
                args = spec["containers"][0].get("args", [])
                token = [a.split("=", 1)[1] for a in args if a.startswith("--admin-token-file=")]
                mounted = [m for m in spec["containers"][0].get("volumeMounts", []) if token and token[0].startswith(m["mountPath"] + "/")]
                self.check(bool(token) and bool(mounted),
                           f"{n}: a control replica needs --admin-token-file from a mounted Secret (routers forward admin writes)")

    def check_replica_tls(self, sts, c, mount):
        """One pair per replica: the cell process sees only an in-memory /run/tls, filled by an init
        container from its ordinal's directory of the cell's Secret, under the names
        --tls-cert/--tls-key give; the cell container never mounts the Secret itself."""
        n = self.name(sts)
        spec = self.pod_spec(sts)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        env = {e["name"]: e for e in c.get("env", [])}
        cell = (env.get("NID_CELL_ID") or {}).get("value")
        want_secret = f"nid-tls-cell-{cell}"
        self.check(volumes.get(mount["name"], {}).get("emptyDir", {}).get("medium") == "Memory",
                   f"{n}: {TLS_DIR} is not an in-memory emptyDir filled by the tls init container")
        cell_secret = [v["name"] for v in volumes.values() if CELL_TLS_SECRET.fullmatch(v.get("secret", {}).get("secretName", ""))]
        for cc in spec["containers"]:
            mounted = [m["name"] for m in cc.get("volumeMounts", []) if m["name"] in cell_secret]
            self.check(not mounted, f"{n} container {cc['name']}: mounts the cell's TLS Secret ({mounted}): "
                                    "the replica process could read its siblings' keys")
        args = dict(a.split("=", 1) for a in c.get("args", []) if "=" in a)
        cert = args.get("--tls-cert", "")
        key = args.get("--tls-key", "")
        self.check(cert.startswith(TLS_DIR + "/") and key.startswith(TLS_DIR + "/"), f"{n}: --tls-cert/--tls-key are not in {TLS_DIR}")
        installers = [i for i in spec.get("initContainers", []) if "install" in i.get("args", [])]
        self.check(len(installers) == 1, f"{n}: no init container running `nidctl cert install` into {TLS_DIR}")
        for i in installers:
            iargs = dict(a.split("=", 1) for a in i.get("args", []) if "=" in a)
            ienv = {e["name"]: e for e in i.get("env", [])}
            index = ienv.get("NID_POD_INDEX", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            mounts = {m["mountPath"]: m["name"] for m in i.get("volumeMounts", [])}
            src = [p for p in mounts if iargs.get("--from", "") == f"{p}/$(NID_POD_INDEX)"]
            self.check(bool(src) and index == "metadata.labels['apps.kubernetes.io/pod-index']",
                       f"{n}: the tls init container does not copy from its ordinal's directory ($(NID_POD_INDEX) from the pod-index label)")
            self.check(mounts.get(iargs.get("--to")) == mount["name"], f"{n}: the tls init container does not fill the cell's {TLS_DIR}")
            secret = volumes.get(mounts.get(src[0]) if src else None, {}).get("secret", {})
            self.check(secret.get("secretName") == want_secret, f"{n}: the tls init container reads {secret.get('secretName')}, not {want_secret}")
            items = {it["path"]: it["key"] for it in secret.get("items", [])}
            replicas = sts["spec"].get("replicas", 1)
            names, keys = {}, []
            for ordinal in range(replicas):
                want = {f"{ordinal}/ca.pem": "ca.pem", f"{ordinal}/{cert[len(TLS_DIR) + 1:]}": f"{ordinal}.pem",
                        f"{ordinal}/{key[len(TLS_DIR) + 1:]}": f"{ordinal}.key"}
                got = {p: k for p, k in items.items() if p.startswith(f"{ordinal}/")}
                self.check(got == want, f"{n}: ordinal {ordinal}'s directory holds {got}, not {want}")
                node = ordinal + 1
                names[f"{ordinal}.pem"] = f"control-{node}" if cell == "0" else f"cell-{cell}-{node}"
                keys.append(f"{ordinal}.key")
            self.check(all(any(p.startswith(f"{o}/") for o in range(replicas)) for p in items),
                       f"{n}: the TLS Secret's items land outside the ordinals' directories")
            self.check_secret_certs(n, want_secret, names, keys)

    def check_secret_certs(self, who, secret, names, keys):
        """With --secrets: the Secret exists, holds the keys, and each certificate names its holder."""
        if self.secrets is None:
            return
        data = self.secrets.get(secret)
        self.check(data is not None, f"{who}: Secret {secret} is not among those create-secrets.sh printed")
        if data is None:
            return
        for k in ["ca.pem", *names, *keys]:
            self.check(k in data, f"{who}: Secret {secret} has no key {k}")
        for k, holder in names.items():
            if k in data:
                sans = dns_sans(data[k])
                self.check(holder in sans, f"{who}: Secret {secret} key {k} names {sans}, not {holder}")
        cas = {bytes(d["ca.pem"]) for name, d in self.secrets.items() if name.startswith("nid-tls-") and "ca.pem" in d}
        self.check(len(cas) == 1, f"the TLS Secrets carry {len(cas)} different CAs, not one")

    # ---- NetworkPolicies ----
    def policies(self):
        return self.kind("NetworkPolicy")

    @staticmethod
    def policy_types(p):
        types = p["spec"].get("policyTypes")
        if types:
            return set(types)
        return {"Ingress"} | ({"Egress"} if "egress" in p["spec"] else set())

    @staticmethod
    def peer_matches(peer, policy_ns, pod):
        if "ipBlock" in peer:
            return False  # ipBlocks are for traffic from outside the cluster
        ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
        if ns_sel is not None:
            if not selects(ns_sel, pod.ns_labels):
                return False
        elif pod.namespace != policy_ns:
            return False
        return pod_sel is None or selects(pod_sel, pod.labels)

    @staticmethod
    def port_matches(ports, dst, port, protocol):
        if not ports:
            return True
        for p in ports:
            if p.get("protocol", "TCP") != protocol:
                continue
            want = p.get("port")
            if want is None:
                return True
            if isinstance(want, str):
                if dst.ports.get(want) == (port, protocol):
                    return True
            elif want <= port <= p.get("endPort", want):
                return True
        return False

    def direction_allows(self, direction, subject, peer, dst, port, protocol):
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        isolating = [p for p in self.policies() if p["metadata"].get("namespace", self.namespace) == subject.namespace
                     and direction in self.policy_types(p) and selects(p["spec"]["podSelector"], subject.labels)]
        if not isolating:
            return True
        for p in isolating:
            for rule in p["spec"].get(key) or []:
                peers = rule.get(peers_key)
                if (not peers or any(self.peer_matches(x, subject.namespace, peer) for x in peers)) and \
                        self.port_matches(rule.get("ports"), dst, port, protocol):
                    return True
        return False

    def allowed(self, src, dst, port, protocol="TCP"):
        return (self.direction_allows("Egress", src, dst, dst, port, protocol)
                and self.direction_allows("Ingress", dst, src, dst, port, protocol))

    @staticmethod
    def expected(src, dst, port, protocol):
        nid_src = src.namespace not in ("monitoring", "kube-system", "default") and src.role != "stray"
        if dst.role == "dns":
            return protocol in ("UDP", "TCP") and port == 53 and (nid_src or src.namespace != dst.namespace and src.role != "stray")
        if dst.role in ("cell", "control"):
            if port == METRICS:
                return src.role == "prometheus"
            if port == GRPC:
                same_cell = src.role in ("cell", "control") and src.labels.get("nid.example/cell") == dst.labels.get("nid.example/cell")
                return src.role in ("router", "admin") or same_cell or (src.role == "control" and dst.role == "cell")
            return False
        if dst.role == "router":
            if port == METRICS:
                return src.role == "prometheus"
            return port == GRPC and not nid_src and src.role != "stray"
        if dst.role in ("prometheus", "outsider"):
            return not nid_src and src.role != "stray"
        return False

    def check_network_policies(self):
        pods = self.pods()
        everyone = pods + self.external_pods() + [self.stray_pod()]
        default_deny = [p for p in self.policies() if p["spec"]["podSelector"] == {} and
                        {"Ingress", "Egress"} <= self.policy_types(p) and not p["spec"].get("ingress") and not p["spec"].get("egress")]
        self.check(bool(default_deny), "no default-deny NetworkPolicy (empty podSelector, Ingress and Egress, no rules)")
        for src in everyone:
            for dst in everyone:
                if src is dst or (src.namespace != self.namespace and dst.namespace != self.namespace):
                    continue
                for port, protocol in ((GRPC, "TCP"), (METRICS, "TCP"), (53, "UDP")):
                    if dst.role == "dns" and port != 53 or dst.role != "dns" and port == 53:
                        continue
                    if dst.role in ("prometheus", "outsider") and port != GRPC:
                        continue
                    got = self.allowed(src, dst, port, protocol)
                    want = self.expected(src, dst, port, protocol)
                    self.check(got == want, f"network: {src} -> {dst}:{port}/{protocol} expected "
                                            f"{'allowed' if want else 'denied'}, got {'allowed' if got else 'denied'}")


def der(buf, at):
    """(tag, start of contents, end of contents) of the DER element at `at`."""
    tag, length, at = buf[at], buf[at + 1], at + 2
    if length & 0x80:
        n = length & 0x7F
        length, at = int.from_bytes(buf[at:at + n], "big"), at + n
    return tag, at, at + length


def dns_sans(pem):
    """The DNS names in a PEM certificate's subjectAltName extension (no crypto library needed)."""
    body = b"".join(l for l in pem.strip().splitlines() if not l.startswith(b"-----"))
    cert = base64.b64decode(body)
    oid = bytes([0x06, 0x03, 0x55, 0x1D, 0x11])  # 2.5.29.17
    at = cert.find(oid)
    if at < 0:
        return []
    at += len(oid)
    if cert[at] == 0x01:  # critical flag
        at = der(cert, at)[2]
    _, start, _ = der(cert, at)  # OCTET STRING
    _, at, end = der(cert, start)  # SEQUENCE OF GeneralName
    names = []
    while at < end:
        tag, s, e = der(cert, at)
        if tag == 0x82:
            names.append(cert[s:e].decode())
        at = e
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--secrets", help="the Secrets create-secrets.sh printed for this overlay")
    ap.add_argument("--expect-fail", nargs="*", default=None)
    args = ap.parse_args()
    secrets = None
    if args.secrets:
        with open(args.secrets) as f:
            secrets = list(yaml.safe_load_all(f))
    with open(args.rendered) as f:
        checker = Checker(list(yaml.safe_load_all(f)), secrets)
    checker.run()
    label = args.rendered
    if args.expect_fail is not None:
        missing = [t for t in args.expect_fail if not any(t in f for f in checker.failures)]
        if not checker.failures:
            print(f"structure: {label}: the broken fixture passed every check")
            return 1
        if missing:
            print(f"structure: {label}: failed, but not with {missing}; failures were:")
            for f in checker.failures[:20]:
                print(f"  {f}")
            return 1
        print(f"structure: {label}: broken fixture rejected as expected ({len(checker.failures)} failures, e.g. {checker.failures[0]})")
        return 0
    for f in checker.failures:
        print(f"structure: {label}: {f}")
    print(f"structure: {label}: {checker.passed} checks passed, {len(checker.failures)} failed")
    return 1 if checker.failures else 0


if __name__ == "__main__":
    sys.exit(main())
