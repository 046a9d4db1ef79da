//! The admin API on its own listener: JWT authentication (forged, expired, `alg: none`,
//! algorithm-confusion, wrong-issuer, wrong-audience, not-yet-valid, over-long and revoked
//! tokens refused), least privilege per route (checked against the
//! `x-permission` the OpenAPI document gives each operation), tenant isolation on every
//! tenant-scoped route, key lifecycle, usage series and leader boards that add up to the
//! seeded records, exports byte-identical to the ledger's, and every response conforming
//! to the served OpenAPI document (validated by `tests/openapi/check_openapi.py`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use billing::invoices::period_bounds;
use billing::{Delivery, Ledger, UsageEvent};
use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{gateway_config, workspace_root, RunningGateway, TempPostgres, TempSqlite};
use gateway::admin::{Role, Secret, OPERATIONS};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECRET: &str = "test-admin-secret-0123456789-abcdefghijklmnop";

struct Admin {
    gw: RunningGateway,
    url: String,
    http: reqwest::Client,
    _stub: StubWorker,
}

impl Admin {
    async fn start(database_url: &str) -> Self {
        let stub = StubWorker::start().await;
        let mut config = gateway_config(database_url, std::slice::from_ref(&stub.url));
        config.admin_jwt_secret = Some(Secret::new(SECRET).unwrap());
        config.key_cache_ms = 200;
        let gw = RunningGateway::start(config).await;
        let url = gw.admin_url.clone().expect("admin listener is on");
        Self {
            gw,
            url,
            http: reqwest::Client::new(),
            _stub: stub,
        }
    }

    fn token(&self, role: Role) -> String {
        self.gw
            .admin_tokens
            .as_ref()
            .unwrap()
            .issue("test", role, 600)
            .unwrap()
    }

