//! The operator CLI for scripts: `--json` output that parses, the same operations as the
//! admin API (tenants, plans, prices, keys with rotation, usage series and leader boards,
//! admin tokens the admin API accepts), and one-line errors with exit status 1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::process::Command;

use e2e_tests::{binary, TempSqlite};
use gateway::tenants::TenantStore;
use serde_json::Value;

fn gateway(db: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("gateway"))
        .args(args)
        .env("DATABASE_URL", db)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(db: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = gateway(db, &all);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
}

#[test]
fn cli_json_and_errors() {
    let store = TempSqlite::new();
    let db = store.url.as_str();
    let plan = json(
        db,
        &[
            "create-plan",
            "--name",
            "starter",
            "--rpm",
            "60",
            "--monthly-spend",
            "500",
        ],
    );
    assert_eq!(plan["limits"]["requests_per_minute"], 60);
    let made = json(db, &["create-key", "--tenant", "acme", "--name", "ci"]);
    let key = made["key"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-gw-") && key.contains(&id));
    let on_plan = json(db, &["set-plan", "--tenant", "acme", "--plan", "starter"]);
    assert_eq!(on_plan["plan_name"], "starter");
    let tenants = json(db, &["list-tenants"]);
    assert_eq!(tenants[0]["name"], "acme");
    let plans = json(db, &["list-plans"]);
    assert_eq!(plans[0]["name"], "starter");
    json(
        db,
        &[
            "add-price",
            "--model",
            "m",
            "--input-per-mtok",
            "10",
            "--output-per-mtok",
            "20",
            "--effective-from",
            "0",
        ],
    );
    json(
        db,
        &[
            "add-price",
            "--model",
            "t",
            "--input-per-mtok",
            "10",
            "--output-per-mtok",
            "20",
            "--tier",
            "1000:5:10",
            "--tier",
            "5000:1:2",
        ],
    );
    let prices = json(db, &["list-prices"]);
    assert_eq!(prices[0]["output_minor_per_mtok"], 20);
    assert_eq!(prices[1]["tiers"][1]["from_tokens"], 5000);

    // Keys: listed without secrets, rotated (new key shown once), old one revoked.
    let keys = json(db, &["list-keys", "--tenant", "acme"]);
    assert_eq!(keys[0]["id"], id.as_str());
    assert!(!keys.to_string().contains(&key[22..]));
    let rotated = json(db, &["rotate-key", "--id", &id]);
    assert_ne!(rotated["id"], id.as_str());
    let keys = json(db, &["list-keys", "--tenant", "acme"]);
    let old = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert!(old["revoked_at"].is_i64());

    // Batches: a tenant's, and everyone's, with their progress.
    assert_eq!(json(db, &["list-batches"]), Value::Array(vec![]));
    let batch = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = gateway::batches::BatchStore::new(billing::Db::connect(db).await.unwrap());
        let line = r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}"#;
        let lines = gateway::batches::parse_file(line.as_bytes()).unwrap();
        let tenant = TenantStore::new(billing::Db::connect(db).await.unwrap())
            .tenant_by_name("acme")
            .await
            .unwrap()
            .unwrap();
        store.create_file("file-cli", &tenant.id, "batch", "b.jsonl", line, 1).await.unwrap();
        let owner = gateway::batches::store::Owner {
            tenant_id: tenant.id,
            key_id: id.clone(),
            endpoint: "/v1/embeddings",
        };
        store.create_batch("batch_cli", &owner, "file-cli", None, &lines).await.unwrap()
    });
    let listed = json(db, &["list-batches", "--tenant", "acme"]);
    assert_eq!(listed[0]["id"], batch.id.as_str());
    assert_eq!(listed[0]["status"], "in_progress");
    assert_eq!(listed[0]["request_counts"]["total"], 1);
    assert_eq!(json(db, &["list-batches"]).as_array().unwrap().len(), 1);
    let (code, out, _) = gateway(db, &["list-batches"]);
    assert!(
        code == 0 && out.contains("batch_cli") && out.contains("0/1 (0 failed)"),
        "{out}"
    );

    // Usage: empty but well-formed.
    assert_eq!(
        json(db, &["usage", "--tenant", "acme", "--bucket", "hour"]),
        Value::Array(vec![])
    );
    assert_eq!(json(db, &["top", "--by", "model"]), Value::Array(vec![]));

    // Admin tokens from the CLI verify with the same secret.
    let secret = "cli-test-secret-0123456789-abcdefghijklmnop";
    let token = json(
        db,
        &[
            "admin-token",
            "--role",
            "finance",
            "--admin-jwt-secret",
            secret,
        ],
    );
    let claims = gateway::admin::TokenAuthority::new(&gateway::admin::Secret::new(secret).unwrap())
        .verify(token["token"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims.role, gateway::admin::Role::Finance);
    assert_eq!(token["jti"].as_str(), Some(claims.jti.as_str()));
    // Revoked by jti into the store every gateway looks revocations up in.
    let revoked = json(db, &["revoke-admin-token", "--jti", &claims.jti]);
    assert_eq!(
        (revoked["jti"].as_str(), revoked["revoked_by"].as_str()),
        (Some(claims.jti.as_str()), Some("cli"))
    );
    let in_store = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = billing::Db::connect(db).await.unwrap();
        gateway::admin::revocation::is_revoked(&store, &claims.jti)
            .await
            .unwrap()
    });
    assert!(in_store);
    // No token outlives the maximum lifetime, whoever asks.
    let (code, _, stderr) = gateway(
        db,
        &[
            "admin-token",
            "--role",
            "admin",
            "--ttl-secs",
            "86401",
            "--admin-jwt-secret",
            secret,
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("at most 86400 seconds"), "{stderr}");

    // Errors: one line on stderr, exit status 1, nothing on stdout.
    for (args, message) in [
        (
            vec!["list-keys", "--tenant", "nobody"],
            "no tenant named nobody",
        ),
        (vec!["rotate-key", "--id", "nope"], "no key with id nope"),
        (
            vec!["create-plan", "--name", "starter"],
            "a plan named starter exists",
        ),
        (
            vec!["create-plan", "--name", "bad", "--rpm", "0"],
            "requests_per_minute must be at least 1",
        ),
        (
            vec!["usage", "--from", "10", "--to", "5"],
            "--from must be before --to",
        ),
        (
            vec![
                "admin-token",
                "--role",
                "admin",
                "--admin-jwt-secret",
                "short",
            ],
            "at least 32 bytes",
        ),
    ] {
        let mut all = vec!["--json"];
        all.extend_from_slice(&args);
        let (code, stdout, stderr) = gateway(db, &all);
        assert_eq!(
            code,
            if args[0] == "admin-token" { 2 } else { 1 },
            "{args:?}: {stderr}"
        );
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        if code == 1 {
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
            assert!(stderr.starts_with("error: "), "{stderr}");
        }
    }
}
