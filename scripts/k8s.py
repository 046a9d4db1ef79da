#!/usr/bin/env python3
"""The Kubernetes manifests of deploy/k8s, checked without a cluster; and their alert rules.

    python3 scripts/k8s.py check --gateway target/debug/gateway --worker target/debug/inference-worker
    python3 scripts/k8s.py rules     # rewrite monitoring/prometheusrule.yaml from alerts.yml

`check` renders every overlay with `kubectl kustomize` and then, for each:
  - validates every object against the Kubernetes schemas of the oldest and the newest
    version we support (`kubernetes-validate --strict`; the Prometheus Operator's kinds,
    which it has no schema for, are checked below instead);
  - every environment variable a container gets (its `env` and the ConfigMaps of its
    `envFrom`) is one its binary's `--help` lists for the command it runs;
  - every Service, PodDisruptionBudget, HPA, ServiceMonitor and PodMonitor selects or
    names a workload that exists, and every port they (and probes) name is a container's;
  - containers run as non-root with a read-only root filesystem and no capabilities;
  - a gateway's grace period outlasts its pause before SIGTERM plus its shutdown grace;
  - the PrometheusRule's groups are deploy/prometheus/alerts.yml's, and `promtool check
    rules` accepts them.
Prints one line per overlay; exits 1 on the first failure, saying what and where.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE = K8S / "monitoring" / "prometheusrule.yaml"
OVERLAYS = ["single-node", "production"]
# The oldest Kubernetes we support (the first with the preStop `sleep` action on by
# default) and the newest the schemas know.
VERSIONS = ["1.30.0", "1.37.0"]
OPERATOR_GROUP = "monitoring.coreos.com/"


class Bad(Exception):
    pass


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise Bad(f"kustomize: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def name(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def validate_schemas(objs):
    import kubernetes_validate
    for version in VERSIONS:
        for obj in objs:
            if obj["apiVersion"].startswith(OPERATOR_GROUP):
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise Bad(f"{name(obj)} against Kubernetes {version}: {e.message} at "
                          f"{'.'.join(str(p) for p in e.path)}")


def pod_specs(objs):
    """(workload, its pod template's labels, its pod spec) for each workload."""
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            template = obj["spec"]["template"]
            yield obj, template["metadata"].get("labels", {}), template["spec"]


def selects(selector, labels):
    wanted = selector.get("matchLabels", selector) if selector else {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def help_envs(binary, command):
    args = [binary] + ([command] if command else []) + ["--help"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)", out))


def check_envs(objs, gateway, worker):
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    known = {}
    for workload, _, spec in pod_specs(objs):
        for c in spec["containers"]:
            image = c["image"].split("/")[-1].split(":")[0]
            binary = {"gateway": gateway, "inference-worker": worker}.get(image)
            if binary is None:
                raise Bad(f"{name(workload)}: unknown image {c['image']}")
            command = (c.get("args") or [None])[0] if image == "gateway" else None
            key = (binary, command)
            if key not in known:
                known[key] = help_envs(binary, command)
            names = [e["name"] for e in c.get("env", [])]
            for source in c.get("envFrom", []):
                ref = source["configMapRef"]["name"]
                if ref not in configmaps:
                    raise Bad(f"{name(workload)}: envFrom names ConfigMap {ref}, which is not rendered")
                names += list(configmaps[ref])
            for n in names:
                if n not in known[key]:
                    raise Bad(f"{name(workload)} sets {n}, which `{Path(binary).name} "
                              f"{command or ''} --help` does not list")


def container_ports(spec):
    return {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}


def check_wiring(objs):
    workloads = list(pod_specs(objs))
    by_kind_name = {(o["kind"], o["metadata"]["name"]) for o in objs}
    services = [o for o in objs if o["kind"] == "Service"]
    for workload, _, spec in workloads:
        ports = container_ports(spec)
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    raise Bad(f"{name(workload)}: {probe} names port {port}, which no container has")
    for svc in services:
        matched = [(w, spec) for w, labels, spec in workloads if selects(svc["spec"]["selector"], labels)]
        if not matched:
            raise Bad(f"{name(svc)} selects no pods")
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for w, spec in matched:
                ports = container_ports(spec)
                if (isinstance(target, str) and target not in ports) or \
                        (isinstance(target, int) and target not in ports.values()):
                    raise Bad(f"{name(svc)}: port {target} is not a port of {name(w)}")
    for obj in objs:
        kind = obj["kind"]
        if kind == "PodDisruptionBudget":
            if not any(selects(obj["spec"]["selector"], labels) for _, labels, _ in workloads):
                raise Bad(f"{name(obj)} selects no pods")
        elif kind == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            if (ref["kind"], ref["name"]) not in by_kind_name:
                raise Bad(f"{name(obj)} scales {ref['kind']}/{ref['name']}, which is not rendered")
        elif kind == "ServiceMonitor":
            svcs = [s for s in services if selects(obj["spec"]["selector"], s["metadata"].get("labels", {}))]
            if not svcs:
                raise Bad(f"{name(obj)} selects no Service (by the Service's own labels)")
            for e in obj["spec"]["endpoints"]:
                if not any(e["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in svcs):
                    raise Bad(f"{name(obj)}: no selected Service has a port named {e['port']}")
        elif kind == "PodMonitor":
            pods = [spec for _, labels, spec in workloads if selects(obj["spec"]["selector"], labels)]
            if not pods:
                raise Bad(f"{name(obj)} selects no pods")
            for e in obj["spec"]["podMetricsEndpoints"]:
                if not all(e["port"] in container_ports(spec) for spec in pods):
                    raise Bad(f"{name(obj)}: port {e['port']} is not every selected pod's")
        elif kind == "StatefulSet":
            service = obj["spec"]["serviceName"]
            if ("Service", service) not in by_kind_name:
                raise Bad(f"{name(obj)}: its serviceName {service} is not rendered")


def check_security(objs):
    for workload, _, spec in pod_specs(objs):
        pod = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            raise Bad(f"{name(workload)} mounts a service account token it never uses")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            where = f"{name(workload)} container {c['name']}"
            if not (sc.get("runAsNonRoot", pod.get("runAsNonRoot")) and
                    sc.get("runAsUser", pod.get("runAsUser", 0)) != 0):
                raise Bad(f"{where} may run as root")
            if sc.get("readOnlyRootFilesystem") is not True:
                raise Bad(f"{where} has a writable root filesystem")
            if sc.get("allowPrivilegeEscalation") is not False:
                raise Bad(f"{where} allows privilege escalation")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                raise Bad(f"{where} keeps capabilities")
            if "memory" not in c.get("resources", {}).get("limits", {}):
                raise Bad(f"{where} has no memory limit")


def check_grace(objs):
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for workload, _, spec in pod_specs(objs):
        if workload["kind"] != "StatefulSet":
            continue
        c = spec["containers"][0]
        env = {}
        for source in c.get("envFrom", []):
            env.update(configmaps[source["configMapRef"]["name"]])
        pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = int(env.get("GATEWAY_SHUTDOWN_GRACE", 30))
        period = spec.get("terminationGracePeriodSeconds", 30)
        if pause < 5:
            raise Bad(f"{name(workload)}: no pause before SIGTERM for endpoint removal to spread")
        if period <= pause + grace:
            raise Bad(f"{name(workload)}: terminationGracePeriodSeconds {period} does not outlast "
                      f"the {pause} s pause plus the {grace} s shutdown grace")


def check_rules(objs):
    rules = [o for o in objs if o["kind"] == "PrometheusRule"]
    alerts = yaml.safe_load(ALERTS.read_text())
    for rule in rules:
        if rule["spec"]["groups"] != alerts["groups"]:
            raise Bad(f"{name(rule)} differs from {ALERTS.relative_to(ROOT)}: run "
                      "`python3 scripts/k8s.py rules`")
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
            f.flush()
            out = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
            if out.returncode != 0:
                raise Bad(f"{name(rule)}: promtool: {out.stdout}{out.stderr}")
    return len(rules)


def check(args):
    for overlay in OVERLAYS:
        try:
            objs = render(overlay)
            validate_schemas(objs)
            check_envs(objs, args.gateway, args.worker)
            check_wiring(objs)
            check_security(objs)
            check_grace(objs)
            rules = check_rules(objs)
        except Bad as e:
            sys.exit(f"deploy/k8s/overlays/{overlay}: {e}")
        kinds = sorted({o["kind"] for o in objs})
        print(f"{overlay}: {len(objs)} objects valid on Kubernetes {' and '.join(VERSIONS)}; "
              f"{rules} alert rule sets; kinds {', '.join(kinds)}")


class _Block(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Block.add_representer(str, _str)


def rules(_args):
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "metering-gateway"}, "spec": {"groups": groups}}
    RULE.write_text("# deploy/prometheus/alerts.yml as a PrometheusRule; regenerate with\n"
                    "# `python3 scripts/k8s.py rules` after changing the alerts.\n"
                    + yaml.dump(doc, Dumper=_Block, sort_keys=False, width=200))
    print(f"wrote {RULE.relative_to(ROOT)}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("--gateway", required=True)
    c.add_argument("--worker", required=True)
    c.set_defaults(run=check)
    sub.add_parser("rules").set_defaults(run=rules)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
