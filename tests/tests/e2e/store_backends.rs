//! The store behaves the same on SQLite (embedded) and Postgres (production).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use billing::{Db, Delivery, Ledger, UsageEvent};
use e2e_tests::{TempPostgres, TempSqlite};
use gateway::tenants::{NewKey, TenantStore};

fn event(request_id: &str, tenant: &str) -> UsageEvent {
    UsageEvent::builder(request_id, tenant)
        .tokens(17, 5)
        .at(1_700_000_000_000, 250)
        .build()
}

async fn ledger_is_idempotent(db: Db) {
    let ledger = Ledger::new(db);
    let e = event("req_1", "t1");
    assert!(ledger.record(&e).await.unwrap());
    // A replay with different numbers changes nothing: the first record stands.
    let mut replay = e.clone();
    replay.completion_tokens = 999;
    assert!(!ledger.record(&replay).await.unwrap());
    assert_eq!(ledger.get("req_1").await.unwrap(), Some(e.clone()));
    assert!(ledger.record(&event("req_2", "t2")).await.unwrap());
    assert_eq!(ledger.for_tenant("t1").await.unwrap(), vec![e]);
    assert_eq!(ledger.get("missing").await.unwrap(), None);
    let totals = ledger.totals_by_model("t1", 0, i64::MAX).await.unwrap();
    assert_eq!(
        totals,
        vec![billing::ModelTotals {
            model: "m".into(),
            requests: 1,
            prompt_tokens: 17,
            completion_tokens: 5,
            cached_tokens: 0,
            cache_hits: 0,
            batch_requests: 0,
            batch_prompt_tokens: 0,
            batch_completion_tokens: 0,
        }]
    );
    assert!(ledger.totals_by_model("t1", 0, 1).await.unwrap().is_empty());

    // One batch holding a request id twice (an `unknown` event and its resolution) is
    // written as one record with the resolved delivery.
    let mut pending = event("req_3", "t3");
    pending.delivery = Delivery::Unknown;
    let mut resolved = pending.clone();
    resolved.delivery = Delivery::Undelivered;
    ledger
        .record_batch(&[pending, resolved.clone()])
        .await
        .unwrap();
    assert_eq!(ledger.for_tenant("t3").await.unwrap(), vec![resolved]);
    // A later replay resolving nothing changes nothing.
    let mut replay = event("req_3", "t3");
    replay.delivery = Delivery::Unknown;
    ledger.record_batch(&[replay]).await.unwrap();
    assert_eq!(
        ledger.get("req_3").await.unwrap().unwrap().delivery,
        Delivery::Undelivered
    );

    // A later batch: new records beside the outcome of a stored in-flight one. The new
    // ones are inserted, the outcome resolves the stored delivery (its quantities stay
    // as first recorded), and a replay of the batch writes nothing.
    let mut in_flight = event("req_5", "t5");
    in_flight.delivery = Delivery::Unknown;
    assert!(ledger.record(&in_flight).await.unwrap());
    let mut outcome = in_flight.clone();
    outcome.delivery = Delivery::Delivered;
    outcome.prompt_tokens = 999;
    let batch = [event("req_6", "t5"), outcome, event("req_7", "t5")];
    assert_eq!(ledger.record_batch(&batch).await.unwrap(), 3);
    assert_eq!(ledger.record_batch(&batch).await.unwrap(), 0);
    let stored = ledger.get("req_5").await.unwrap().unwrap();
    assert_eq!(
        (stored.delivery, stored.prompt_tokens),
        (Delivery::Delivered, in_flight.prompt_tokens)
    );
    assert_eq!(ledger.for_tenant("t5").await.unwrap().len(), 3);

    // A batch of every SQLite statement size (1,000 + 2 x 100 + 3 x 10 rows + 4 left over).
    let many: Vec<UsageEvent> = (0..1234)
        .map(|i| event(&format!("req_many_{i}"), "t4"))
        .collect();
    assert_eq!(ledger.record_batch(&many).await.unwrap(), 1234);
    assert_eq!(
        ledger.record_batch(&many).await.unwrap(),
        0,
        "a replayed batch writes nothing"
    );
    assert_eq!(ledger.for_tenant("t4").await.unwrap().len(), 1234);
}

