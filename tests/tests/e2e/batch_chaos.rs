//! SPEC §11 under `kill -9` and with replicas: a batch on Postgres shared by two gateway
//! processes runs every line exactly once (the worker answers as many embedding calls as
//! the batch has lines); a batch whose replicas are killed twice mid-run and restarted on
//! their spools ends with exactly one result and one usage record per line; a batch whose
//! tenant runs out of quota stops with every line marked, as does one past its completion
//! window; files past their retention go.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::HashSet;
use std::time::Duration;

use e2e_tests::{
    metric, wait_for, GatewayProcess, TempPostgres, TempSqlite, WorkerProcess, CHAT_MODEL,
    EMBEDDING_MODEL,
};
use gateway::tenants::{NewKey, TenantStore};
use serde_json::{json, Value};

/// Lines lapse 3 s after their replica dies, so the test need not wait a minute.
const FAST: &[&str] = &["--batch-lease-ms", "3000", "--batch-poll-ms", "50"];

struct Client {
    http: reqwest::Client,
    key: String,
}

impl Client {
    /// A file of `lines` embedding calls, or with `chat` chat calls (slower: a kill lands
    /// while some run).
    async fn upload(&self, base: &str, lines: usize, chat: bool) -> String {
        let file: String = (1..=lines)
            .map(|i| {
                let (url, body) = match chat {
                    false => ("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": format!("text number {i} of the batch")})),
                    true => ("/v1/chat/completions", json!({"model": CHAT_MODEL, "max_tokens": 12, "temperature": 0,
                        "messages": [{"role": "user", "content": format!("Say {i}.")}]})),
                };
                json!({"custom_id": format!("t{i}"), "method": "POST", "url": url, "body": body}).to_string() + "\n"
            })
            .collect();
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::text(file).file_name("t.jsonl"),
            );
        let r = self
            .http
            .post(format!("{base}/v1/files"))
            .bearer_auth(&self.key)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn batch(&self, base: &str, file: &str, endpoint: &str) -> String {
        let r = self
            .http
            .post(format!("{base}/v1/batches"))
            .bearer_auth(&self.key)
            .json(&json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn get(&self, base: &str, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{base}{path}"))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
    }

    async fn status(&self, base: &str, batch: &str) -> Value {
        self.get(base, &format!("/v1/batches/{batch}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// A file's lines, parsed.
    async fn lines_of(&self, base: &str, file: &Value) -> Vec<Value> {
        let Some(id) = file.as_str() else {
            return Vec::new();
        };
        let text = self
            .get(base, &format!("/v1/files/{id}/content"))
            .await
            .text()
            .await
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the batch to end; its output lines.
    async fn finished(&self, base: &str, batch: &str, lines: usize) -> Vec<Value> {
        let done = wait_for("the batch to end", Duration::from_secs(240), || async {
            let b = self.status(base, batch).await;
            (b["status"] == "completed").then_some(b)
        })
        .await;
        assert_eq!(
            done["request_counts"],
            json!({"total": lines, "completed": lines, "failed": 0})
        );
        let out = done["output_file_id"].as_str().unwrap();
        let text = self
            .get(base, &format!("/v1/files/{out}/content"))
            .await
            .text()
            .await
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Every line once in the output, by `custom_id`, each a 200.
fn assert_once_each(out: &[Value], lines: usize) {
    let ids: HashSet<&str> = out
        .iter()
        .map(|o| o["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(out.len(), lines);
    assert_eq!(ids.len(), lines);
    for o in out {
        assert_eq!(o["response"]["status_code"], 200, "{o}");
        let prompt = o["response"]["body"]["usage"]["prompt_tokens"].as_i64();
        assert!(prompt.is_some_and(|p| p > 0), "{o}");
    }
}

/// The usage records of a batch's lines, once all `lines` have reached the store.
async fn usage_rows(db: &billing::Db, batch: &str, lines: usize) -> Vec<(String, i64)> {
    use sqlx::Row;
    wait_for(
        "every line's usage record",
        Duration::from_secs(30),
        || async {
            let rows = sqlx::query(
                "SELECT request_id, prompt_tokens FROM usage_records WHERE request_id LIKE $1",
            )
            .bind(format!("{batch}_req_%"))
            .fetch_all(db.pool())
            .await
            .unwrap();
            let rows: Vec<(String, i64)> = rows
                .iter()
                .map(|r| (r.get("request_id"), r.get("prompt_tokens")))
                .collect();
            (rows.len() == lines).then_some(rows)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_a_batch_and_kills_lose_or_repeat_no_line() {
    let store = TempPostgres::new().await;
    let db = billing::Db::connect(&store.url).await.unwrap();
    let tenants = TenantStore::new(db.clone());
    let t = tenants.create_tenant("batch-chaos").await.unwrap();
    let (key, _) = tenants.create_key(&t.id, &NewKey::default()).await.unwrap();
    let client = Client {
        http: reqwest::Client::new(),
        key: key.expose().to_owned(),
    };
    let worker = WorkerProcess::start().await;
    let workers = [worker.url.clone()];
    let (spool_a, spool_b) = (TempSqlite::new(), TempSqlite::new());
    let mut a = GatewayProcess::start_with(&store.url, spool_a.dir(), &workers, FAST).await;
    let b = GatewayProcess::start_with(&store.url, spool_b.dir(), &workers, FAST).await;
    let worker_metrics = format!("{}/metrics", worker.url);
    let served = |route: &'static str| {
        let (http, url) = (client.http.clone(), worker_metrics.clone());
        async move {
            let name = format!("worker_http_requests_total{{route=\"{route}\"");
            metric(&http, &url, &name).await
        }
    };

    // Two replicas, no faults: the worker answers exactly one call per line.
    const SHARED: usize = 80;
    let before = served("/v1/embeddings").await;
    let file = client.upload(&a.url, SHARED, false).await;
    let batch = client.batch(&b.url, &file, "/v1/embeddings").await;
    let out = client.finished(&a.url, &batch, SHARED).await;
    assert_once_each(&out, SHARED);
    assert_eq!(
        served("/v1/embeddings").await - before,
        SHARED as f64,
        "a line ran twice, or not at all"
    );
    let usage = usage_rows(&db, &batch, SHARED).await;
    assert!(usage.iter().all(|(_, prompt)| *prompt > 0));

    // Kill -9 one replica twice mid-batch of chats and start it again on its spool.
    const KILLED: usize = 60;
    let before = served("/v1/chat/completions").await;
    let file = client.upload(&b.url, KILLED, true).await;
    let batch = client.batch(&a.url, &file, "/v1/chat/completions").await;
    for round in 0..2 {
        let done = (round + 1) * KILLED as i64 / 4;
        wait_for(
            "lines to complete before the kill",
            Duration::from_secs(120),
            || async {
                let s = client.status(&b.url, &batch).await;
                (s["request_counts"]["completed"].as_i64().unwrap() >= done).then_some(())
            },
        )
        .await;
        a.kill();
        a = GatewayProcess::start_with(&store.url, spool_a.dir(), &workers, FAST).await;
    }
    let out = client.finished(&a.url, &batch, KILLED).await;
    assert_once_each(&out, KILLED);
    // One usage record per line, under its batch and line, whatever ran it (a line killed
    // mid-run runs again; its record is written once).
    let usage = usage_rows(&db, &batch, KILLED).await;
    let expected: HashSet<String> = (1..=KILLED).map(|i| format!("{batch}_req_{i}")).collect();
    let got: HashSet<String> = usage.into_iter().map(|(id, _)| id).collect();
    assert_eq!(got, expected);
    // Lines in flight at a kill ran again elsewhere: at least one call per line.
    let ran = served("/v1/chat/completions").await - before;
    println!("{KILLED} lines, {ran} chat calls across two kills");
    assert!(ran >= KILLED as f64);
    drop(b);
}

/// A tenant whose quota runs out mid-batch: the batch stops `failed` with the reason, the
/// lines that ran are in its output file and every other line is in its error file marked
/// `insufficient_quota`, none dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_quota_stops_with_its_lines_marked() {
    let stack = e2e_tests::Stack::start("batch-quota").await;
    let limits = gateway::limits::Limits {
        monthly_tokens: Some(60),
        ..Default::default()
    };
    let (key, _) = stack
        .gateway
        .tenant_with_key(
            "batch-quota-small",
            NewKey {
                limits,
                ..Default::default()
            },
        )
        .await;
    let client = Client {
        http: reqwest::Client::new(),
        key,
    };
    const LINES: usize = 20;
    let base = &stack.gateway.url;
    let file = client.upload(base, LINES, false).await;
    let batch = client.batch(base, &file, "/v1/embeddings").await;
    let ended = wait_for("the batch to stop", Duration::from_secs(60), || async {
        let b = client.status(base, &batch).await;
        (b["status"] == "failed").then_some(b)
    })
    .await;
    assert_eq!(
        ended["errors"]["data"][0]["code"], "insufficient_quota",
        "{ended}"
    );
    let counts = &ended["request_counts"];
    let (done, failed) = (
        counts["completed"].as_u64().unwrap(),
        counts["failed"].as_u64().unwrap(),
    );
    assert!(
        done >= 1 && failed >= 1 && done + failed == LINES as u64,
        "{counts}"
    );
    let out = client.lines_of(base, &ended["output_file_id"]).await;
    let errors = client.lines_of(base, &ended["error_file_id"]).await;
    assert_eq!(out.len() as u64, done);
    assert_eq!(errors.len() as u64, failed);
    assert!(
        errors
            .iter()
            .all(|e| e["error"]["code"] == "insufficient_quota"),
        "{errors:?}"
    );
    let mut ids: Vec<&str> = out
        .iter()
        .chain(&errors)
        .map(|o| o["custom_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), LINES);
}

/// A file past its retention is deleted by the replicas' sweep: its id is then a 404.
#[tokio::test(flavor = "multi_thread")]
async fn files_past_their_retention_are_deleted() {
    let stack = e2e_tests::Stack::start("batch-retention").await;
    let client = Client {
        http: reqwest::Client::new(),
        key: stack.key.clone(),
    };
    let base = &stack.gateway.url;
    let (old, kept) = (
        client.upload(base, 2, false).await,
        client.upload(base, 2, false).await,
    );
    sqlx::query("UPDATE files SET expires_at = 1 WHERE id = $1")
        .bind(&old)
        .execute(stack.gateway.db.pool())
        .await
        .unwrap();
    wait_for(
        "the expired file to go",
        Duration::from_secs(30),
        || async {
            let status = client.get(base, &format!("/v1/files/{old}")).await.status();
            (status == 404).then_some(())
        },
    )
    .await;
    assert_eq!(
        client
            .get(base, &format!("/v1/files/{kept}"))
            .await
            .status(),
        200
    );
}

/// A batch whose completion window ends while lines wait ends `expired`: the lines that ran
/// are in the output file and billed once; every other line is in the error file as
/// `batch_expired`, unbilled.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_past_its_window_expires_with_unrun_lines_marked() {
    let stack = e2e_tests::Stack::start("batch-expiry").await;
    let client = Client {
        http: reqwest::Client::new(),
        key: stack.key.clone(),
    };
    const LINES: usize = 40;
    let base = &stack.gateway.url;
    let file = client.upload(base, LINES, true).await;
    let batch = client.batch(base, &file, "/v1/chat/completions").await;
    // The window ends now: forty chat lines at two at a time cannot all have run.
    sqlx::query("UPDATE batches SET expires_at = 1 WHERE id = $1")
        .bind(&batch)
        .execute(stack.gateway.db.pool())
        .await
        .unwrap();
    let ended = wait_for("the batch to expire", Duration::from_secs(60), || async {
        let b = client.status(base, &batch).await;
        (b["status"] == "expired").then_some(b)
    })
    .await;
    assert!(ended["expired_at"].as_i64().is_some(), "{ended}");
    let out = client.lines_of(base, &ended["output_file_id"]).await;
    let errors = client.lines_of(base, &ended["error_file_id"]).await;
    let counts = &ended["request_counts"];
    assert_eq!(counts["total"], LINES as u64, "{counts}");
    assert_eq!(counts["completed"], out.len() as u64, "{counts}");
    assert_eq!(counts["failed"], errors.len() as u64, "{counts}");
    assert!(
        !errors.is_empty(),
        "some lines were left to expire: {counts}"
    );
    assert!(
        errors
            .iter()
            .all(|e| e["error"]["code"] == "batch_expired" && e["response"].is_null()),
        "{errors:?}"
    );
    assert!(out.iter().all(|o| o["response"]["status_code"] == 200));
    let mut ids: Vec<&str> = out
        .iter()
        .chain(&errors)
        .map(|o| o["custom_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), LINES);
    // Billed once per line that ran, never for one that expired.
    let billed = usage_rows(&stack.gateway.db, &batch, out.len()).await;
    assert_eq!(billed.len(), out.len());
}
