//! `deploy/`: the Prometheus configuration and alert rules load in `promtool`; the Grafana
//! dashboard is well-formed, every query in it is valid PromQL (checked by `promtool` as
//! recording rules), uses the provisioned data source, and names only series the gateway
//! and the workers export; the Kubernetes manifests render and validate without a cluster;
//! the Containerfiles pass hadolint.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{gateway_config, scrape, workspace_root, RunningGateway, TempSqlite};
use gateway::tenants::NewKey;
use serde_json::Value;

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool not found: install it (Debian: apt-get install prometheus)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn deploy(path: &str) -> std::path::PathBuf {
    workspace_root().join("deploy").join(path)
}

#[test]
fn prometheus_config_and_alerts_load() {
    // `check config` also loads the rule files it names.
    promtool(&[
        "check",
        "config",
        deploy("prometheus/prometheus.yml").to_str().unwrap(),
    ]);
    promtool(&[
        "check",
        "rules",
        deploy("prometheus/alerts.yml").to_str().unwrap(),
    ]);
}

/// Every `expr` of the dashboard, Grafana's variables replaced by sample values.
fn dashboard_queries(dash: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push(
                t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "1h"),
            );
        }
    }
    out
}

fn check_structure(dash: &Value, datasource_uid: &str) {
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_i64().unwrap() >= 36);
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "a dashboard worth the name");
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_i64().unwrap();
        assert!(ids.insert(id), "panel id {id} twice");
        let kind = p["type"].as_str().unwrap();
        assert!(
            ["row", "timeseries", "stat", "bargauge", "gauge", "table"].contains(&kind),
            "panel type {kind}"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_i64().unwrap(), g["w"].as_i64().unwrap());
        assert!(x >= 0 && w > 0 && x + w <= 24, "panel {id} off the grid");
        assert!(g["h"].as_i64().unwrap() > 0 && g["y"].as_i64().unwrap() >= 0);
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], datasource_uid, "panel {id}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {id} has no query");
        let refs: BTreeSet<&str> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "panel {id}: refIds repeat");
    }
}

/// Names of series a query reads (histogram suffixes removed).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts_name = (rest.starts_with("gateway_") || rest.starts_with("worker_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts_name {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_is_valid_and_uses_real_series() {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/metering-gateway.json")).unwrap(),
    )
    .unwrap();
    let datasources =
        std::fs::read_to_string(deploy("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(datasources.contains("uid: prometheus"));
    check_structure(&dash, "prometheus");

    // PromQL syntax: promtool parses each query as a recording rule.
    let queries = dashboard_queries(&dash);
    let dir = std::env::temp_dir().join(format!("gw-dash-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(q).unwrap()
        ));
    }
    let rules_path = dir.join("dashboard-rules.yml");
    std::fs::write(&rules_path, rules).unwrap();
    promtool(&["check", "rules", rules_path.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);

    // Every series named exists: the gateway's in a live scrape after traffic, the
    // workers' in the worker's metric definitions.
    let store = TempSqlite::new();
    let stub = StubWorker::start().await;
    let gw =
        RunningGateway::start(gateway_config(&store.url, std::slice::from_ref(&stub.url))).await;
    let (key, _) = gw.tenant_with_key("dash", NewKey::default()).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(
            &serde_json::json!({"model": STUB_CHAT_MODEL, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let live = scrape(&http, &gw.metrics_url).await;
    gw.stop().await;
    let worker_source =
        std::fs::read_to_string(workspace_root().join("inference-worker/src/metrics.rs")).unwrap();
    let gateway_source =
        std::fs::read_to_string(workspace_root().join("gateway/src/metrics.rs")).unwrap();
    let alerts = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let mut names = BTreeSet::new();
    for q in queries.iter().map(String::as_str).chain([alerts.as_str()]) {
        names.extend(metric_names(q));
    }
    assert!(names.len() >= 15, "{names:?}");
    let mut seen_live = 0;
    for name in &names {
        let quoted = format!("\"{name}\"");
        if name.starts_with("worker_") {
            assert!(
                worker_source.contains(&quoted),
                "{name} is not a worker series"
            );
        } else if live.contains(&format!("# TYPE {name} ")) {
            seen_live += 1;
        } else {
            // Labelled series appear once they have a value; they must still be defined.
            assert!(
                gateway_source.contains(&quoted),
                "{name} is not a gateway series"
            );
        }
    }
    assert!(seen_live >= 6, "only {seen_live} gateway series seen live");
    assert!(Path::new(&deploy("grafana/provisioning/dashboards/gateway.yml")).exists());
}

/// `deploy/k8s`: both overlays render, validate against the oldest and newest Kubernetes
/// schemas we support, set only environment variables the binaries know, wire ports and
/// selectors that exist, run locked down, and carry `prometheus/alerts.yml` as their rule
/// (all checked by `scripts/k8s.py`, which prints what it saw).
#[test]
fn kubernetes_manifests_render_and_validate() {
    let root = workspace_root();
    let python = root.join("target/sdk-venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make test` (it creates target/sdk-venv)",
        python.display()
    );
    let out = Command::new(python)
        .arg(root.join("scripts/k8s.py"))
        .arg("check")
        .arg("--gateway")
        .arg(e2e_tests::binary("gateway"))
        .arg("--worker")
        .arg(e2e_tests::binary("inference-worker"))
        .output()
        .expect("running scripts/k8s.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the manifests' check failed");
    for overlay in ["single-node", "production"] {
        assert!(
            stdout.contains(&format!("{overlay}: ")),
            "{overlay} not checked"
        );
    }
    assert!(stdout.contains("1 alert rule sets"), "{stdout}");
}

/// The Containerfiles pass hadolint (its default rules, every level).
#[test]
fn containerfiles_pass_hadolint() {
    let root = workspace_root();
    let hadolint = root.join("target/sdk-venv/bin/hadolint");
    assert!(
        hadolint.exists(),
        "{} missing: run `make test` (it installs it in target/sdk-venv)",
        hadolint.display()
    );
    let files: Vec<_> = ["gateway", "inference-worker"]
        .iter()
        .map(|b| root.join(format!("deploy/image/{b}.Containerfile")))
        .collect();
    let out = Command::new(hadolint)
        .args(&files)
        .output()
        .expect("running hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