    async fn call_raw(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let url = format!("{}{path}", self.url);
        let mut req = match method {
            "get" => self.http.get(url),
            "post" => self.http.post(url),
            "put" => self.http.put(url),
            other => panic!("method {other}"),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.unwrap()
    }

    async fn call(
        &self,
        role: Role,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let r = self
            .call_raw(Some(&self.token(role)), method, path, body.as_ref())
            .await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn ok(&self, role: Role, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(role, method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }
}

/// A usage record of `tenant` / `key` at `at` ms.
fn record(id: &str, tenant: &str, key: &str, at: i64, p: i64, c: i64, d: Delivery) -> UsageEvent {
    UsageEvent::builder(id, tenant)
        .key(key)
        .model(STUB_CHAT_MODEL)
        .tokens(p, c)
        .at(at, 7)
        .delivery(d)
        .build()
}

fn last_month() -> String {
    let now = billing::now_ms();
    let (start, _) = period_bounds(&billing::period_of(now)).unwrap();
    billing::period_of(start - 1)
}

/// Two tenants, each with a key made through the API and usage last month and today.
struct Seeded {
    a: String,
    b: String,
    a_key: String,
    a_key_plain: String,
    b_key: String,
    a_invoice: String,
    b_invoice: String,
    period: String,
    from_s: i64,
    to_s: i64,
}

const PRICE_IN: i64 = 150; // minor units per million prompt tokens
const PRICE_OUT: i64 = 600;
/// Tenant A has 30 records, tenant B more: a read that returned the wrong tenant's usage
/// would show a different count, not the same one.
const A_RECORDS: i64 = 30;
const B_RECORDS: i64 = 42;

async fn seed(admin: &Admin) -> Seeded {
    let mut ids = Vec::new();
    for name in ["acme", "globex"] {
        let made = admin
            .ok(
                Role::Operator,
                "post",
                "/admin/v1/tenants",
                Some(json!({ "name": name })),
            )
            .await;
        ids.push(made["id"].as_str().unwrap().to_owned());
    }
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let made = admin
        .ok(
            Role::Operator,
            "post",
            &format!("/admin/v1/tenants/{a}/keys"),
            Some(json!({"name": "prod"})),
        )
        .await;
    let a_key = made["record"]["id"].as_str().unwrap().to_owned();
    let a_key_plain = made["key"].as_str().unwrap().to_owned();
    let b_key = admin
        .ok(
            Role::Operator,
            "post",
            &format!("/admin/v1/tenants/{b}/keys"),
            Some(json!({"name": "prod"})),
        )
        .await["record"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    admin
        .ok(
            Role::Finance,
            "post",
            "/admin/v1/prices",
            Some(
                json!({"model": STUB_CHAT_MODEL, "input_minor_per_mtok": PRICE_IN,
                "output_minor_per_mtok": PRICE_OUT, "effective_from": 0}),
            ),
        )
        .await;
    let period = last_month();
    let (start, _) = period_bounds(&period).unwrap();
    let now = billing::now_ms();
    let mut events = Vec::new();
    for i in 0..B_RECORDS {
        // Spread over last month's days and today's hours.
        let at = if i % 2 == 0 {
            start + i * 86_400_000 / 2 + 1_000
        } else {
            now - i * 60_000
        };
        let d = if i % 10 == 9 {
            Delivery::Undelivered
        } else {
            Delivery::Delivered
        };
        if i < A_RECORDS {
            events.push(record(
                &format!("req_a{i}"),
                &a,
                &a_key,
                at,
                1_000 + i,
                500,
                d,
            ));
        }
        events.push(record(
            &format!("req_b{i}"),
            &b,
            &b_key,
            at,
            7_000,
            3_000 + i,
            Delivery::Delivered,
        ));
    }
    Ledger::new(admin.gw.db.clone())
        .record_batch(&events)
        .await
        .unwrap();
    let mut invoices = Vec::new();
    for t in [&a, &b] {
        let inv = admin
            .ok(
                Role::Finance,
                "post",
                &format!("/admin/v1/tenants/{t}/invoices"),
                Some(json!({"period": period})),
            )
            .await;
        invoices.push(inv["id"].as_str().unwrap().to_owned());
    }
    Seeded {
        a,
        b,
        a_key,
        a_key_plain,
        b_key,
        a_invoice: invoices[0].clone(),
        b_invoice: invoices[1].clone(),
        period,
        from_s: start / 1000,
        to_s: now / 1000 + 1,
    }
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

async fn bad_tokens_are_refused(admin: &Admin) {
    let path = "/admin/v1/tenants";
    let now = (billing::now_ms() / 1000) as u64;
    // Every claim valid but the one a case is about.
    let claims = |role: &str, exp: u64| {
        json!({"sub": "x", "role": role, "iss": "metering-gateway",
        "aud": "metering-gateway-admin", "iat": now - 600, "nbf": now - 600, "exp": exp,
        "jti": "6d1f3c9e-0b7a-4e59-9a43-1f2d3c4b5a69"})
    };
    let later = now + 600;
    let good = admin.token(Role::Finance);
    let (head, _) = good.split_once('.').unwrap();
    let sig = good.rsplit_once('.').unwrap().1;
    let hs = |alg: jsonwebtoken::Algorithm, c: &Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            c,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    // Correctly signed with the gateway's secret: refused only for its claims.
    let hs256 = |c: &Value| Some(hs(jsonwebtoken::Algorithm::HS256, c, SECRET));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("not a JWT", Some("hello".into())),
        (
            "a consumer API key",
            Some("sk-gw-0123456789abcdef-0123456789abcdef0123456789abcdefABCDEF".into()),
        ),
        (
            "signed with another secret",
            Some(hs(
                jsonwebtoken::Algorithm::HS256,
                &claims("admin", later),
                "another-secret-of-enough-length-xxxxxxxx",
            )),
        ),
        (
            "expired",
            hs256(&claims("admin", (billing::now_ms() / 1000) as u64 - 60)),
        ),
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims("admin", later))
            )),
        ),
        (
            "HS512 with the right secret (algorithm pinned)",
            Some(hs(
                jsonwebtoken::Algorithm::HS512,
                &claims("admin", later),
                SECRET,
            )),
        ),
        (
            "RS256 header over a correct HMAC made with the verification key (key confusion)",
            Some(key_confusion(&claims("admin", later))),
        ),
        (
            "finance token with its role edited to admin",
            Some(format!("{head}.{}.{sig}", b64(&claims("admin", later)))),
        ),
        ("no issuer", hs256(&without(claims("admin", later), "iss"))),
        (
            "another issuer, every other claim valid",
            hs256(&with(
                claims("admin", later),
                "iss",
                json!("metering-gateway-staging"),
            )),
        ),
        (
            "another audience",
            hs256(&with(
                claims("admin", later),
                "aud",
                json!("metering-gateway"),
            )),
        ),
        (
            "no audience",
            hs256(&without(claims("admin", later), "aud")),
        ),
        (
            "not valid before a minute from now",
            hs256(&with(claims("admin", later), "nbf", json!(now + 60))),
        ),
        (
            "lifetime over the maximum (a day)",
            hs256(&with(
                claims("admin", later),
                "iat",
                json!(later - 86_400 - 3_600),
            )),
        ),
        ("no iat", hs256(&without(claims("admin", later), "iat"))),
        ("no jti", hs256(&without(claims("admin", later), "jti"))),
        ("unknown role", hs256(&claims("root", later))),
    ];
    for (what, token) in cases {
        let r = admin.call_raw(token.as_deref(), "get", path, None).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer", "{what}");
        let body: Value = r.json().await.unwrap();
        let code = body["error"]["code"].as_str().unwrap();
        let expected = if what == "expired" {
            "token_expired"
        } else {
            "invalid_token"
        };
        assert_eq!(code, expected, "{what}");
    }
    // The good token itself works, and so does each case's claims set signed correctly
    // with HS256: the refusals above are about the token, not the route.
    let r = admin.call_raw(Some(&good), "get", path, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let valid = hs(
        jsonwebtoken::Algorithm::HS256,
        &claims("admin", later),
        SECRET,
    );
    let r = admin.call_raw(Some(&valid), "get", path, None).await;
    assert_eq!(r.status(), StatusCode::OK);
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

/// A token whose header names RS256 but whose signature is a correct HMAC-SHA256 made
/// with the verifier's key bytes as the secret — what key confusion produces. Its
/// signature is checked here, so only the algorithm policy can refuse it.
fn key_confusion(claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "RS256", "typ": "JWT"})),
        b64(claims)
    );
    let alg = jsonwebtoken::Algorithm::HS256;
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        alg,
    )
    .unwrap();
    let key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes());
    assert!(jsonwebtoken::crypto::verify(&sig, input.as_bytes(), &key, alg).unwrap());
    format!("{input}.{sig}")
}

