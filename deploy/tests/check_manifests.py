#!/usr/bin/env python3
"""Cross-checks of deploy/kubernetes/*.yaml beyond schema validation: the
security settings, probes, labels and selectors, and that every path the
configs name is actually mounted from a ConfigMap or Secret key that exists.
Usage: check_manifests.py DIR [OUT_DIR]; with OUT_DIR, writes the configs
found in the ConfigMap there (for the binary parse check)."""
import os
import sys
import tomllib

import yaml

d = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else None
errors = []


def need(cond, msg):
    if not cond:
        errors.append(msg)


expected_files = {"namespace.yaml", "statefulset-sled.yaml", "deployment-postgres.yaml",
                  "service.yaml", "networkpolicy.yaml", "configmap.yaml", "secret-example.yaml"}
files = {f for f in os.listdir(d) if f.endswith(".yaml") and not f.startswith(".")}
need(expected_files <= files, f"missing manifests: {sorted(expected_files - files)}")

objs = {}
for f in sorted(files):
    with open(os.path.join(d, f), encoding="utf-8") as fh:
        for doc in yaml.safe_load_all(fh):
            if doc is None:
                continue
            for k in ("apiVersion", "kind", "metadata"):
                need(k in doc, f"{f}: a document has no {k}")
            md = doc.get("metadata", {})
            need("name" in md, f"{f}: {doc.get('kind')} has no metadata.name")
            if doc.get("kind") != "Namespace":
                need(md.get("namespace") == "cardvault",
                     f"{f}: {doc.get('kind')}/{md.get('name')} is not in namespace cardvault")
            objs[(doc["kind"], md["name"], f)] = doc


def get(kind, name=None, f=None):
    return [o for (k, n, ff), o in objs.items()
            if k == kind and (name is None or n == name) and (f is None or ff == f)]


