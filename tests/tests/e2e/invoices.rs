//! Invoices on both stores: exact money, lines that sum to the total, price versions,
//! finalised invoices that never change and re-price byte for byte, late usage as an
//! adjustment on the next invoice, records = billed + rejected.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use billing::export::{export_invoice_trace, export_usage, Format, UsageSelection};
use billing::invoices::period_bounds;
use billing::{Db, Delivery, InvoiceError, Invoices, Ledger, LineKind, Micros, Price, UsageEvent};
use e2e_tests::{TempPostgres, TempSqlite};
use rand::{Rng, SeedableRng};

fn event(id: &str, tenant: &str, model: &str, at: i64, p: i64, c: i64, d: Delivery) -> UsageEvent {
    UsageEvent::builder(id, tenant)
        .model(model)
        .tokens(p, c)
        .at(at, 5)
        .delivery(d)
        .build()
}

fn price(model: &str, from: i64, input: i64, output: i64, request: i64) -> Price {
    Price {
        model: model.into(),
        effective_from: from,
        currency: "USD".into(),
        input_minor_per_mtok: input,
        output_minor_per_mtok: output,
        request_minor_per_mreq: request,
        cached_input_minor_per_mtok: None,
        batch_discount_pct: None,
        tiers: Vec::new(),
    }
}

/// Graduated cost of the first `quantity` tokens: each band `[from_i, from_i+1)` at its
/// rate (`rate` picks input or output from `(input, output)` rates).
fn banded(p: &Price, quantity: i64, rate: fn((i64, i64)) -> i64) -> i64 {
    let mut bands = vec![(0, (p.input_minor_per_mtok, p.output_minor_per_mtok))];
    bands.extend(p.tiers.iter().map(|t| {
        (
            t.from_tokens,
            (t.input_minor_per_mtok, t.output_minor_per_mtok),
        )
    }));
    let mut total = 0;
    for (i, (from, rates)) in bands.iter().enumerate() {
        let to = bands.get(i + 1).map_or(i64::MAX, |b| b.0);
        let inside = quantity.min(to) - from;
        if inside > 0 {
            total += inside * rate(*rates);
        }
    }
    total
}

