//! The price book: versioned prices per model, and exact cost arithmetic.
//!
//! Prices are integer minor units (cents for USD) per million input tokens, per million
//! output tokens and per million requests. The cost of any usage is therefore an exact
//! integer in millionths of a minor unit ([`Micros`]); nothing is rounded until an amount
//! is shown or invoiced, and then only by [`Micros::to_minor_half_even`], the one rounding
//! step of the ledger.
//!
//! A version may have volume tiers: from `from_tokens` on, tokens cost the tier's rates
//! instead of the base ones (graduated: each token at the rate of the tier its position
//! falls in). Input and output tokens climb the tiers separately. The volume is that of one
//! invoice line: a tenant's delivered usage of the model in one month under one version
//! (late usage, billed as an adjustment line, climbs from zero on its own line).
//!
//! A version may also set a cached-input rate: prompt tokens a worker read from its prefix
//! cache then cost that flat rate and do not climb the tiers; unset, they are input tokens
//! like any other. Responses served whole from the gateway's response cache are not priced
//! by tokens at all: each costs the cache-hit rate recorded with it ([`cache_hit_cost`]).

use sqlx::Row;

use crate::{Db, DbError};

/// Millionths of a minor unit: the exact unit of every cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

impl Micros {
    pub const PER_MINOR: i64 = 1_000_000;

    pub fn from_minor(minor: i64) -> Self {
        Self(minor.saturating_mul(Self::PER_MINOR))
    }

    /// Rounds to whole minor units, half to even: the ledger's one rounding step.
    pub fn to_minor_half_even(self) -> i64 {
        let q = self.0.div_euclid(Self::PER_MINOR);
        let r = self.0.rem_euclid(Self::PER_MINOR);
        match r.cmp(&(Self::PER_MINOR / 2)) {
            std::cmp::Ordering::Less => q,
            std::cmp::Ordering::Greater => q + 1,
            std::cmp::Ordering::Equal => q + (q & 1),
        }
    }
}

/// One version of a model's price.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Price {
    pub model: String,
    /// Unix ms from which this version applies (inclusive).
    pub effective_from: i64,
    pub currency: String,
    pub input_minor_per_mtok: i64,
    pub output_minor_per_mtok: i64,
    pub request_minor_per_mreq: i64,
    /// Rate of prompt tokens read from a worker's prefix cache; `None`: the input rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_minor_per_mtok: Option<i64>,
    /// Percent taken off the charge of batch lines (1–100); `None`: they cost what
    /// interactive calls do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_discount_pct: Option<i64>,
    /// Volume tiers above the base rates, by increasing `from_tokens`; empty: flat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
}

/// Rates that apply from a token volume on (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub from_tokens: i64,
    pub input_minor_per_mtok: i64,
    pub output_minor_per_mtok: i64,
}

/// What a set of calls used, as a price reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub requests: i64,
    /// Every prompt token, cached ones included.
    pub input: i64,
    /// Of `input`, those read from a worker's prefix cache.
    pub cached_input: i64,
    pub output: i64,
}

/// The exact cost of `hits` responses served from the response cache at `rate` minor units
/// per million.
pub fn cache_hit_cost(hits: i64, rate: i64) -> Micros {
    Micros(hits.saturating_mul(rate))
}

impl Price {
    /// The exact cost of `requests` calls using `input` and `output` tokens, the tokens
    /// counted from the start of the volume (the first tokens of an invoice line).
    pub fn cost(&self, requests: i64, input: i64, output: i64) -> Micros {
        self.cost_from(0, 0, requests, input, output)
    }

    /// As [`Price::cost`], for tokens that come after `input_before` and `output_before`
    /// tokens of the same volume: each token costs the rate of the tier its position is in.
    pub fn cost_from(
        &self,
        input_before: i64,
        output_before: i64,
        requests: i64,
        input: i64,
        output: i64,
    ) -> Micros {
        let inputs = self.graduated(input_before, input, |t| t.input_minor_per_mtok);
        let outputs = self.graduated(output_before, output, |t| t.output_minor_per_mtok);
        Micros(
            inputs
                .saturating_add(outputs)
                .saturating_add(requests.saturating_mul(self.request_minor_per_mreq)),
        )
    }

