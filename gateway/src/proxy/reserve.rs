//! What a call may cost, reserved at admission and settled with what it used.
//!
//! Owns: the cost bound of a call (tokens, and spend at the model's price), computed the
//! same way from the body's token bound at admission and from the counted usage at
//! settlement, and the reservation that carries the price between the two. Must never:
//! price a reservation below what the call can cost (tiered prices count at their highest
//! rates), or settle one reservation twice.
//!
//! A chat call's bound is the body's (prompt bytes, `max_tokens`) cut to the model's
//! context length as its workers state it: the worker never lets prompt and completion
//! together pass it, so a call without `max_tokens` reserves up to the context and is
//! forwarded unchanged. The alternative, capping the call's `max_tokens` at a smaller
//! reserve, would change what the client asked (a shorter answer than OpenAI's semantics
//! give) and rewrite bodies that are otherwise forwarded byte for byte; reserving the
//! context keeps the quota exact without either. Only for a model whose workers state no
//! context length is the configured default completion reserve taken as the bound.

use std::sync::Arc;

use billing::{Price, Tokens};

use super::bound::TokenBound;
use super::call::{CallContext, ProxiedCall};
use crate::error::GatewayError;
use crate::limits::{Admission, Demand, NotAdmitted, Permit, RateHeaders, Scope};
use crate::pricing::PriceCache;

/// A call's reservation and the price it was made at; settled with the real usage.
pub(super) struct Reservation {
    permit: Option<Permit>,
    /// The version's highest rates, with its cached-input rate kept for the settlement:
    /// the reservation, made before anyone knows what will be cached, folds it in.
    price: Option<Price>,
    /// A batch line: settled at the version's batch discount, as its invoice line is.
    batch: bool,
}