/// Tiered prices: invoice lines are graduated over their volume, and the usage series and
/// leader boards, bucket by bucket and key by key, add up to the same exact amount.
async fn tiers_agree_everywhere(db: Db) {
    let ledger = Ledger::new(db.clone());
    let (start, end) = period_bounds("2026-07").unwrap();
    let mut p = price("tiered", 0, 1_000, 4_000, 50_000);
    p.tiers = vec![
        billing::Tier {
            from_tokens: 10_000,
            input_minor_per_mtok: 600,
            output_minor_per_mtok: 3_000,
        },
        billing::Tier {
            from_tokens: 50_000,
            input_minor_per_mtok: 200,
            output_minor_per_mtok: 1_000,
        },
    ];
    billing::prices::add_price(&db, &p).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let events: Vec<UsageEvent> = (0..300)
        .map(|i| {
            let mut e = event(
                &format!("tier-{i}"),
                "tn_tiers",
                "tiered",
                rng.random_range(start..end),
                rng.random_range(0..900),
                rng.random_range(0..300),
                if i % 17 == 0 {
                    Delivery::Undelivered
                } else {
                    Delivery::Delivered
                },
            );
            e.key_id = format!("key_{}", i % 3);
            e
        })
        .collect();
    ledger.record_batch(&events).await.unwrap();
    let inv = Invoices::new(db.clone())
        .finalise("tn_tiers", "2026-07")
        .await
        .unwrap();
    assert_eq!(inv.lines.len(), 1);
    let line = &inv.lines[0];
    assert_eq!(line.tiers, p.tiers);
    let (input, output): (i64, i64) = events
        .iter()
        .filter(|e| e.delivery == Delivery::Delivered)
        .fold((0, 0), |(a, b), e| {
            (a + e.prompt_tokens, b + e.completion_tokens)
        });
    assert!(input > 50_000, "the volume reaches the last tier");
    let exact = banded(&p, input, |t| t.0) + banded(&p, output, |t| t.1) + line.requests * 50_000;
    assert_eq!(line.amount_micros, exact);
    assert_eq!(inv.total_minor, Micros(exact).to_minor_half_even());

    use billing::series::{top, usage_series, Bucket, Dimension, UsageFilter};
    let month = UsageFilter {
        tenant_id: Some("tn_tiers".into()),
        from_ms: start,
        to_ms: end,
        ..Default::default()
    };
    for bucket in [Bucket::Hour, Bucket::Day] {
        let points = usage_series(&db, &month, bucket, None).await.unwrap();
        assert_eq!(
            points.iter().map(|p| p.spend_micros).sum::<i64>(),
            exact,
            "{bucket:?}"
        );
        let by_key = usage_series(&db, &month, bucket, Some(Dimension::Key))
            .await
            .unwrap();
        assert_eq!(
            by_key.iter().map(|p| p.spend_micros).sum::<i64>(),
            exact,
            "{bucket:?}"
        );
    }
    let keys = top(&db, &month, Dimension::Key, 10).await.unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys.iter().map(|k| k.spend_micros).sum::<i64>(), exact);
    // One key alone, and the month split at a random instant: the parts add up.
    let mut per_key = 0;
    for k in 0..3 {
        let f = UsageFilter {
            key_id: Some(format!("key_{k}")),
            ..month.clone()
        };
        per_key += usage_series(&db, &f, Bucket::Day, None)
            .await
            .unwrap()
            .iter()
            .map(|p| p.spend_micros)
            .sum::<i64>();
    }
    assert_eq!(per_key, exact);
    let cut = start + (end - start) / 3 + 12_345;
    let first = UsageFilter {
        to_ms: cut,
        ..month.clone()
    };
    let second = UsageFilter {
        from_ms: cut,
        ..month.clone()
    };
    let part = |f: UsageFilter| {
        let db = db.clone();
        async move {
            usage_series(&db, &f, Bucket::Hour, None)
                .await
                .unwrap()
                .iter()
                .map(|p| p.spend_micros)
                .sum::<i64>()
        }
    };
    assert_eq!(part(first).await + part(second).await, exact);
    let invoice_id = inv.id.unwrap();
    let invoices = Invoices::new(db.clone());
    assert_eq!(
        invoices.reprice(&invoice_id).await.unwrap().unwrap(),
        invoices.document(&invoice_id).await.unwrap().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_tiers_agree_everywhere() {
    let store = TempSqlite::new();
    tiers_agree_everywhere(Db::connect(&store.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tiers_agree_everywhere() {
    let pg = TempPostgres::new().await;
    tiers_agree_everywhere(Db::connect(&pg.url).await.unwrap()).await;
}

/// Cached prompt tokens and response-cache hits: recorded through the ledger, priced apart
/// on the invoice (cached tokens at the version's cached rate, climbing no tier; hits at
/// the rate recorded with them, on lines of their own), and the usage series, leader
/// boards, exports and re-pricing agree to the micro.
async fn cached_usage_is_priced_apart(db: Db) {
    let ledger = Ledger::new(db.clone());
    let (start, end) = period_bounds("2026-08").unwrap();
    let mut p = price("cached", 0, 1_000, 4_000, 0);
    p.cached_input_minor_per_mtok = Some(100);
    p.tiers = vec![billing::Tier {
        from_tokens: 20_000,
        input_minor_per_mtok: 500,
        output_minor_per_mtok: 4_000,
    }];
    billing::prices::add_price(&db, &p).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let events: Vec<UsageEvent> = (0..200)
        .map(|i| {
            let prompt = rng.random_range(0..600);
            let at = rng.random_range(start..end);
            let e = UsageEvent::builder(format!("cached-{i}"), "tn_cached")
                .model("cached")
                .key(format!("key_{}", i % 2))
                .tokens(prompt, rng.random_range(0..200))
                .at(at, 5);
            match i % 5 {
                // Served whole from the response cache, at one of two plan rates.
                0 => e.cache_hit(if i % 10 == 0 { 0 } else { 7_000 }),
                _ => e.cached(rng.random_range(0..=prompt)),
            }
            .build()
        })
        .collect();
    ledger.record_batch(&events).await.unwrap();
    // The ledger keeps both fields, on either store.
    let stored = ledger.get("cached-5").await.unwrap().unwrap();
    assert_eq!(stored.cache_hit_minor_per_mreq, Some(7_000));
    assert_eq!(ledger.get("cached-3").await.unwrap().unwrap(), events[3]);

    let worked: Vec<&UsageEvent> = events
        .iter()
        .filter(|e| e.cache_hit_minor_per_mreq.is_none())
        .collect();
    let sum = |f: fn(&UsageEvent) -> i64| worked.iter().map(|e| f(e)).sum::<i64>();
    let (input, cached, output) = (
        sum(|e| e.prompt_tokens),
        sum(|e| e.cached_tokens),
        sum(|e| e.completion_tokens),
    );
    assert!(input - cached > 20_000, "uncached input reaches the tier");
    let worked_exact = banded(&p, input - cached, |t| t.0) + cached * 100 + output * 4_000;
    let paid_hits = events
        .iter()
        .filter(|e| e.cache_hit_minor_per_mreq == Some(7_000))
        .count() as i64;
    let exact = worked_exact + paid_hits * 7_000;

    let inv = Invoices::new(db.clone())
        .finalise("tn_cached", "2026-08")
        .await
        .unwrap();
    let by_rate = |rate: Option<i64>| {
        inv.lines
            .iter()
            .find(|l| l.cache_hit_minor_per_mreq == rate)
            .unwrap_or_else(|| panic!("no line for {rate:?}: {inv:?}"))
    };
    assert_eq!(inv.lines.len(), 3, "{inv:?}");
    let line = by_rate(None);
    assert_eq!(
        (
            line.input_tokens,
            line.cached_input_tokens,
            line.output_tokens
        ),
        (input, cached, output)
    );
    assert_eq!(line.cached_input_minor_per_mtok, Some(100));
    assert_eq!(line.amount_micros, worked_exact);
    assert_eq!(by_rate(Some(7_000)).amount_micros, paid_hits * 7_000);
    assert_eq!(by_rate(Some(7_000)).requests, paid_hits);
    assert_eq!(by_rate(Some(0)).amount_micros, 0);
    assert_eq!(
        inv.total_minor,
        inv.lines.iter().map(|l| l.amount_minor).sum::<i64>()
    );
    let csv = billing::export::invoice_lines_csv(&inv);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .ends_with("cached_input_minor_per_mtok,cached_input_tokens,cache_hit_minor_per_mreq,batch,batch_discount_pct"));
    assert!(csv.contains(&format!(",100,{cached},,false,\n")), "{csv}");

    use billing::series::{top, usage_series, Bucket, Dimension, UsageFilter};
    let month = UsageFilter {
        tenant_id: Some("tn_cached".into()),
        from_ms: start,
        to_ms: end,
        ..Default::default()
    };
    for bucket in [Bucket::Hour, Bucket::Day] {
        let points = usage_series(&db, &month, bucket, Some(Dimension::Key))
            .await
            .unwrap();
        assert_eq!(points.iter().map(|p| p.spend_micros).sum::<i64>(), exact);
        assert_eq!(points.iter().map(|p| p.cached_tokens).sum::<i64>(), cached);
        assert_eq!(points.iter().map(|p| p.cache_hits).sum::<i64>(), 40);
    }
    let keys = top(&db, &month, Dimension::Key, 10).await.unwrap();
    assert_eq!(keys.iter().map(|k| k.spend_micros).sum::<i64>(), exact);
    let totals = ledger
        .totals_by_model("tn_cached", start, end)
        .await
        .unwrap();
    assert_eq!(
        (totals[0].cached_tokens, totals[0].cache_hits),
        (cached, 40)
    );

    let mut out = Vec::new();
    let selection = UsageSelection {
        tenant_id: Some("tn_cached".into()),
        from_ms: start,
        to_ms: end,
    };
    export_usage(&db, &selection, Format::Csv, &mut out, |_| {})
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text
        .lines()
        .next()
        .unwrap()
        .ends_with(",invoice_id,cached_tokens,cache_hit_minor_per_mreq,batch_id"));
    let row = text.lines().find(|l| l.starts_with("cached-5,")).unwrap();
    assert!(row.ends_with(",0,7000,"), "{row}");
    let mut trace = Vec::new();
    let id = inv.id.clone().unwrap();
    export_invoice_trace(&db, &id, Format::Csv, &mut trace)
        .await
        .unwrap();
    let trace = String::from_utf8(trace).unwrap();
    assert_eq!(trace.matches(",billed:cache_hit,").count(), 40);
    let invoices = Invoices::new(db.clone());
    assert_eq!(
        invoices.reprice(&id).await.unwrap().unwrap(),
        invoices.document(&id).await.unwrap().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cached_usage_is_priced_apart() {
    let store = TempSqlite::new();
    cached_usage_is_priced_apart(Db::connect(&store.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cached_usage_is_priced_apart() {
    let pg = TempPostgres::new().await;
    cached_usage_is_priced_apart(Db::connect(&pg.url).await.unwrap()).await;
}

/// Batch lines (usage records `{batch}_req_{line}`) are invoiced on lines of their own at
/// the version's batch discount; the same usage made interactively is charged in full; the
/// usage export names each record's batch and the lines' CSV says which line is which.
async fn batch_usage_is_discounted(db: Db) {
    let ledger = Ledger::new(db.clone());
    let (start, _) = period_bounds("2026-09").unwrap();
    let mut p = price("batched", 0, 1_000, 3_000, 500);
    p.batch_discount_pct = Some(50);
    billing::prices::add_price(&db, &p).await.unwrap();
    let event = |id: String| {
        UsageEvent::builder(id, "tn_batch")
            .model("batched")
            .tokens(1_234, 567)
            .at(start + 1_000, 5)
            .build()
    };
    let mut events: Vec<UsageEvent> = (1..=10)
        .map(|i| event(format!("batch_0123abcd_req_{i}")))
        .collect();
    events.extend((0..10).map(|i| event(format!("req_{i:032x}"))));
    ledger.record_batch(&events).await.unwrap();

    let inv = Invoices::new(db.clone())
        .finalise("tn_batch", "2026-09")
        .await
        .unwrap();
    assert_eq!(inv.lines.len(), 2, "{inv:?}");
    let line = |batch: bool| inv.lines.iter().find(|l| l.batch == batch).unwrap();
    let (interactive, batch) = (line(false), line(true));
    assert_eq!(
        (batch.requests, batch.input_tokens, batch.output_tokens),
        (10, 12_340, 5_670)
    );
    assert_eq!(batch.batch_discount_pct, Some(50));
    assert_eq!(interactive.batch_discount_pct, None);
    // 10 requests at 500/Mreq, 12,340 input at 1,000/Mtok, 5,670 output at 3,000/Mtok.
    let full = 10 * 500 + 12_340 * 1_000 + 5_670 * 3_000;
    assert_eq!(interactive.amount_micros, full);
    assert_eq!(batch.amount_micros, full / 2);
    let csv = billing::export::invoice_lines_csv(&inv);
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",batch,batch_discount_pct"),
        "{csv}"
    );
    assert!(csv.lines().any(|l| l.ends_with(",true,50")), "{csv}");
    assert_eq!(
        billing::export::batch_of("batch_0123abcd_req_7"),
        Some("batch_0123abcd")
    );
    assert_eq!(billing::export::batch_of("req_0123"), None);
    // The tenant's usage says which part was batch.
    let totals = ledger
        .totals_by_model("tn_batch", start, start + 60_000)
        .await
        .unwrap();
    assert_eq!(totals[0].requests, 20);
    assert_eq!(
        (
            totals[0].batch_requests,
            totals[0].batch_prompt_tokens,
            totals[0].batch_completion_tokens
        ),
        (10, 12_340, 5_670)
    );
    // The usage series and leader boards (the dashboard's spend) agree with the invoice.
    use billing::series::{top, usage_series, Bucket, Dimension, UsageFilter};
    let (_, end) = period_bounds("2026-09").unwrap();
    let month = UsageFilter {
        tenant_id: Some("tn_batch".into()),
        from_ms: start,
        to_ms: end,
        ..Default::default()
    };
    let invoiced = full + full / 2;
    for bucket in [Bucket::Hour, Bucket::Day] {
        let points = usage_series(&db, &month, bucket, None).await.unwrap();
        assert_eq!(points.iter().map(|p| p.spend_micros).sum::<i64>(), invoiced);
    }
    let tenants = top(&db, &month, Dimension::Tenant, 10).await.unwrap();
    assert_eq!(tenants[0].spend_micros, invoiced);
    // Broken down by batch, each part is its invoice line.
    let parts = usage_series(&db, &month, Bucket::Day, Some(Dimension::Batch))
        .await
        .unwrap();
    let part = |name: &str| {
        parts
            .iter()
            .filter(|p| p.group.as_deref() == Some(name))
            .map(|p| (p.requests, p.spend_micros))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    assert_eq!(part("batch"), (10, full / 2));
    assert_eq!(part("interactive"), (10, full));
    let ranked = top(&db, &month, Dimension::Batch, 10).await.unwrap();
    assert_eq!(ranked[0].id, "interactive");
    assert_eq!(ranked[1].spend_micros, full / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_batch_usage_is_discounted() {
    let store = TempSqlite::new();
    batch_usage_is_discounted(Db::connect(&store.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_usage_is_discounted() {
    let pg = TempPostgres::new().await;
    batch_usage_is_discounted(Db::connect(&pg.url).await.unwrap()).await;
}

async fn lifecycle(db: Db) {
    let ledger = Ledger::new(db.clone());
    let invoices = Invoices::new(db.clone());
    let (sep, oct_start) = period_bounds("2026-09").unwrap();
    let mid_sep = sep + 15 * 86_400_000;
    // Price of `chat` changes mid-September; `embed` has no price.
    billing::prices::add_price(&db, &price("chat", 0, 15, 60, 0))
        .await
        .unwrap();
    billing::prices::add_price(&db, &price("chat", mid_sep, 30, 120, 1_000_000))
        .await
        .unwrap();
    let t = "tn_a";
    let records = [
        event("r1", t, "chat", sep + 1000, 1000, 500, Delivery::Delivered),
        event("r2", t, "chat", mid_sep - 1, 3, 1, Delivery::Delivered),
        event("r3", t, "chat", mid_sep, 1000, 500, Delivery::Delivered),
        event("r4", t, "embed", sep + 2000, 50, 0, Delivery::Delivered),
        event("r5", t, "chat", sep + 3000, 10, 10, Delivery::Undelivered),
        event("r6", t, "chat", sep + 4000, 10, 10, Delivery::Unknown),
        // Another tenant and another month: not on this invoice.
        event(
            "r7",
            "tn_b",
            "chat",
            sep + 1000,
            1000,
            500,
            Delivery::Delivered,
        ),
        event("r8", t, "chat", oct_start, 1000, 500, Delivery::Delivered),
    ];
    ledger.record_batch(&records).await.unwrap();

    let draft = invoices.preview(t, "2026-09").await.unwrap();
    assert_eq!(draft.status, billing::InvoiceStatus::Draft);
    assert_eq!(draft.records, 6);
    assert_eq!(draft.rejected.len(), 2);
    assert_eq!(
        draft.lines.iter().map(|l| l.requests).sum::<i64>()
            + draft.rejected.iter().map(|r| r.records).sum::<i64>(),
        draft.records
    );
    // Old price: (1003 × 15 + 501 × 60) micros = 45,105 → 0 minor (0.045 rounds down).
    // New price: 1000 × 30 + 500 × 120 + 1 × 1,000,000 = 1,090,000 micros → 1 minor.
    let chat: Vec<_> = draft.lines.iter().filter(|l| l.model == "chat").collect();
    assert_eq!(chat.len(), 2);
    assert_eq!(
        (
            chat[0].requests,
            chat[0].amount_micros,
            chat[0].amount_minor
        ),
        (2, 45_105, 0)
    );
    assert_eq!(
        (
            chat[1].requests,
            chat[1].amount_micros,
            chat[1].amount_minor
        ),
        (1, 1_090_000, 1)
    );
    let embed = draft.lines.iter().find(|l| l.model == "embed").unwrap();
    assert_eq!((embed.price_effective_from, embed.amount_minor), (None, 0));
    assert_eq!(
        draft.total_minor,
        draft.lines.iter().map(|l| l.amount_minor).sum::<i64>()
    );

    let fin = invoices.finalise(t, "2026-09").await.unwrap();
    let id = fin.id.clone().unwrap();
    assert_eq!(fin.lines, draft.lines);
    assert_eq!(fin.total_minor, draft.total_minor);
    assert!(matches!(
        invoices.finalise(t, "2026-09").await,
        Err(InvoiceError::AlreadyFinal { .. })
    ));
    let this_month = billing::period_of(billing::now_ms());
    assert!(matches!(
        invoices.finalise(t, &this_month).await,
        Err(InvoiceError::NotEnded(_))
    ));
    // The store refuses to change a finalised invoice or its records.
    assert!(sqlx::query("UPDATE invoices SET total_minor = 0")
        .execute(db.pool())
        .await
        .is_err());
    assert!(sqlx::query("DELETE FROM invoices")
        .execute(db.pool())
        .await
        .is_err());
    assert!(
        sqlx::query("UPDATE usage_records SET prompt_tokens = 0 WHERE request_id = 'r1'")
            .execute(db.pool())
            .await
            .is_err()
    );
    // A replay of an invoiced record changes nothing and does not fail the batch.
    let mut replay = records[5].clone();
    replay.delivery = Delivery::Delivered;
    assert_eq!(ledger.record_batch(&[replay]).await.unwrap(), 0);

    // Prices may gain versions later; re-pricing the closed month is byte-identical.
    billing::prices::add_price(&db, &price("chat", oct_start + 1, 1, 1, 1))
        .await
        .unwrap();
    let stored = invoices.document(&id).await.unwrap().unwrap();
    assert_eq!(invoices.reprice(&id).await.unwrap().unwrap(), stored);

    // Late September usage arrives after finalising: an adjustment on October's invoice.
    ledger
        .record(&event(
            "late",
            t,
            "chat",
            mid_sep + 10,
            100,
            100,
            Delivery::Delivered,
        ))
        .await
        .unwrap();
    let oct = invoices.finalise(t, "2026-10").await.unwrap();
    let adjustment = oct
        .lines
        .iter()
        .find(|l| l.kind == LineKind::Adjustment)
        .unwrap();
    assert_eq!(
        (
            adjustment.usage_period.as_str(),
            adjustment.requests,
            adjustment.input_tokens
        ),
        ("2026-09", 1, 100)
    );
    let usage = oct
        .lines
        .iter()
        .find(|l| l.kind == LineKind::Usage)
        .unwrap();
    assert_eq!(
        (usage.usage_period.as_str(), usage.requests),
        ("2026-10", 1)
    );
    assert_eq!(invoices.list(t).await.unwrap().len(), 2);
    // Every record of the tenant is on exactly one invoice.
    let on_invoices: i64 = fin.records + oct.records;
    assert_eq!(on_invoices, 8);

    // Records, usage API, export and invoices agree, for both months.
    for period in ["2026-09", "2026-10"] {
        let report = billing::reconcile::reconcile(&db, period).await.unwrap();
        assert!(report.ok(), "{report:#?}");
        assert!(report.checks.len() >= 10, "{report:#?}");
    }
    // Exports of a closed month are byte-identical, CSV and JSON, and trace every record.
    let selection = UsageSelection {
        tenant_id: Some(t.into()),
        from_ms: sep,
        to_ms: oct_start,
    };
    for format in [Format::Csv, Format::Json] {
        let mut first = Vec::new();
        let n = export_usage(&db, &selection, format, &mut first, |_| {})
            .await
            .unwrap();
        assert_eq!(n, 7); // six records of September plus the late one
        let mut again = Vec::new();
        export_usage(&db, &selection, format, &mut again, |_| {})
            .await
            .unwrap();
        assert_eq!(first, again);
    }
    let mut csv = Vec::new();
    export_usage(&db, &selection, Format::Csv, &mut csv, |_| {})
        .await
        .unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.starts_with("request_id,tenant_id,key_id,model,"));
    assert!(csv
        .lines()
        .any(|l| l.starts_with("r1,tn_a,k,chat,") && l.ends_with(&format!(",{id},0,,"))));
    let mut trace = Vec::new();
    let rows = export_invoice_trace(&db, &id, Format::Csv, &mut trace)
        .await
        .unwrap();
    assert_eq!(rows, Some(6));
    let trace = String::from_utf8(trace).unwrap();
    assert!(
        trace
            .lines()
            .any(|l| l.contains(",rejected:undelivered,r5,")),
        "{trace}"
    );

    // A record slipped onto a finalised invoice behind the ledger's back is caught.
    sqlx::query(
        "INSERT INTO usage_records (request_id, tenant_id, key_id, model, endpoint, prompt_tokens, \
         completion_tokens, started_at, finished_at, status, delivery, invoice_id) \
         VALUES ('forged', 'tn_a', 'k', 'chat', '/v1/chat/completions', 1, 1, $1, $1, 'success', 'delivered', $2)",
    )
    .bind(sep + 10)
    .bind(&id)
    .execute(db.pool())
    .await
    .unwrap();
    let report = billing::reconcile::reconcile(&db, "2026-09").await.unwrap();
    assert!(!report.ok());
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    assert!(failed.contains(&"invoice_records_in_store"), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_invoice_lifecycle() {
    let store = TempSqlite::new();
    lifecycle(Db::connect(&store.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_invoice_lifecycle() {
    let pg = TempPostgres::new().await;
    lifecycle(Db::connect(&pg.url).await.unwrap()).await;
}

/// An invoiced record cannot be deleted, alone or in a sweep, as it cannot be updated: an
/// operator's (or intruder's) DELETE would silently change what the invoice counted.
/// Records on no invoice yet stay deletable.
async fn invoiced_records_cannot_be_deleted(db: Db) {
    let ledger = Ledger::new(db.clone());
    let (aug, sep_start) = period_bounds("2026-08").unwrap();
    let t = "tn_del";
    let records = [
        event("d1", t, "chat", aug + 1000, 10, 5, Delivery::Delivered),
        event("d2", t, "chat", aug + 2000, 20, 5, Delivery::Delivered),
        event(
            "d3",
            t,
            "chat",
            sep_start + 1000,
            30,
            5,
            Delivery::Delivered,
        ),
    ];
    ledger.record_batch(&records).await.unwrap();
    Invoices::new(db.clone())
        .finalise(t, "2026-08")
        .await
        .unwrap();
    let count = |id: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT COUNT(*) FROM usage_records WHERE request_id = '{id}'"
            ))
            .fetch_one(db.pool())
            .await
            .unwrap()
        }
    };
    let delete = |sql: &'static str| {
        let db = db.clone();
        async move { sqlx::query(sql).execute(db.pool()).await }
    };

    let one = delete("DELETE FROM usage_records WHERE request_id = 'd1'").await;
    assert!(one.is_err(), "an invoiced record was deleted: {one:?}");
    let sweep = delete("DELETE FROM usage_records").await;
    assert!(
        sweep.is_err(),
        "a sweep deleted invoiced records: {sweep:?}"
    );
    assert_eq!((count("d1").await, count("d2").await), (1, 1));
    let err = one.unwrap_err().to_string();
    assert!(
        err.contains("usage on a finalised invoice is frozen"),
        "{err}"
    );
    // The record of the month not yet invoiced may go.
    delete("DELETE FROM usage_records WHERE request_id = 'd3'")
        .await
        .unwrap();
    assert_eq!(count("d3").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_invoiced_records_cannot_be_deleted() {
    let store = TempSqlite::new();
    invoiced_records_cannot_be_deleted(Db::connect(&store.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_invoiced_records_cannot_be_deleted() {
    let pg = TempPostgres::new().await;
    invoiced_records_cannot_be_deleted(Db::connect(&pg.url).await.unwrap()).await;
}

/// Random usage and prices: lines sum exactly to the total, the total equals an
/// independent exact computation rounded per line, and re-pricing is byte-identical.
async fn random_invoices(db: Db, cases: u64) {
    let ledger = Ledger::new(db.clone());
    let invoices = Invoices::new(db.clone());
    let (start, end) = period_bounds("2026-08").unwrap();
    let models = ["m0", "m1", "m2"];
    for m in models {
        // Up to three versions per model, some before and some inside the month.
        let mut rng = rand::rngs::StdRng::seed_from_u64(m.len() as u64 + m.as_bytes()[1] as u64);
        let mut from = 0;
        for _ in 0..rng.random_range(1..=3) {
            let mut p = price(
                m,
                from,
                rng.random_range(0..5_000),
                rng.random_range(0..20_000),
                rng.random_range(0..3_000_000),
            );
            // Half the versions have up to three volume tiers, cheaper or dearer.
            if rng.random_bool(0.5) {
                let mut at = 0;
                for _ in 0..rng.random_range(1..=3) {
                    at += rng.random_range(1..2_000_000);
                    p.tiers.push(billing::Tier {
                        from_tokens: at,
                        input_minor_per_mtok: rng.random_range(0..5_000),
                        output_minor_per_mtok: rng.random_range(0..20_000),
                    });
                }
            }
            billing::prices::add_price(&db, &p).await.unwrap();
            from = rng.random_range(start..end);
        }
    }
    let book = billing::PriceBook::load(&db).await.unwrap();
    for case in 0..cases {
        let mut rng = rand::rngs::StdRng::seed_from_u64(case);
        let tenant = format!("tn_{case}");
        let n = rng.random_range(1..200);
        let events: Vec<UsageEvent> = (0..n)
            .map(|i| {
                let d = match rng.random_range(0..10) {
                    0 => Delivery::Undelivered,
                    1 => Delivery::Unknown,
                    _ => Delivery::Delivered,
                };
                event(
                    &format!("{tenant}-{i}"),
                    &tenant,
                    models[rng.random_range(0..models.len())],
                    rng.random_range(start..end),
                    rng.random_range(0..100_000),
                    rng.random_range(0..10_000),
                    d,
                )
            })
            .collect();
        ledger.record_batch(&events).await.unwrap();
        let inv = invoices.finalise(&tenant, "2026-08").await.unwrap();
        assert_eq!(
            inv.total_minor,
            inv.lines.iter().map(|l| l.amount_minor).sum::<i64>()
        );
        assert_eq!(inv.records, n);
        // Independent: group delivered events by (model, price version), sum the
        // quantities, price each group's volume band by band, round half to even.
        let mut groups: std::collections::BTreeMap<(String, i64), (i64, i64, i64)> =
            Default::default();
        for e in events.iter().filter(|e| e.delivery == Delivery::Delivered) {
            let p = book.at(&e.model, e.started_at).unwrap();
            let g = groups
                .entry((e.model.clone(), p.effective_from))
                .or_default();
            g.0 += 1;
            g.1 += e.prompt_tokens;
            g.2 += e.completion_tokens;
        }
        let expected: i64 = groups
            .iter()
            .map(|((model, from), (requests, input, output))| {
                let p = book.at(model, *from).unwrap();
                Micros(
                    banded(p, *input, |t| t.0)
                        + banded(p, *output, |t| t.1)
                        + requests * p.request_minor_per_mreq,
                )
                .to_minor_half_even()
            })
            .sum();
        assert_eq!(inv.total_minor, expected, "case {case}");
        let id = inv.id.unwrap();
        assert_eq!(
            invoices.reprice(&id).await.unwrap().unwrap(),
            invoices.document(&id).await.unwrap().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_random_invoices_are_exact() {
    let store = TempSqlite::new();
    random_invoices(Db::connect(&store.url).await.unwrap(), 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_random_invoices_are_exact() {
    let pg = TempPostgres::new().await;
    random_invoices(Db::connect(&pg.url).await.unwrap(), 40).await;
}

/// Finalising reads before it writes; while another replica keeps recording usage into
/// the same SQLite file it must wait its turn, never fail with "database is locked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_finalise_waits_out_a_busy_writer() {
    let store = TempSqlite::new();
    let db = Db::connect(&store.url).await.unwrap();
    let other = Db::connect(&store.url).await.unwrap();
    let (sep, _) = period_bounds("2026-09").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let (ledger, stop) = (Ledger::new(other), stop.clone());
        async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<_> = (0..5)
                    .map(|i| {
                        let id = format!("busy-{n}-{i}");
                        event(&id, "tn_busy", "chat", sep + n, 10, 10, Delivery::Delivered)
                    })
                    .collect();
                ledger.record_batch(&batch).await.unwrap();
                n += 1;
            }
            n
        }
    });
    let ledger = Ledger::new(db.clone());
    let invoices = Invoices::new(db.clone());
    for t in 0..40 {
        let tenant = format!("tn_{t}");
        let e = event(
            &format!("own-{t}"),
            &tenant,
            "chat",
            sep + 1,
            5,
            5,
            Delivery::Delivered,
        );
        ledger.record_batch(&[e]).await.unwrap();
        let inv = invoices.finalise(&tenant, "2026-09").await.unwrap();
        assert_eq!(inv.records, 1, "{tenant}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = writer.await.unwrap();
    assert!(batches > 0, "the other writer recorded nothing");
}