async fn keys_round_trip(db: Db) {
    let store = TenantStore::new(db);
    let tenant = store.create_tenant("acme").await.unwrap();
    assert!(
        store.create_tenant("acme").await.is_err(),
        "tenant names are unique"
    );
    let (key, record) = store
        .create_key(
            &tenant.id,
            &NewKey {
                name: "ci".into(),
                allowed_models: Some(vec!["a".into(), "b".into()]),
                expires_at: Some(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let loaded = store.key(key.public_id()).await.unwrap().unwrap();
    assert_eq!(loaded, record);
    assert!(loaded.allows_model("b") && !loaded.allows_model("c"));
    assert_ne!(loaded.secret_hash, key.expose(), "only the hash is stored");
    assert!(store.revoke_key(&record.id).await.unwrap());
    assert!(!store.revoke_key(&record.id).await.unwrap());
    assert!(store
        .key(&record.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_some());
}

#[tokio::test]
async fn sqlite_ledger_is_idempotent() {
    let store = TempSqlite::new();
    ledger_is_idempotent(Db::connect(&store.url).await.unwrap()).await;
}

/// The usage shipper's handle on an SQLite file writes through the native driver, not
/// `Any`: it must keep every rule the serving handle keeps.
#[tokio::test]
async fn sqlite_usage_writer_ledger_is_idempotent() {
    let store = TempSqlite::new();
    Db::connect(&store.url).await.unwrap().close().await; // migrates
    let writer = Db::connect_usage_writer(&store.url).await.unwrap();
    let lite = writer.sqlite().expect("the writer has its native pool");
    let pragma = |name: &'static str| async move {
        sqlx::query_scalar::<_, i64>(&format!("PRAGMA {name}"))
            .fetch_one(lite)
            .await
            .unwrap()
    };
    assert_eq!(pragma("wal_autocheckpoint").await, 10_000);
    assert_eq!(pragma("temp_store").await, 2, "temporary store in memory");
    assert_eq!(pragma("cache_size").await, -65_536, "a 64 MiB page cache");
    assert_eq!(pragma("synchronous").await, 2, "FULL: a commit is on disk");
    let serving: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
        .fetch_one(writer.pool())
        .await
        .unwrap();
    assert_eq!(
        serving, 10_000,
        "every connection checkpoints at the same mark"
    );
    ledger_is_idempotent(writer).await;
}

#[tokio::test]
async fn postgres_ledger_is_idempotent() {
    let pg = TempPostgres::new().await;
    ledger_is_idempotent(Db::connect(&pg.url).await.unwrap()).await;
}

#[tokio::test]
async fn sqlite_keys_round_trip() {
    let store = TempSqlite::new();
    keys_round_trip(Db::connect(&store.url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_keys_round_trip() {
    let pg = TempPostgres::new().await;
    keys_round_trip(Db::connect(&pg.url).await.unwrap()).await;
}

/// Postgres keeps usage in monthly partitions; the request id stays unique across them,
/// a replay in another month is refused, an `unknown` delivery is still resolved, and a
/// period's query reads only its month.
#[tokio::test]
async fn postgres_usage_is_partitioned_by_month_and_ids_stay_unique() {
    let pg = TempPostgres::new().await;
    let db = Db::connect(&pg.url).await.unwrap();
    let ledger = Ledger::new(db.clone());
    let now = billing::now_ms();
    let (this_month, next_month) =
        billing::invoices::period_bounds(&billing::period_of(now)).unwrap();
    let mut a = event("req_month_a", "t1");
    a.started_at = this_month + 1_000;
    let mut b = event("req_month_b", "t1");
    b.started_at = next_month + 1_000;
    b.delivery = Delivery::Unknown;
    assert_eq!(
        ledger.record_batch(&[a.clone(), b.clone()]).await.unwrap(),
        2
    );
    let pool = db.postgres().unwrap();
    let partition = |id: &'static str| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT tableoid::regclass::text FROM usage_records WHERE request_id = $1",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let month = |ms: i64| billing::period_of(ms).replace('-', "");
    assert_eq!(
        partition("req_month_a").await,
        format!("usage_records_p{}", month(this_month))
    );
    assert_eq!(
        partition("req_month_b").await,
        format!("usage_records_p{}", month(next_month))
    );

    // The same id replayed with another start (another partition): refused, one record.
    let mut moved = a.clone();
    moved.started_at = next_month + 5_000;
    moved.prompt_tokens = 1;
    assert_eq!(ledger.record_batch(&[moved]).await.unwrap(), 0);
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE request_id = $1")
        .bind("req_month_a")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    assert_eq!(ledger.get("req_month_a").await.unwrap(), Some(a));

    // The outcome of an in-flight record still resolves its delivery, once.
    let mut outcome = b.clone();
    outcome.delivery = Delivery::Delivered;
    assert_eq!(ledger.record_batch(&[outcome.clone()]).await.unwrap(), 1);
    assert_eq!(ledger.record_batch(&[outcome.clone()]).await.unwrap(), 0);
    assert_eq!(ledger.get("req_month_b").await.unwrap(), Some(outcome));

    // A month's query is pruned to that month's partition.
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT COUNT(*) FROM usage_records WHERE started_at >= $1 AND started_at < $2",
    )
    .bind(this_month)
    .bind(next_month)
    .fetch_all(pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains(&format!("usage_records_p{}", month(this_month))),
        "{plan}"
    );
    assert!(
        !plan.contains(&format!("usage_records_p{}", month(next_month))),
        "{plan}"
    );
    assert!(!plan.contains("usage_records_default"), "{plan}");
}
