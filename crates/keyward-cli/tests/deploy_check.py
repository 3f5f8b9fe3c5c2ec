"""Consistency checks of the deploy/ manifests that a schema cannot make.

Usage: deploy_check.py KEYWARD_BIN DEPLOY_DIR RENDERED_YAML

RENDERED_YAML is `kubectl kustomize DEPLOY_DIR`; the KMS plugin's static pod and encryption
configuration are read from DEPLOY_DIR/kms-plugin. Checked: every flag given to a keyward
container exists in that subcommand's --help; every path a flag names is on a mounted volume;
$(VAR) references are defined; selectors of workloads, Services, PodDisruptionBudgets and
NetworkPolicies match pod labels; named ports exist; namespaces, ServiceAccounts, Secrets and
ConfigMaps referenced exist or are listed in deploy/README.md for the operator to create; the
agent runs with hostPID; the apiserver's KMS endpoint is the plugin's socket; in-cluster
addresses name a real Service and port. Exits 1 listing every problem.
"""

import os
import re
import subprocess
import sys

import yaml

KEYWARD_IMAGE = "keyward"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

problems = []


def problem(msg):
    problems.append(msg)


def pod_specs(objs):
    """(owner, namespace, pod template metadata, pod spec) of every workload and pod."""
    for o in objs:
        kind, md = o.get("kind"), o.get("metadata", {})
        owner = f"{kind}/{md.get('name')}"
        if kind in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            t = o["spec"]["template"]
            yield owner, md.get("namespace"), t.get("metadata", {}), t["spec"], o
        elif kind == "Pod":
            yield owner, md.get("namespace"), md, o["spec"], o


def help_flags(binary, sub, cache={}):
    """The flags of `keyward SUB...` (SUB: a subcommand, or a space-separated path of them)."""
    if sub not in cache:
        out = subprocess.run([binary, *sub.split(), "--help"], capture_output=True, text=True)
        if out.returncode != 0:
            problem(f"`keyward {sub} --help` failed: is {sub!r} a subcommand? {out.stderr.strip()}")
            cache[sub] = set()
        else:
            cache[sub] = set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", out.stdout))
    return cache[sub]