ns = get("Namespace", "cardvault")
need(len(ns) == 1 and ns[0]["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted",
     "namespace cardvault must enforce the restricted Pod Security Standard")

cms = get("ConfigMap", "cardvault-config")
need(len(cms) == 1, "ConfigMap cardvault-config missing")
cm = cms[0]["data"] if cms else {}
for key in ("cardvault.toml", "policy.toml", "cardvault-postgres.toml"):
    need(key in cm, f"ConfigMap has no {key}")
secrets = {o["metadata"]["name"]: o for o in get("Secret")}
for name, s in secrets.items():
    vals = list((s.get("stringData") or {}).values())
    need(vals and all("REPLACE_ME" in v for v in vals),
         f"Secret {name}: every example value must be a REPLACE_ME placeholder")

svc = get("Service", "cardvault")
need(len(svc) == 1, "Service cardvault missing")
svc = svc[0] if svc else {"spec": {}}
need(svc["spec"].get("type", "ClusterIP") == "ClusterIP", "Service must be ClusterIP")
need([p["port"] for p in svc["spec"].get("ports", [])] == [7443], "Service must expose port 7443 only")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


mpol = get("NetworkPolicy", "cardvault-metrics")
need(len(mpol) == 1, "NetworkPolicy cardvault-metrics missing")
if mpol:
    need(mpol[0]["spec"].get("policyTypes") == ["Ingress"], "cardvault-metrics must be ingress-only")
    need([p.get("port") for r in mpol[0]["spec"].get("ingress", []) for p in r.get("ports", [])] == [9464],
         "cardvault-metrics must admit the metrics port 9464 only")
npol = get("NetworkPolicy", "cardvault")
need(len(npol) == 1, "NetworkPolicy cardvault missing")
npol = npol[0]["spec"] if npol else {}
need(sorted(npol.get("policyTypes", [])) == ["Egress", "Ingress"], "NetworkPolicy must restrict ingress and egress")
ing_labels = []
for rule in npol.get("ingress", []):
    need([p.get("port") for p in rule.get("ports", [])] == [7443], "ingress must allow port 7443 only")
    for peer in rule.get("from", []):
        ing_labels.append(peer.get("podSelector", {}).get("matchLabels", {}))
need(sorted(map(str, ing_labels)) == sorted(map(str, [{"app.kubernetes.io/part-of": "payments-app-tier"},
                                                      {"cardvault-client": "processor"}])),
     f"ingress peers must be the merchant app tier and processors, got {ing_labels}")
eg_ports = sorted({p["port"] for r in npol.get("egress", []) for p in r.get("ports", [])})
need(eg_ports == [53, 5432], f"egress must be DNS and PostgreSQL only, got ports {eg_ports}")
need(all(r.get("ports") for r in npol.get("egress", [])), "every egress rule must name ports")

configs = {}
workloads = get("StatefulSet") + get("Deployment")
need(len(get("StatefulSet")) == 1 and len(get("Deployment")) == 1, "expected one StatefulSet and one Deployment")
for w in workloads:
    kind, name = w["kind"], w["metadata"]["name"]
    where = f"{kind}/{name}"
    spec = w["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    need(matches(spec["selector"]["matchLabels"], labels), f"{where}: selector does not match its pod labels")
    need(matches(svc["spec"].get("selector", {}), labels), f"{where}: Service selector does not match its pods")
    need(matches(npol.get("podSelector", {}).get("matchLabels", {}), labels),
         f"{where}: NetworkPolicy does not select its pods")
    if kind == "StatefulSet":
        need(spec.get("replicas") == 1, f"{where}: sled allows exactly one replica")
        need(get("Service", spec.get("serviceName")), f"{where}: serviceName has no Service")
        need([c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])] == ["data"],
             f"{where}: needs volumeClaimTemplate 'data'")
    else:
        need(spec.get("replicas") == 3, f"{where}: expected 3 replicas")
    psc = pod.get("securityContext", {})
    need(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
    need(psc.get("runAsUser") == 10001, f"{where}: pod runAsUser 10001 (the image's user)")
    need(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: pod seccomp RuntimeDefault")
    need(pod.get("automountServiceAccountToken") is False, f"{where}: no service account token")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    vct = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    for c in pod["containers"]:
        cw = f"{where}/{c['name']}"
        sc = c.get("securityContext", {})
        need(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
        need(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation false")
        need(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: capabilities drop ALL")
        need(not sc.get("capabilities", {}).get("add"), f"{cw}: no added capabilities")
        need(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{cw}: seccomp RuntimeDefault")
        need("resources" in c and "limits" in c["resources"], f"{cw}: resource limits")
        res = c.get("resources", {})
        # Guaranteed QoS: the kubelet keeps the pod out of swap.
        need(res.get("requests") == res.get("limits") and {"cpu", "memory"} <= set(res.get("limits", {})),
             f"{cw}: requests must equal limits for cpu and memory (Guaranteed QoS: never swapped)")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        need(ports.get("grpc-tls") == 7443, f"{cw}: container port grpc-tls 7443")
        need(set(ports.values()) <= {7443, 9464}, f"{cw}: only ports 7443 and 9464 (metrics): {ports}")
        for sp in svc["spec"].get("ports", []):
            need(sp["targetPort"] in ports or sp["targetPort"] == 7443, f"{cw}: Service targetPort not a container port")
        for probe in ("startupProbe", "livenessProbe"):
            p = c.get(probe)
            need(p is not None, f"{cw}: no {probe}")
            if p:
                need("tcpSocket" in p and "grpc" not in p,
                     f"{cw}: {probe} must be tcpSocket (the port requires a client certificate; a sealed vault is alive)")
        probe_files = []
        rp = c.get("readinessProbe") or {}
        cmd = rp.get("exec", {}).get("command", [])
        need(cmd[:1] == ["/usr/local/bin/cardvault"] and "health" in cmd
             and "--service=cardvault.v1.TokenService" in cmd,
             f"{cw}: readinessProbe must exec `cardvault health --service=cardvault.v1.TokenService`")
        for flag in ("--ca=", "--cert=", "--key="):
            paths = [a[len(flag):] for a in cmd if a.startswith(flag)]
            need(len(paths) == 1, f"{cw}: readinessProbe needs {flag}PATH")
            if paths:
                probe_files.append((cw, paths[0]))
        # Resolve every mounted file: mount path + item path -> (source kind, name, key).
        mounted = {}
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        need("/var/lib/cardvault" in mounts, f"{cw}: /var/lib/cardvault not mounted")
        for mp, m in mounts.items():
            v = vols.get(m["name"])
            if v is None:
                need(m["name"] in vct, f"{cw}: mount {m['name']} has no volume")
                continue
            if mp != "/var/lib/cardvault":
                need(m.get("readOnly") is True, f"{cw}: {mp} must be mounted readOnly")
            if "configMap" in v:
                src = get("ConfigMap", v["configMap"]["name"])
                need(src, f"{cw}: ConfigMap {v['configMap']['name']} not defined")
                data = src[0]["data"] if src else {}
                items = v["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    need(it["key"] in data, f"{cw}: ConfigMap has no key {it['key']}")
                    mounted[f"{mp}/{it['path']}"] = data.get(it["key"], "")
            elif "secret" in v:
                src = secrets.get(v["secret"]["secretName"])
                need(src is not None, f"{cw}: Secret {v['secret']['secretName']} not defined")
                data = (src or {}).get("stringData", {})
                items = v["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    mounted[f"{mp}/{it['path']}"] = data.get(it["key"], "")
        args = c.get("args", [])
        need(args[:2] == ["serve", "--config"], f"{cw}: args must be serve --config FILE")
        cfg_path = args[2] if len(args) > 2 else ""
        need(cfg_path in mounted, f"{cw}: config {cfg_path} is not a mounted file")
        text = mounted.get(cfg_path, "")
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            errors.append(f"{cw}: config is not TOML: {e}")
            continue
        for p in [cfg.get("policy")] + [cfg.get("tls", {}).get(k) for k in ("cert", "key", "client_ca")]:
            need(p in mounted, f"{cw}: config names {p}, which is not mounted")
        for pw, p in probe_files:
            need(p in mounted, f"{pw}: readiness probe names {p}, which is not mounted")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                sec = secrets.get(ref["name"])
                need(sec is not None and ref["key"] in sec.get("stringData", {}),
                     f"{cw}: env {e['name']} refers to missing Secret key {ref['name']}/{ref['key']}")
                env[e["name"]] = "<secret>"
        kek = env.get("CARDVAULT_KEK_FILE") or cfg.get("keys", {}).get("kek_file")
        if kek:
            need(kek in mounted, f"{cw}: KEK file {kek} is not mounted")
        store = cfg.get("store", {})
        backend = store.get("backend", "sled")
        if kind == "StatefulSet":
            need(backend == "sled", f"{cw}: the StatefulSet is the sled deployment, store.backend is {backend}")
        else:
            need(backend == "postgres", f"{cw}: the Deployment is the PostgreSQL one, store.backend is {backend}")
            need("url" in store or "CARDVAULT_STORE_URL" in env, f"{cw}: no store.url / CARDVAULT_STORE_URL")
            need("url" not in store, f"{cw}: keep the connection string (credentials) in a Secret, not the ConfigMap")
            need(env.get("CARDVAULT_STORE_URL") == "<secret>", f"{cw}: CARDVAULT_STORE_URL must come from a Secret")
        if store.get("tls_ca"):
            need(store["tls_ca"] in mounted, f"{cw}: store.tls_ca {store['tls_ca']} is not mounted")
        need(cfg.get("data_dir") == "/var/lib/cardvault", f"{cw}: data_dir must be the mounted volume")
        need(str(cfg.get("listen", "")).endswith(":7443"), f"{cw}: listen must be on 7443")
        mlisten = str(cfg.get("metrics", {}).get("listen", ""))
        if mlisten:
            need(mlisten.endswith(":9464") and ports.get("metrics") == 9464,
                 f"{cw}: metrics.listen {mlisten} must match the container port 'metrics' 9464")
            ann = spec["template"]["metadata"].get("annotations", {})
            need(ann.get("prometheus.io/port") == "9464", f"{cw}: prometheus.io/port annotation")
        configs[f"{kind.lower()}-{name}"] = (text, mounted.get(cfg.get("policy"), ""), bool(kek), backend,
                                             bool(store.get("tls_ca")))

for e in errors:
    print("manifests:", e)
if errors:
    sys.exit(1)
if out:
    for tag, (text, policy, kek, backend, tls_ca) in configs.items():
        with open(os.path.join(out, f"{tag}.toml"), "w", encoding="utf-8") as fh:
            fh.write(text)
        with open(os.path.join(out, f"{tag}.policy.toml"), "w", encoding="utf-8") as fh:
            fh.write(policy)
        with open(os.path.join(out, f"{tag}.env"), "w", encoding="utf-8") as fh:
            fh.write(f"kek={'yes' if kek else 'no'} backend={backend} tls_ca={'yes' if tls_ca else 'no'}\n")
print(f"manifests: {len(objs)} objects in {len(files)} files; workloads: "
      + ", ".join(sorted(configs)) + ": ok")