    /// The exact cost of `usage` after `before` (input, output) tokens of the same volume:
    /// cached prompt tokens at the cached-input rate when the version has one, every other
    /// token as [`Price::cost_from`] prices it.
    pub fn charge(&self, before: (i64, i64), usage: &Tokens) -> Micros {
        let Some(rate) = self.cached_input_minor_per_mtok else {
            return self.cost_from(
                before.0,
                before.1,
                usage.requests,
                usage.input,
                usage.output,
            );
        };
        let cached = usage.cached_input.clamp(0, usage.input.max(0));
        let rest = self.cost_from(
            before.0,
            before.1,
            usage.requests,
            usage.input - cached,
            usage.output,
        );
        Micros(rest.0.saturating_add(cached.saturating_mul(rate)))
    }

    /// The (input, output) tokens of `usage` that climb the tiers: cached prompt tokens
    /// priced at their own rate do not.
    pub fn volume(&self, usage: &Tokens) -> (i64, i64) {
        let input = match self.cached_input_minor_per_mtok {
            Some(_) => usage.input - usage.cached_input.clamp(0, usage.input.max(0)),
            None => usage.input,
        };
        (input, usage.output)
    }

    /// The highest rates of any tier: what admission reserves, so a spend cap is never
    /// under-counted whatever volume a tenant is at.
    pub fn ceiling(&self) -> Price {
        let mut top = self.clone();
        for t in &self.tiers {
            top.input_minor_per_mtok = top.input_minor_per_mtok.max(t.input_minor_per_mtok);
            top.output_minor_per_mtok = top.output_minor_per_mtok.max(t.output_minor_per_mtok);
        }
        // Whether a prompt will be read from a cache is not known before the call.
        if let Some(cached) = top.cached_input_minor_per_mtok.take() {
            top.input_minor_per_mtok = top.input_minor_per_mtok.max(cached);
        }
        top.tiers.clear();
        top
    }

    /// Sum over the tokens in `[before, before + quantity)` of the rate in force at each
    /// position (micros: tokens × minor per million).
    fn graduated(&self, before: i64, quantity: i64, rate: impl Fn(&Tier) -> i64) -> i64 {
        let base = Tier {
            from_tokens: 0,
            input_minor_per_mtok: self.input_minor_per_mtok,
            output_minor_per_mtok: self.output_minor_per_mtok,
        };
        let (start, end) = (before, before.saturating_add(quantity));
        let mut total = 0i64;
        let bands = std::iter::once(&base).chain(self.tiers.iter());
        let mut bands = bands.peekable();
        while let Some(t) = bands.next() {
            let band_end = bands.peek().map_or(i64::MAX, |n| n.from_tokens);
            let lo = start.max(t.from_tokens);
            let hi = end.min(band_end);
            if hi > lo {
                total = total.saturating_add((hi - lo).saturating_mul(rate(t)));
            }
        }
        total
    }

    /// What a batch line costs given its interactive charge: less the version's discount
    /// (rounded down to the millionth of a minor unit).
    pub fn batch_charge(&self, interactive: Micros) -> Micros {
        let pct = self.batch_discount_pct.unwrap_or(0).clamp(0, 100);
        Micros(((i128::from(interactive.0) * i128::from(100 - pct)) / 100) as i64)
    }