def listed(readme, name):
    """Whether deploy/README.md names `name` exactly (not as part of a longer name)."""
    return re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", readme) is not None


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def main():
    binary, deploy, rendered = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(rendered) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    with open(os.path.join(deploy, "kms-plugin", "static-pod.yaml")) as f:
        static = [o for o in yaml.safe_load_all(f) if o]
    with open(os.path.join(deploy, "kms-plugin", "encryption-config.yaml")) as f:
        enc = yaml.safe_load(f)
    with open(os.path.join(deploy, "README.md")) as f:
        readme = f.read()
    examples = []
    for name in sorted(os.listdir(os.path.join(deploy, "examples"))):
        with open(os.path.join(deploy, "examples", name)) as f:
            examples += [o for o in yaml.safe_load_all(f) if o]
    everything = objs + static + examples

    defined = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in everything}
    namespaces = {n for (k, _, n) in defined if k == "Namespace"} | {"kube-system"}
    pods = list(pod_specs(everything))
    services = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs if o["kind"] == "Service"}

    for o in everything:
        ns = o["metadata"].get("namespace")
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding") and ns not in namespaces:
            problem(f"{o['kind']}/{o['metadata']['name']}: namespace {ns!r} is not defined")

    agent_dirs = set()
    workloads = []  # (container, namespace, host directory its KEYWARD_AGENT_SOCKET is on)
    ns_labels = {o["metadata"]["name"]: o["metadata"].get("labels", {}) for o in everything if o["kind"] == "Namespace"}
    for owner, ns, tmd, spec, obj in pods:
        labels = tmd.get("labels", {})
        sel = obj.get("spec", {}).get("selector", {}).get("matchLabels")
        if obj["kind"] not in ("Pod", "Job") and not matches(sel, labels):
            problem(f"{owner}: selector {sel} does not match its pod labels {labels}")
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", ns, sa) not in defined:
            problem(f"{owner}: ServiceAccount {ns}/{sa} is not defined")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for t in obj.get("spec", {}).get("volumeClaimTemplates", []):
            volumes[t["metadata"]["name"]] = {"persistentVolumeClaim": {}}
        for v in volumes.values():
            ref = v.get("secret", {}).get("secretName") or v.get("configMap", {}).get("name")
            kind = "Secret" if "secret" in v else "ConfigMap"
            if ref and (kind, ns, ref) not in defined and not listed(readme, ref):
                problem(f"{owner}: {kind} {ns}/{ref} is neither defined nor listed in deploy/README.md")
        automount = spec.get("automountServiceAccountToken", True)
        for c in spec.get("containers", []):
            cname = f"{owner} container {c['name']}"
            mounts = {}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problem(f"{cname}: volumeMount {m['name']!r} has no volume")
                mounts[m["mountPath"]] = m["name"]
            envs = {e["name"] for e in c.get("env", [])}
            sock = next((e.get("value") for e in c.get("env", []) if e["name"] == "KEYWARD_AGENT_SOCKET"), None)
            if sock:
                on = [m for m in mounts if sock.startswith(m.rstrip("/") + "/")]
                vol = volumes.get(mounts[max(on, key=len)]) if on else None
                workloads.append((cname, ns, (vol or {}).get("hostPath", {}).get("path")))
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
                if ref and ("Secret", ns, ref) not in defined and not listed(readme, ref):
                    problem(f"{cname}: Secret {ns}/{ref} is neither defined nor listed in deploy/README.md")
            port_names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in port_names:
                    problem(f"{cname}: {probe} names port {port!r}, which the container does not declare")
            if KEYWARD_IMAGE not in c.get("image", "").rsplit("/", 1)[-1]:
                continue
            if c["image"] == KEYWARD_IMAGE and obj in objs:
                problem(f"{cname}: image {KEYWARD_IMAGE!r} is not set: kustomization.yaml's images must name it")
            args = c.get("args", [])
            if not args:
                problem(f"{cname}: no subcommand")
                continue
            # Subcommands (and their positional arguments) come before the flags.
            lead = 0
            while lead < len(args) and not args[lead].startswith("--"):
                lead += 1
            sub, flags = args[0], help_flags(binary, " ".join(args[:lead]))
            values = {}
            for a in args[lead:]:
                if not a.startswith("--"):
                    problem(f"{cname}: argument {a!r} is not a --flag")
                    continue
                name, _, value = a.partition("=")
                if name not in flags:
                    problem(f"{cname}: `keyward {sub}` has no flag {name}")
                values[name] = value
                for var in re.findall(r"\$\((\w+)\)", value):
                    if var not in envs:
                        problem(f"{cname}: {a} uses $({var}), which is not in the container's env")
                path = value.split("://", 1)[-1] if value.startswith("unix://") else value
                if path.startswith("/"):
                    under = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
                    if not under and not (automount and path.startswith(SA_DIR + "/")):
                        problem(f"{cname}: {name} names {path}, which is on no mounted volume")
            for name, value in values.items():
                m = re.match(r"https://([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)$", value)
                if m:
                    svc = services.get((m.group(2), m.group(1)))
                    if not svc or int(m.group(3)) not in [p["port"] for p in svc["spec"]["ports"]]:
                        problem(f"{cname}: {name}={value} is no Service port in the bundle")
            listen = values.get("--listen", "")
            if sub == "server":
                port = int(listen.rsplit(":", 1)[-1]) if listen else 8270
                if port not in [p["containerPort"] for p in c.get("ports", [])]:
                    problem(f"{cname}: listens on {port} but declares no such containerPort")
                if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/v1/health?ready=true":
                    problem(f"{cname}: the readiness probe must be /v1/health?ready=true (503 while sealed or stale)")
                if c.get("startupProbe", {}).get("httpGet", {}).get("path") != "/v1/health":
                    problem(f"{cname}: needs a startupProbe on /v1/health (alive once it answers, sealed or not)")
                audit = values.get("--audit-file", "/var/lib/keyward/audit.log")
                holders = [m for m in mounts if audit.startswith(m.rstrip("/") + "/")]
                vol = mounts[max(holders, key=len)] if holders else None
                if "persistentVolumeClaim" not in volumes.get(vol, {}):
                    problem(f"{cname}: the audit log {audit} must be on a persistent volume, not {volumes.get(vol)}")
            if sub == "agent":
                if not spec.get("hostPID"):
                    problem(f"{cname}: the agent needs hostPID to measure callers")
                sock = values.get("--socket", "/run/keyward/agent.sock")
                vol = mounts.get(os.path.dirname(sock))
                if not vol or "hostPath" not in volumes.get(vol, {}):
                    problem(f"{cname}: the socket directory of {sock} must be a hostPath volume workloads can mount")
                else:
                    agent_dirs.add(volumes[vol]["hostPath"]["path"])
            if sub == "kms-plugin":
                endpoints = [
                    p["kms"]["endpoint"]
                    for r in enc.get("resources", [])
                    for p in r.get("providers", [])
                    if "kms" in p
                ]
                if endpoints != [listen]:
                    problem(f"{cname}: listens on {listen} but the EncryptionConfiguration names {endpoints}")

    def selects(kind_name, ns, selector):
        if not any(matches(selector, tmd.get("labels", {})) for _, pns, tmd, _, _ in pods if pns == ns):
            problem(f"{kind_name}: selector {selector} matches no pod in {ns}")

    for o in objs:
        md, spec = o["metadata"], o.get("spec", {})
        name = f"{o['kind']}/{md['name']}"
        if o["kind"] == "Service":
            selects(name, md["namespace"], spec.get("selector"))
            for p in spec.get("ports", []):
                tp = p.get("targetPort")
                if isinstance(tp, str) and not any(
                    tp in {cp.get("name") for c in s.get("containers", []) for cp in c.get("ports", [])}
                    for _, pns, tmd, s, _ in pods
                    if pns == md["namespace"] and matches(spec.get("selector"), tmd.get("labels", {}))
                ):
                    problem(f"{name}: targetPort {tp!r} is no named port of the selected pods")
        if o["kind"] == "PodDisruptionBudget":
            selects(name, md["namespace"], spec.get("selector", {}).get("matchLabels"))
        if o["kind"] == "NetworkPolicy":
            selects(name, md["namespace"], spec.get("podSelector", {}).get("matchLabels"))
        if o["kind"] == "ClusterRoleBinding":
            for s in o.get("subjects", []):
                if s["kind"] == "ServiceAccount" and ("ServiceAccount", s["namespace"], s["name"]) not in defined:
                    problem(f"{name}: subject ServiceAccount {s['namespace']}/{s['name']} is not defined")
            if ("ClusterRole", None, o["roleRef"]["name"]) not in defined:
                problem(f"{name}: ClusterRole {o['roleRef']['name']} is not defined")

    if enc.get("kind") != "EncryptionConfiguration" or enc.get("apiVersion") != "apiserver.config.k8s.io/v1":
        problem("kms-plugin/encryption-config.yaml is not an apiserver.config.k8s.io/v1 EncryptionConfiguration")
    for r in enc.get("resources", []):
        for p in r.get("providers", []):
            if "kms" in p and (p["kms"].get("apiVersion") != "v2" or ":" in p["kms"].get("name", ":")):
                problem("the KMS provider must be apiVersion v2 with a name without ':'")

    for cname, ns, host_dir in workloads:
        if host_dir not in agent_dirs:
            problem(f"{cname}: KEYWARD_AGENT_SOCKET is not on the agent's socket directory {sorted(agent_dirs)} ({host_dir})")
        if ns_labels.get(ns, {}).get("pod-security.kubernetes.io/enforce") != "privileged":
            problem(f"{cname}: its namespace {ns} must allow privileged pods (hostPath): baseline forbids hostPath")

    kinds = sorted({o["kind"] for o in everything})
    for need in ("PodDisruptionBudget", "DaemonSet", "StatefulSet", "Service", "Pod"):
        if need not in kinds:
            problem(f"the bundle has no {need}")
    if problems:
        for p in problems:
            print("PROBLEM:", p)
        sys.exit(1)
    print(f"checked {len(everything)} objects ({', '.join(kinds)}) and {len(pods)} pod specs")


main()