/// A token revoked by its `jti` is refused from the very next request, on this replica
/// and on a second one sharing the store; other tokens keep working.
async fn revoked_tokens_are_refused(admin: &Admin, database_url: &str) {
    let other = Admin::start(database_url).await;
    let victim = admin.token(Role::Operator);
    let jti = admin
        .gw
        .admin_tokens
        .as_ref()
        .unwrap()
        .verify(&victim)
        .unwrap()
        .jti;
    for a in [admin, &other] {
        let r = a
            .call_raw(Some(&victim), "get", "/admin/v1/whoami", None)
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let started = std::time::Instant::now();
    let revoked = admin
        .ok(
            Role::Admin,
            "post",
            &format!("/admin/v1/tokens/{jti}/revoke"),
            None,
        )
        .await;
    assert_eq!(revoked["jti"], jti.as_str());
    assert_eq!(revoked["revoked_by"], "test");
    for (replica, a) in [("this", admin), ("another", &other)] {
        let r = a
            .call_raw(Some(&victim), "get", "/admin/v1/tenants", None)
            .await;
        println!(
            "revoked admin token refused by {replica} replica {} ms after the revoke call",
            started.elapsed().as_millis()
        );
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{replica} replica");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "token_revoked");
    }
    // Revoking again keeps the first record; a fresh token of the same role works.
    let again = admin
        .ok(
            Role::Admin,
            "post",
            &format!("/admin/v1/tokens/{jti}/revoke"),
            None,
        )
        .await;
    assert_eq!(again["revoked_at"], revoked["revoked_at"]);
    admin
        .ok(Role::Operator, "get", "/admin/v1/whoami", None)
        .await;
    let (status, _) = admin
        .call(
            Role::Admin,
            "post",
            &format!("/admin/v1/tokens/{}/revoke", "x".repeat(129)),
            None,
        )
        .await;
    assert_eq!(status, 400);
    other.gw.stop().await;
}

/// Fills a path template with the seeded ids; gives the query and body each operation needs.
fn concrete(s: &Seeded, method: &str, template: &str, n: usize) -> (String, Option<Value>) {
    let path = template
        .replace("{tenant}", &s.a)
        .replace("{key}", &s.a_key)
        .replace("{invoice}", &s.a_invoice)
        .replace("{jti}", &format!("never-issued-{n}"));
    let query = match template {
        "/admin/v1/usage" => format!("?from={}&to={}&bucket=day&group_by=model", s.from_s, s.to_s),
        "/admin/v1/usage/top" => format!("?by=key&from={}&to={}", s.from_s, s.to_s),
        "/admin/v1/tenants/{tenant}/invoices/preview" | "/admin/v1/reconcile" => {
            format!("?period={}", s.period)
        }
        "/admin/v1/exports/usage" => format!("?period={}&format=json", s.period),
        _ => String::new(),
    };
    let body = match (method, template) {
        ("post", "/admin/v1/tenants") => Some(json!({"name": format!("new-tenant-{n}")})),
        ("put", "/admin/v1/tenants/{tenant}/plan") => Some(json!({"plan": null})),
        ("post", "/admin/v1/plans") => {
            Some(json!({"name": format!("plan-{n}"), "limits": {"requests_per_minute": 60}}))
        }
        ("post", "/admin/v1/prices") => Some(json!({"model": "other-model",
            "input_minor_per_mtok": 1, "output_minor_per_mtok": 2, "effective_from": 1_000 + n})),
        ("post", "/admin/v1/tenants/{tenant}/keys") => Some(json!({"name": format!("k{n}")})),
        ("post", "/admin/v1/tenants/{tenant}/invoices") => Some(json!({"period": s.period})),
        ("post", "/admin/v1/tenants/{tenant}/keys/{key}/rotate") => {
            Some(json!({"grace_seconds": 3600}))
        }
        _ => None,
    };
    (path + &query, body)
}

/// Every operation, by every role: refused with 403 exactly where the document's
/// `x-permission` is not the role's, otherwise a documented status. Returns the responses
/// as samples for the schema check.
async fn roles_follow_the_document(admin: &Admin, s: &Seeded, doc: &Value) -> Vec<Value> {
    let mut samples = Vec::new();
    let mut n = 0;
    for role in [Role::Admin, Role::Operator, Role::Finance] {
        for (method, template) in OPERATIONS {
            n += 1;
            let op = &doc["paths"][template][method];
            assert!(
                op.is_object(),
                "{method} {template} is not in the OpenAPI document"
            );
            let permission = op["x-permission"].as_str();
            let allowed = permission.is_none_or(|p| {
                role.permissions()
                    .iter()
                    .any(|q| serde_json::to_value(q).unwrap() == p)
            });
            let (path, body) = concrete(s, method, template, n);
            let r = admin
                .call_raw(Some(&admin.token(role)), method, &path, body.as_ref())
                .await;
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned());
            let text = r.text().await.unwrap();
            if allowed {
                assert!(
                    status < 400 || status == 409,
                    "{role:?} {method} {path}: {status} {text}"
                );
            } else {
                assert_eq!(
                    status, 403,
                    "{role:?} {method} {path} must be forbidden: {text}"
                );
            }
            let body = content_type
                .as_deref()
                .filter(|c| c.starts_with("application/json"))
                .and_then(|_| serde_json::from_str::<Value>(&text).ok());
            samples.push(json!({"method": method, "path": template, "status": status,
                "content_type": content_type, "body": body}));
        }
    }
    samples
}

