//! SPEC §4: a revoked key is refused by every gateway replica sharing the database within
//! 1 s. Two gateway processes on one Postgres database; the key is revoked through the
//! store and both replicas are polled until they refuse it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::time::{Duration, Instant};

use billing::Db;
use e2e_tests::{GatewayProcess, TempPostgres, TempSqlite, WorkerProcess, EMBEDDING_MODEL};
use gateway::tenants::{NewKey, TenantStore};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn revocation_reaches_every_replica_within_a_second() {
    let worker = WorkerProcess::start().await;
    let pg = TempPostgres::new().await;
    let spools = TempSqlite::new();
    let db = Db::connect(&pg.url).await.unwrap();
    let tenants = TenantStore::new(db);
    let tenant = tenants.create_tenant("revoked").await.unwrap();
    let (key, record) = tenants
        .create_key(&tenant.id, &NewKey::default())
        .await
        .unwrap();
    let workers = vec![worker.url.clone()];
    let a = GatewayProcess::start(&pg.url, &spools.dir().join("a"), &workers).await;
    let b = GatewayProcess::start(&pg.url, &spools.dir().join("b"), &workers).await;
    let http = reqwest::Client::new();
    let call = |base: String| {
        let http = http.clone();
        let key = key.expose().to_owned();
        async move {
            http.post(format!("{base}/v1/embeddings"))
                .bearer_auth(key)
                .json(&json!({"model": EMBEDDING_MODEL, "input": "still allowed?"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // Both replicas accept the key (and now hold it in their caches).
    for replica in [&a, &b] {
        let mut status = call(replica.url.clone()).await;
        let started = Instant::now();
        while status == 503 && started.elapsed() < Duration::from_secs(10) {
            // The replica's first health check of the worker may still be under way.
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = call(replica.url.clone()).await;
        }
        assert_eq!(status, 200);
    }

    assert!(tenants.revoke_key(&record.id).await.unwrap());
    let revoked_at = Instant::now();
    let mut refused = [None, None];
    while refused.iter().any(Option::is_none) && revoked_at.elapsed() < Duration::from_secs(5) {
        for (i, replica) in [&a, &b].into_iter().enumerate() {
            if refused[i].is_none() && call(replica.url.clone()).await == 401 {
                refused[i] = Some(revoked_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "revocation reached replica A after {:?}, replica B after {:?}",
        refused[0], refused[1]
    );
    for (name, after) in ["A", "B"].into_iter().zip(refused) {
        let after = after
            .unwrap_or_else(|| panic!("replica {name} still accepts the revoked key after 5 s"));
        assert!(
            after <= Duration::from_secs(1),
            "replica {name} took {after:?}"
        );
    }
    drop(a);
    drop(b);
}
