//! What a call may cost, reserved at admission and settled with what it used.
//!
//! Owns: the cost bound of a call (tokens, and spend at the model's price), computed the
//! same way from the body's token bound at admission and from the counted usage at
//! settlement, and the reservation that carries the price between the two. Must never:
//! price a reservation below what the call can cost (tiered prices count at their highest
//! rates), or settle one reservation twice.

use std::sync::Arc;

use billing::Price;

use super::call::{CallContext, ProxiedCall};
use crate::error::GatewayError;
use crate::limits::{Admission, Demand, Permit, RateHeaders, Scope};
use crate::pricing::PriceCache;

/// A call's reservation and the price it was made at; settled with the real usage.
pub(super) struct Reservation {
    permit: Option<Permit>,
    price: Option<Price>,
}

impl Reservation {
    /// Reserves the most this call can cost against every limit of its tenant and key.
    pub(super) async fn admit(
        admission: &Arc<Admission>,
        prices: &PriceCache,
        default_completion_reserve: i64,
        ctx: &CallContext,
        call: &ProxiedCall,
    ) -> Result<(Self, RateHeaders), GatewayError> {
        let key = &ctx.caller.key;
        // Tiered prices count at their highest rates: spend caps are never under-counted.
        let price = prices
            .current()
            .at(&call.model, ctx.started_at)
            .map(Price::ceiling);
        let demand = cost(price.as_ref(), call.token_bound(default_completion_reserve));
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
            .map_err(|r| GatewayError::Limited(Box::new(r)))?;
        Ok((
            Self {
                permit: admitted.permit,
                price,
            },
            admitted.headers,
        ))
    }

    /// Settles with the tokens the call used; a second settle does nothing.
    pub(super) fn settle(&mut self, (prompt, completion): (u64, u64)) {
        if let Some(permit) = self.permit.take() {
            permit.settle(cost(
                self.price.as_ref(),
                (prompt as i64, completion as i64),
            ));
        }
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