    /// Checks the price as [`add_price`] stores it.
    pub fn validate(&self) -> Result<(), PriceError> {
        if self.model.is_empty() {
            return Err(PriceError::Model);
        }
        let rates = [
            self.input_minor_per_mtok,
            self.output_minor_per_mtok,
            self.request_minor_per_mreq,
            self.cached_input_minor_per_mtok.unwrap_or(0),
        ];
        if rates.iter().any(|r| *r < 0)
            || self
                .tiers
                .iter()
                .any(|t| t.input_minor_per_mtok < 0 || t.output_minor_per_mtok < 0)
        {
            return Err(PriceError::Negative);
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(PriceError::Currency);
        }
        if self
            .batch_discount_pct
            .is_some_and(|p| !(1..=100).contains(&p))
        {
            return Err(PriceError::Discount);
        }
        let mut last = 0;
        for t in &self.tiers {
            if t.from_tokens <= last {
                return Err(PriceError::Tiers);
            }
            last = t.from_tokens;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("prices must not be negative")]
    Negative,
    #[error("the currency must be a three-letter ISO 4217 code")]
    Currency,
    #[error("the model name must not be empty")]
    Model,
    #[error("tiers must start above zero tokens, in increasing order")]
    Tiers,
    #[error("a batch discount is a percentage from 1 to 100")]
    Discount,
    #[error("stored tiers of {0} are not readable")]
    StoredTiers(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for PriceError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// All price versions, in memory: small, read on every admission, reloaded from the store.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    /// Per model, versions sorted by `effective_from`.
    versions: std::collections::HashMap<String, Vec<Price>>,
}

impl PriceBook {
    pub fn new(prices: Vec<Price>) -> Self {
        let mut versions: std::collections::HashMap<String, Vec<Price>> = Default::default();
        for p in prices {
            versions.entry(p.model.clone()).or_default().push(p);
        }
        for v in versions.values_mut() {
            v.sort_by_key(|p| p.effective_from);
        }
        Self { versions }
    }

    /// Every version in the store.
    pub async fn load(db: &Db) -> Result<Self, DbError> {
        let rows = sqlx::query(
            "SELECT model, effective_from, currency, input_minor_per_mtok, \
             output_minor_per_mtok, request_minor_per_mreq, tiers, cached_input_minor_per_mtok, \
             batch_discount_pct FROM prices",
        )
        .fetch_all(db.pool())
        .await?;
        let mut prices = Vec::with_capacity(rows.len());
        for r in rows {
            prices.push(Price {
                model: r.try_get("model")?,
                effective_from: r.try_get("effective_from")?,
                currency: r.try_get("currency")?,
                input_minor_per_mtok: r.try_get("input_minor_per_mtok")?,
                output_minor_per_mtok: r.try_get("output_minor_per_mtok")?,
                request_minor_per_mreq: r.try_get("request_minor_per_mreq")?,
                cached_input_minor_per_mtok: r.try_get("cached_input_minor_per_mtok")?,
                batch_discount_pct: r.try_get("batch_discount_pct")?,
                tiers: match r.try_get::<Option<String>, _>("tiers")? {
                    Some(json) => serde_json::from_str(&json).map_err(|e| {
                        DbError::Sqlx(sqlx::Error::Decode(
                            format!("tiers of a price version: {e}").into(),
                        ))
                    })?,
                    None => Vec::new(),
                },
            });
        }
        Ok(Self::new(prices))
    }

    /// The version of `model`'s price in force at `at_ms`; `None`: the model is free.
    pub fn at(&self, model: &str, at_ms: i64) -> Option<&Price> {
        let versions = self.versions.get(model)?;
        let i = versions.partition_point(|p| p.effective_from <= at_ms);
        i.checked_sub(1).map(|i| &versions[i])
    }

    pub fn all(&self) -> impl Iterator<Item = &Price> {
        self.versions.values().flatten()
    }
}

/// Adds a price version. Versions are never edited: a change is a new version.
pub async fn add_price(db: &Db, price: &Price) -> Result<(), PriceError> {
    price.validate()?;
    let tiers = if price.tiers.is_empty() {
        None
    } else {
        serde_json::to_string(&price.tiers).ok()
    };
    sqlx::query(
        "INSERT INTO prices (model, effective_from, currency, input_minor_per_mtok, \
         output_minor_per_mtok, request_minor_per_mreq, created_at, tiers, \
         cached_input_minor_per_mtok, batch_discount_pct) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&price.model)
    .bind(price.effective_from)
    .bind(&price.currency)
    .bind(price.input_minor_per_mtok)
    .bind(price.output_minor_per_mtok)
    .bind(price.request_minor_per_mreq)
    .bind(crate::now_ms())
    .bind(tiers)
    .bind(price.cached_input_minor_per_mtok)
    .bind(price.batch_discount_pct)
    .execute(db.pool())
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(from: i64, input: i64) -> Price {
        Price {
            model: "m".into(),
            effective_from: from,
            currency: "USD".into(),
            input_minor_per_mtok: input,
            output_minor_per_mtok: 2 * input,
            request_minor_per_mreq: 0,
            cached_input_minor_per_mtok: None,
            batch_discount_pct: None,
            tiers: Vec::new(),
        }
    }

    #[test]
    fn tiers_are_graduated_and_additive() {
        // 100 per Mtok up to 1000 tokens, 60 from 1000, 10 from 5000; output flat 200.
        let p = Price {
            tiers: vec![
                Tier {
                    from_tokens: 1000,
                    input_minor_per_mtok: 60,
                    output_minor_per_mtok: 200,
                },
                Tier {
                    from_tokens: 5000,
                    input_minor_per_mtok: 10,
                    output_minor_per_mtok: 200,
                },
            ],
            output_minor_per_mtok: 200,
            ..price(0, 100)
        };
        assert_eq!(p.cost(0, 999, 0), Micros(999 * 100));
        assert_eq!(
            p.cost(0, 6000, 7),
            Micros(1000 * 100 + 4000 * 60 + 1000 * 10 + 7 * 200)
        );
        // Pricing in pieces equals pricing at once, wherever the cuts fall.
        for cut in [0, 1, 999, 1000, 1001, 4999, 5000, 5999, 6000] {
            let a = p.cost_from(0, 0, 0, cut, 0).0 + p.cost_from(cut, 0, 0, 6000 - cut, 0).0;
            assert_eq!(a, p.cost(0, 6000, 0).0, "cut at {cut}");
        }
        assert_eq!(p.ceiling().input_minor_per_mtok, 100);
        let bad = Price {
            tiers: vec![Tier {
                from_tokens: 0,
                input_minor_per_mtok: 1,
                output_minor_per_mtok: 1,
            }],
            ..price(0, 1)
        };
        assert!(matches!(bad.validate(), Err(PriceError::Tiers)));
    }

    #[test]
    fn the_version_in_force_is_the_latest_started() {
        let book = PriceBook::new(vec![price(2000, 20), price(1000, 10), price(3000, 30)]);
        assert!(book.at("m", 999).is_none());
        assert_eq!(book.at("m", 1000).unwrap().input_minor_per_mtok, 10);
        assert_eq!(book.at("m", 2999).unwrap().input_minor_per_mtok, 20);
        assert_eq!(book.at("m", i64::MAX).unwrap().input_minor_per_mtok, 30);
        assert!(book.at("other", 5000).is_none());
    }

    #[test]
    fn costs_are_exact_micros() {
        // 15 cents per million input tokens, 60 per million output, 1 cent per 10k requests.
        let p = Price {
            request_minor_per_mreq: 100,
            output_minor_per_mtok: 60,
            ..price(0, 15)
        };
        assert_eq!(p.cost(1, 1000, 500), Micros(15_000 + 30_000 + 100));
    }

    #[test]
    fn rounding_is_half_to_even() {
        let r = |m| Micros(m).to_minor_half_even();
        assert_eq!(r(1_499_999), 1);
        assert_eq!(r(1_500_000), 2);
        assert_eq!(r(2_500_000), 2);
        assert_eq!(r(2_500_001), 3);
        assert_eq!(r(-1_500_000), -2);
        assert_eq!(r(-2_500_000), -2);
    }

    fn tiered(input: i64, cached: Option<i64>, tiers: &[(i64, i64)]) -> Price {
        Price {
            cached_input_minor_per_mtok: cached,
            batch_discount_pct: None,
            tiers: tiers
                .iter()
                .map(|&(from_tokens, rate)| Tier {
                    from_tokens,
                    input_minor_per_mtok: rate,
                    output_minor_per_mtok: 2 * rate,
                })
                .collect(),
            request_minor_per_mreq: 7,
            ..price(0, input)
        }
    }

    #[test]
    fn cached_tokens_cost_their_own_flat_rate() {
        // 100 per Mtok input (60 from 1000 tokens), cached 10: 400 of 1,500 prompt tokens
        // cached leave 1,100 climbing the tiers.
        let p = tiered(100, Some(10), &[(1000, 60)]);
        let u = Tokens {
            requests: 1,
            input: 1500,
            cached_input: 400,
            output: 3,
        };
        assert_eq!(
            p.charge((0, 0), &u),
            Micros(1000 * 100 + 100 * 60 + 400 * 10 + 3 * 200 + 7)
        );
        assert_eq!(p.volume(&u), (1100, 3));
        // Without a cached rate they are input tokens like any other.
        let plain = tiered(100, None, &[(1000, 60)]);
        assert_eq!(plain.charge((0, 0), &u), plain.cost(1, 1500, 3));
        assert_eq!(plain.volume(&u), (1500, 3));
        // A reservation prices every prompt token at the dearest rate, cached ones included.
        assert_eq!(tiered(10, Some(50), &[]).ceiling().input_minor_per_mtok, 50);
        assert!(matches!(
            tiered(1, Some(-1), &[]).validate(),
            Err(PriceError::Negative)
        ));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_price() -> impl Strategy<Value = Price> {
            (
                0i64..10_000,
                proptest::option::of(0i64..10_000),
                proptest::collection::vec((1i64..5_000, 0i64..10_000), 0..4),
            )
                .prop_map(|(input, cached, mut tiers)| {
                    tiers.sort_unstable();
                    tiers.dedup_by_key(|t| t.0);
                    tiered(input, cached, &tiers)
                })
        }

        fn any_usage() -> impl Strategy<Value = Tokens> {
            (0i64..5, 0i64..20_000, 0i64..20_000, 0i64..20_000).prop_map(
                |(requests, input, cached, output)| Tokens {
                    requests,
                    input,
                    cached_input: cached.min(input),
                    output,
                },
            )
        }

        proptest! {
            /// Pricing usage in two pieces, the second after the first's volume, equals
            /// pricing it at once: invoices, series and exports may cut it anywhere.
            #[test]
            fn charges_add_up_over_any_cut(p in any_price(), a in any_usage(), b in any_usage()) {
                let both = Tokens {
                    requests: a.requests + b.requests,
                    input: a.input + b.input,
                    cached_input: a.cached_input + b.cached_input,
                    output: a.output + b.output,
                };
                let first = p.charge((0, 0), &a);
                let second = p.charge(p.volume(&a), &b);
                prop_assert_eq!(first.0 + second.0, p.charge((0, 0), &both).0);
            }

            /// What admission reserves covers what is charged, whatever part of the prompt a
            /// worker finds cached and wherever in the volume the call falls.
            #[test]
            fn the_ceiling_covers_any_charge(
                p in any_price(), u in any_usage(), before in 0i64..50_000,
            ) {
                let reserved = p.ceiling().cost(u.requests, u.input, u.output);
                prop_assert!(p.charge((before, before), &u) <= reserved);
            }

            /// Without a cached rate, cached tokens change nothing; with one no dearer than
            /// every input rate, they never raise the cost.
            #[test]
            fn cached_tokens_never_cost_more_than_input(p in any_price(), u in any_usage()) {
                let plain = Price { cached_input_minor_per_mtok: None, ..p.clone() };
                prop_assert_eq!(plain.charge((0, 0), &u), plain.cost(u.requests, u.input, u.output));
                let cheapest = std::iter::once(p.input_minor_per_mtok)
                    .chain(p.tiers.iter().map(|t| t.input_minor_per_mtok))
                    .min()
                    .unwrap_or(0);
                if p.cached_input_minor_per_mtok.is_some_and(|c| c <= cheapest) {
                    prop_assert!(p.charge((0, 0), &u) <= plain.charge((0, 0), &u));
                }
            }
        }
    }
}