/// Tenant A's paths with tenant B's objects are "not found"; filters never leak B.
async fn tenants_are_isolated(admin: &Admin, s: &Seeded) {
    let a = &s.a;
    for (method, path, body) in [
        (
            "get",
            format!("/admin/v1/tenants/{a}/keys/{}", s.b_key),
            None,
        ),
        (
            "post",
            format!("/admin/v1/tenants/{a}/keys/{}/revoke", s.b_key),
            None,
        ),
        (
            "post",
            format!("/admin/v1/tenants/{a}/keys/{}/rotate", s.b_key),
            Some(json!({})),
        ),
        (
            "get",
            format!("/admin/v1/tenants/{a}/invoices/{}", s.b_invoice),
            None,
        ),
        (
            "get",
            format!("/admin/v1/tenants/{a}/invoices/{}?format=json", s.b_invoice),
            None,
        ),
        (
            "get",
            format!("/admin/v1/tenants/{a}/invoices/{}/trace", s.b_invoice),
            None,
        ),
        ("get", "/admin/v1/tenants/tn_nobody/keys".to_owned(), None),
        (
            "post",
            "/admin/v1/tenants/tn_nobody/keys".to_owned(),
            Some(json!({})),
        ),
        ("get", "/admin/v1/tenants/tn_nobody".to_owned(), None),
        (
            "put",
            "/admin/v1/tenants/tn_nobody/plan".to_owned(),
            Some(json!({"plan": null})),
        ),
        (
            "get",
            "/admin/v1/tenants/tn_nobody/invoices".to_owned(),
            None,
        ),
        (
            "post",
            "/admin/v1/tenants/tn_nobody/invoices".to_owned(),
            Some(json!({"period": s.period})),
        ),
        (
            "get",
            format!(
                "/admin/v1/tenants/tn_nobody/invoices/preview?period={}",
                s.period
            ),
            None,
        ),
        (
            "get",
            format!(
                "/admin/v1/exports/usage?period={}&tenant=tn_nobody",
                s.period
            ),
            None,
        ),
    ] {
        let (status, v) = admin.call(Role::Admin, method, &path, body).await;
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    // B's key is untouched by the attempts through A's path.
    let b_key = admin
        .ok(
            Role::Admin,
            "get",
            &format!("/admin/v1/tenants/{}/keys/{}", s.b, s.b_key),
            None,
        )
        .await;
    assert!(b_key["revoked_at"].is_null());

    let keys = admin
        .ok(
            Role::Admin,
            "get",
            &format!("/admin/v1/tenants/{a}/keys"),
            None,
        )
        .await;
    for k in keys["data"].as_array().unwrap() {
        assert_eq!(k["tenant_id"], a.as_str());
        assert!(k.get("secret_hash").is_none() && k.get("key").is_none());
    }
    let invoices = admin
        .ok(
            Role::Admin,
            "get",
            &format!("/admin/v1/tenants/{a}/invoices"),
            None,
        )
        .await;
    let ids: Vec<&str> = invoices["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![s.a_invoice.as_str()]);

    let q = format!("from={}&to={}", s.from_s, s.to_s);
    let series = admin
        .ok(
            Role::Admin,
            "get",
            &format!("/admin/v1/usage?{q}&tenant={a}&group_by=tenant"),
            None,
        )
        .await;
    for p in series["data"].as_array().unwrap() {
        assert_eq!(p["group"], a.as_str());
    }
    let top = admin
        .ok(
            Role::Admin,
            "get",
            &format!("/admin/v1/usage/top?by=key&{q}&tenant={a}"),
            None,
        )
        .await;
    let top_keys: Vec<&str> = top["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(top_keys, vec![s.a_key.as_str()]);
    let export = admin
        .call_raw(
            Some(&admin.token(Role::Admin)),
            "get",
            &format!(
                "/admin/v1/exports/usage?period={}&tenant={a}&format=json",
                s.period
            ),
            None,
        )
        .await;
    let rows: Vec<Value> = export.json().await.unwrap();
    assert_eq!(rows.len() as i64, A_RECORDS / 2);
    assert!(rows.iter().all(|r| r["tenant_id"] == a.as_str()));

    // The consumer side: A's key sees A's usage only.
    let own = consumer_usage(admin, &s.a_key_plain, s).await;
    let totals = |v: &Value, field: &str| -> i64 {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[field].as_i64().unwrap())
            .sum()
    };
    assert_eq!(totals(&own, "requests"), A_RECORDS);
    assert_eq!(
        totals(&own, "prompt_tokens"),
        (0..A_RECORDS).map(|i| 1_000 + i).sum::<i64>()
    );
    // And B's key sees B's, which differ in count and in tokens.
    let b_key_plain = admin
        .ok(
            Role::Operator,
            "post",
            &format!("/admin/v1/tenants/{}/keys", s.b),
            Some(json!({"name": "reader"})),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let theirs = consumer_usage(admin, &b_key_plain, s).await;
    assert_eq!(totals(&theirs, "requests"), B_RECORDS);
    assert_eq!(
        totals(&theirs, "completion_tokens"),
        (0..B_RECORDS).map(|i| 3_000 + i).sum::<i64>()
    );
}

/// `/v1/usage` as `key` sees it over the seeded window.
async fn consumer_usage(admin: &Admin, key: &str, s: &Seeded) -> Value {
    let r = admin
        .http
        .get(format!(
            "{}/v1/usage?start={}&end={}",
            admin.gw.url, s.from_s, s.to_s
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

/// Series and leader boards equal sums computed here from the seeded records.
async fn figures_add_up(admin: &Admin, s: &Seeded) {
    // Tenant A: 30 records, prompt 1000+i, completion 500, i%10==9 not delivered.
    let billed: Vec<i64> = (0..30).filter(|i| i % 10 != 9).collect();
    let a_prompt: i64 = (0..30).map(|i| 1_000 + i).sum();
    let a_spend: i64 = billed
        .iter()
        .map(|i| (1_000 + i) * PRICE_IN + 500 * PRICE_OUT)
        .sum();
    let b_spend: i64 = (0..B_RECORDS)
        .map(|i| 7_000 * PRICE_IN + (3_000 + i) * PRICE_OUT)
        .sum();
    for bucket in ["hour", "day"] {
        let v = admin
            .ok(
                Role::Finance,
                "get",
                &format!(
                    "/admin/v1/usage?from={}&to={}&bucket={bucket}&tenant={}",
                    s.from_s, s.to_s, s.a
                ),
                None,
            )
            .await;
        assert_eq!(v["totals"]["requests"], A_RECORDS, "{bucket}");
        assert_eq!(v["totals"]["prompt_tokens"], a_prompt, "{bucket}");
        assert_eq!(v["totals"]["completion_tokens"], 30 * 500, "{bucket}");
        assert_eq!(v["totals"]["unbilled_requests"], 3, "{bucket}");
        assert_eq!(v["totals"]["spend_micros"], a_spend, "{bucket}");
        let starts: Vec<i64> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["start_ms"].as_i64().unwrap())
            .collect();
        let width = if bucket == "hour" {
            3_600_000
        } else {
            86_400_000
        };
        assert!(starts.windows(2).all(|w| w[0] < w[1]) && starts.iter().all(|t| t % width == 0));
    }
    let top = admin
        .ok(
            Role::Operator,
            "get",
            &format!(
                "/admin/v1/usage/top?by=tenant&from={}&to={}",
                s.from_s, s.to_s
            ),
            None,
        )
        .await;
    let data = top["data"].as_array().unwrap();
    assert_eq!(data[0]["id"], s.b.as_str());
    assert_eq!(data[0]["name"], "globex");
    assert_eq!(data[0]["spend_micros"], b_spend);
    assert_eq!(data[1]["id"], s.a.as_str());
    assert_eq!(data[1]["spend_micros"], a_spend);
    // The finalised invoice bills last month's delivered records, rounded once per line.
    let inv = admin
        .ok(
            Role::Finance,
            "get",
            &format!("/admin/v1/tenants/{}/invoices/{}", s.a, s.a_invoice),
            None,
        )
        .await;
    let last_month_spend: i64 = (0..30)
        .filter(|i| i % 2 == 0 && i % 10 != 9)
        .map(|i| (1_000 + i) * PRICE_IN + 500 * PRICE_OUT)
        .sum();
    assert_eq!(inv["lines"][0]["amount_micros"], last_month_spend);
}

/// Downloads equal what the ledger's own export and the stored document give.
async fn exports_are_exact(admin: &Admin, s: &Seeded) {
    let fin = admin.token(Role::Finance);
    for format in ["csv", "json"] {
        let r = admin
            .call_raw(
                Some(&fin),
                "get",
                &format!(
                    "/admin/v1/exports/usage?period={}&format={format}",
                    s.period
                ),
                None,
            )
            .await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment"));
        let got = r.bytes().await.unwrap();
        let (from_ms, to_ms) = period_bounds(&s.period).unwrap();
        let mut expected = Vec::new();
        billing::export::export_usage(
            &admin.gw.db,
            &billing::export::UsageSelection {
                tenant_id: None,
                from_ms,
                to_ms,
            },
            format.parse().unwrap(),
            &mut expected,
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(got.as_ref(), expected.as_slice(), "{format}");
    }
    let doc = admin
        .call_raw(
            Some(&fin),
            "get",
            &format!(
                "/admin/v1/tenants/{}/invoices/{}?format=json",
                s.a, s.a_invoice
            ),
            None,
        )
        .await
        .text()
        .await
        .unwrap();
    let stored = billing::Invoices::new(admin.gw.db.clone())
        .document(&s.a_invoice)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc, stored);
    let csv = admin
        .call_raw(
            Some(&fin),
            "get",
            &format!(
                "/admin/v1/tenants/{}/invoices/{}?format=csv",
                s.a, s.a_invoice
            ),
            None,
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("invoice_id,kind,"));
    assert_eq!(csv.lines().count(), 2, "{csv}");
    let trace = admin
        .call_raw(
            Some(&fin),
            "get",
            &format!("/admin/v1/tenants/{}/invoices/{}/trace", s.a, s.a_invoice),
            None,
        )
        .await
        .text()
        .await
        .unwrap();
    // Header + the 15 records of last month.
    assert_eq!(trace.lines().count(), 16, "{trace}");
}

/// Keys made, rotated and revoked through the API work and stop working on the consumer API.
async fn key_lifecycle(admin: &Admin, s: &Seeded) {
    let chat = |key: String| {
        let http = admin.http.clone();
        let url = format!("{}/v1/chat/completions", admin.gw.url);
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"model": STUB_CHAT_MODEL, "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let made = admin
        .ok(
            Role::Operator,
            "post",
            &format!("/admin/v1/tenants/{}/keys", s.b),
            Some(json!({"name": "ci"})),
        )
        .await;
    let plain = made["key"].as_str().unwrap().to_owned();
    let id = made["record"]["id"].as_str().unwrap().to_owned();
    assert_eq!(chat(plain.clone()).await, 200);
    // The plaintext is never shown again.
    let listed = admin
        .ok(
            Role::Operator,
            "get",
            &format!("/admin/v1/tenants/{}/keys", s.b),
            None,
        )
        .await
        .to_string();
    assert!(!listed.contains(&plain[10..]));

    let rotated = admin
        .ok(
            Role::Operator,
            "post",
            &format!("/admin/v1/tenants/{}/keys/{id}/rotate", s.b),
            Some(json!({"grace_seconds": 0})),
        )
        .await;
    let new_plain = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(rotated["record"]["name"], "ci");
    assert_eq!(chat(new_plain.clone()).await, 200);
    wait_refused(&chat, &plain).await;

    let revoked = admin
        .ok(
            Role::Operator,
            "post",
            &format!(
                "/admin/v1/tenants/{}/keys/{}/revoke",
                s.b,
                rotated["record"]["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert!(revoked["revoked_at"].is_i64());
    wait_refused(&chat, &new_plain).await;
}

async fn wait_refused<F, Fut>(chat: &F, key: &str)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let status = chat(key.to_owned()).await;
        if status == 401 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "key still accepted: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call to sample: method, documented path, real path, JSON body, bearer key.
pub(crate) type Call<'a> = (&'a str, &'a str, String, Option<Value>, Option<&'a str>);

/// Makes each call and keeps what came back, as [`check_with_python`] reads it.
pub(crate) async fn sample_calls(base_url: &str, calls: Vec<Call<'_>>) -> Vec<Value> {
    let http = reqwest::Client::new();
    let mut samples = Vec::new();
    for (method, template, path, body, key) in calls {
        let url = format!("{base_url}{path}");
        let mut req = if method == "get" {
            http.get(url)
        } else {
            http.post(url)
        };
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Option<Value> = r.json().await.ok();
        samples.push(
            serde_json::json!({"method": method, "path": template, "status": status,
            "content_type": ct, "body": body}),
        );
    }
    samples
}

pub(crate) fn check_with_python(doc: &str, samples: &[Value]) {
    let dir = std::env::temp_dir().join(format!("gw-openapi-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("openapi.json"), doc).unwrap();
    std::fs::write(
        dir.join("samples.json"),
        serde_json::to_vec(samples).unwrap(),
    )
    .unwrap();
    let python = workspace_root().join("target/sdk-venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make test`, which creates it",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(workspace_root().join("tests/openapi/check_openapi.py"))
        .arg(dir.join("openapi.json"))
        .arg(dir.join("samples.json"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "OpenAPI check failed:\n{report}");
}

async fn public_samples(admin: &Admin, s: &Seeded) -> Vec<Value> {
    let mut samples = Vec::new();
    let gw = &admin.gw.url;
    type Call<'a> = (&'a str, &'a str, String, Option<Value>, Option<&'a str>);
    let calls: Vec<Call> = vec![
        (
            "get",
            "/v1/models",
            "/v1/models".into(),
            None,
            Some(&s.a_key_plain),
        ),
        (
            "get",
            "/v1/usage",
            "/v1/usage".into(),
            None,
            Some(&s.a_key_plain),
        ),
        ("get", "/v1/usage", "/v1/usage".into(), None, None),
        (
            "get",
            "/v1/models/{id}",
            format!("/v1/models/{STUB_CHAT_MODEL}"),
            None,
            Some(&s.a_key_plain),
        ),
        (
            "get",
            "/v1/models/{id}",
            "/v1/models/no-such-model".into(),
            None,
            Some(&s.a_key_plain),
        ),
        ("get", "/health", "/health".into(), None, None),
        (
            "post",
            "/v1/chat/completions",
            "/v1/chat/completions".into(),
            Some(
                json!({"model": STUB_CHAT_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}),
            ),
            Some(&s.a_key_plain),
        ),
        (
            "post",
            "/v1/chat/completions",
            "/v1/chat/completions".into(),
            Some(json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})),
            Some(&s.a_key_plain),
        ),
        (
            "post",
            "/v1/embeddings",
            "/v1/embeddings".into(),
            Some(json!({"model": e2e_tests::stub::STUB_EMBEDDING_MODEL, "input": ["a", "b"]})),
            Some(&s.a_key_plain),
        ),
    ];
    samples.extend(sample_calls(gw, calls).await);
    samples
}

async fn admin_api(database_url: &str) {
    let admin = Admin::start(database_url).await;
    // The document is served by the gateway itself.
    let doc_text = admin
        .http
        .get(format!("{}/openapi.json", admin.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&doc_text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    // The document lists exactly the router's operations.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), p.clone()))
        })
        .filter(|(_, p)| p.starts_with("/admin/"))
        .collect();
    let routed: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, routed);
    let public: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .filter(|p| !p.starts_with("/admin/"))
        .collect();
    assert_eq!(
        public,
        gateway::consumer::PUBLIC_PATHS
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
    );

    bad_tokens_are_refused(&admin).await;
    revoked_tokens_are_refused(&admin, database_url).await;
    let seeded = seed(&admin).await;
    figures_add_up(&admin, &seeded).await;
    exports_are_exact(&admin, &seeded).await;
    tenants_are_isolated(&admin, &seeded).await;
    let mut samples = roles_follow_the_document(&admin, &seeded, &doc).await;
    // Operations in no path: an unknown admin path is a JSON 404.
    let (status, v) = admin
        .call(Role::Admin, "get", "/admin/v1/nothing", None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    samples.extend(public_samples(&admin, &seeded).await);
    check_with_python(&doc_text, &samples);
    key_lifecycle(&admin, &seeded).await;

    // The dashboard is served from the binary with a strict content policy.
    let page = admin
        .http
        .get(format!("{}/", admin.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    admin.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_admin_api() {
    let store = TempSqlite::new();
    admin_api(&store.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_admin_api() {
    let pg = TempPostgres::new().await;
    admin_api(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_off_without_a_secret() {
    let store = TempSqlite::new();
    let stub = StubWorker::start().await;
    let gw =
        RunningGateway::start(gateway_config(&store.url, std::slice::from_ref(&stub.url))).await;
    assert!(gw.admin_url.is_none());
    // And the consumer listener never serves admin routes.
    let r = reqwest::get(format!("{}/admin/v1/tenants", gw.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    gw.stop().await;
}