impl Reservation {
    /// Reserves the most this call can cost against every limit of its tenant and key.
    pub(super) async fn admit(
        admission: &Arc<Admission>,
        prices: &PriceCache,
        default_completion_reserve: i64,
        context_length: Option<u64>,
        ctx: &CallContext,
        call: &ProxiedCall,
    ) -> Result<(Self, RateHeaders), GatewayError> {
        let key = &ctx.caller.key;
        // Tiered prices count at their highest rates: spend caps are never under-counted.
        let price = prices
            .current()
            .at(&call.model, ctx.started_at)
            .map(|p| Price {
                cached_input_minor_per_mtok: p.cached_input_minor_per_mtok,
                batch_discount_pct: p.batch_discount_pct,
                ..p.ceiling()
            });
        let context = context_length.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let bound = call.token_bound(context.unwrap_or(default_completion_reserve));
        let demand = bounded_cost(price.as_ref().map(Price::ceiling).as_ref(), bound, context);
        // Only limited scopes are checked: none is made (named) for the others.
        let scopes: Vec<Scope> = [
            (!key.plan_limits.is_unlimited())
                .then(|| Scope::tenant(&key.tenant_id, key.plan_limits)),
            (!key.key_limits.is_unlimited()).then(|| Scope::key(&key.id, key.key_limits)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let admitted = admission
            .admit(&ctx.request_id, &key.tenant_id, scopes, demand)
            .await
            .map_err(|e| match e {
                NotAdmitted::Limited(r) => GatewayError::Limited(Box::new(r)),
                NotAdmitted::StoreUnavailable => GatewayError::LimitsUnavailable,
            })?;
        Ok((
            Self {
                permit: admitted.permit,
                price,
                batch: billing::export::batch_of(&ctx.request_id).is_some(),
            },
            admitted.headers,
        ))
    }

    /// Settles a call the response cache answered: no tokens, one hit at `rate`.
    pub(super) fn settle_hit(&mut self, rate: i64) {
        if let Some(permit) = self.permit.take() {
            permit.settle(Demand {
                tokens: 0,
                spend: billing::prices::cache_hit_cost(1, rate),
            });
        }
    }

    /// Settles with the tokens the call used; a second settle does nothing.
    pub(super) fn settle(&mut self, used: &Tokens) {
        if let Some(permit) = self.permit.take() {
            permit.settle(Demand {
                tokens: used.input.saturating_add(used.output),
                spend: self
                    .price
                    .as_ref()
                    .map(|p| match self.batch {
                        true => p.batch_charge(p.charge((0, 0), used)),
                        false => p.charge((0, 0), used),
                    })
                    .unwrap_or_default(),
            });
        }
    }
}

/// The most a call bounded by `(prompt, completion)` tokens can cost when the model holds
/// at most `context` tokens, prompt and completion together: the token sum cut to the
/// context, and the dearer of the two splits at the context's edge (the cost is linear and
/// grows in both, so its highest point under `prompt + completion <= context` is one of
/// them).
fn bounded_cost(price: Option<&Price>, bound: TokenBound, context: Option<i64>) -> Demand {
    let TokenBound {
        prompt,
        completion,
        choices,
    } = bound;
    let Some(context) = context else {
        return cost(price, (prompt, completion.saturating_mul(choices)));
    };
    // Each choice holds the prompt and its own completion within the context; the prompt
    // is read once for all of them.
    let (prompt, completion) = (prompt.min(context), completion.min(context));
    let most_prompt = (
        prompt,
        completion.min(context - prompt).saturating_mul(choices),
    );
    let most_completion = (
        prompt.min(context - completion),
        completion.saturating_mul(choices),
    );
    let (a, b) = (cost(price, most_prompt), cost(price, most_completion));
    Demand {
        tokens: a.tokens.max(b.tokens),
        spend: a.spend.max(b.spend),
    }
}

/// What `(prompt, completion)` tokens cost against the limits: their sum, and their spend
/// at `price` (none without a price).
fn cost(price: Option<&Price>, (prompt, completion): (i64, i64)) -> Demand {
    Demand {
        tokens: prompt.saturating_add(completion),
        spend: price
            .map(|p| p.cost(1, prompt, completion))
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: i64, output: i64) -> Price {
        Price {
            model: "m".into(),
            effective_from: 0,
            currency: "USD".into(),
            input_minor_per_mtok: input,
            output_minor_per_mtok: output,
            request_minor_per_mreq: 0,
            cached_input_minor_per_mtok: None,
            batch_discount_pct: None,
            tiers: Vec::new(),
        }
    }

    fn bound(prompt: i64, completion: i64, choices: i64) -> TokenBound {
        TokenBound {
            prompt,
            completion,
            choices,
        }
    }

    #[test]
    fn a_bound_covers_every_split_within_the_context_for_each_choice() {
        let context = 100;
        for p in [price(1_000, 3_000), price(3_000, 1_000)] {
            for (b_prompt, b_completion) in [(10, 20), (10, 500), (500, 10), (80, 80), (0, 1000)] {
                for choices in [1, 3] {
                    let b = bound(b_prompt, b_completion, choices);
                    let demand = bounded_cost(Some(&p), b, Some(context));
                    if choices == 1 {
                        assert!(
                            demand.tokens <= context.min(b_prompt + b_completion),
                            "{b:?}"
                        );
                    }
                    // Every use the worker allows costs no more than the bound: the prompt
                    // once, each choice's completion within the context.
                    for prompt in 0..=b_prompt.min(context) {
                        let completion = b_completion.min(context - prompt) * choices;
                        let used = cost(Some(&p), (prompt, completion));
                        assert!(used.tokens <= demand.tokens, "{b:?} {prompt}");
                        assert!(used.spend <= demand.spend, "{b:?} {prompt}");
                    }
                }
            }
        }
        // Without a stated context the body's bound stands, times the choices.
        assert_eq!(bounded_cost(None, bound(10, 500, 1), None).tokens, 510);
        assert_eq!(bounded_cost(None, bound(10, 500, 3), None).tokens, 1510);
    }
}
