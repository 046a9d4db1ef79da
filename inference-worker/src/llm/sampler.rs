//! Turns one position's logits into a token: penalties, bias, the grammar's mask,
//! temperature, truncation (top-k, top-p, min-p) and the draw, with log probabilities read
//! from the very distribution that is drawn from.
//!
//! Owns: the order of those steps and the random stream of a sequence (seeded, so a seed
//! repeats a reply). Must never: allocate per call beyond the scratch it keeps, or draw a
//! token the mask forbids.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use toktrie::SimpleVob;

/// How one sequence samples, resolved from its request.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 draws the likeliest token.
    pub temperature: f32,
    /// 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 0 keeps every token.
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 changes nothing.
    pub repetition_penalty: f32,
    /// (token, bias) pairs added to the logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// Alternatives to report per token; `None` reports no log probabilities.
    pub logprobs: Option<usize>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
            seed: 0,
        }
    }
}

/// A drawn token with, where asked, its log probability and the likeliest alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Completion tokens drawn so far, per token id (for the presence and frequency
    /// penalties).
    counts: std::collections::HashMap<u32, u32>,
    /// Tokens in the prompt or the completion (for the repetition penalty), when it is on.
    seen: Vec<bool>,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32], vocab: usize) -> Self {
        let mut seen = Vec::new();
        if params.repetition_penalty != 1.0 {
            seen = vec![false; vocab];
            for &t in prompt {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
        }
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            counts: Default::default(),
            seen,
            scratch: Vec::new(),
        }
    }

    /// Draws a token from `logits` (changed in place) where `mask` allows, then counts it.
    /// A mask that allows nothing falls back to `fallback` (the end of the sequence).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        mask: Option<&SimpleVob>,
        fallback: u32,
    ) -> Sampled {
        self.adjust(logits, mask);
        let sampled = self.draw(logits).unwrap_or(Sampled {
            token: fallback,
            logprob: None,
            top: Vec::new(),
        });
        self.observe(sampled.token);
        sampled
    }

    /// Records a token taken without a draw (one the grammar forced).
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
        if let Some(s) = self.seen.get_mut(token as usize) {
            *s = true;
        }
    }

    /// A copy that draws its own random stream: the `index`-th choice of one request.
    pub fn fork(&self, index: u64) -> Self {
        let mut params = self.params.clone();
        params.seed = self
            .params
            .seed
            .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            counts: self.counts.clone(),
            seen: self.seen.clone(),
            scratch: Vec::new(),
        }
    }

    fn adjust(&self, logits: &mut [f32], mask: Option<&SimpleVob>) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (l, _) in logits.iter_mut().zip(&self.seen).filter(|(_, s)| **s) {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&token, &count) in &self.counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                // OpenAI's −100 bans a token outright.
                *l = if bias <= -100.0 {
                    f32::NEG_INFINITY
                } else {
                    *l + bias
                };
            }
        }
        if let Some(mask) = mask {
            for (t, l) in logits.iter_mut().enumerate() {
                if t >= mask.len() || !mask.is_allowed(t as u32) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Log-softmax at the sampling temperature, truncation, the draw. `None` when no token
    /// is possible.
    fn draw(&mut self, logits: &mut [f32]) -> Option<Sampled> {
        let (temperature, logprobs) = (self.params.temperature, self.params.logprobs);
        let scale = if temperature > 0.0 {
            1.0 / temperature
        } else {
            1.0
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return None;
        }
        // Log probabilities of the tempered distribution, in place.
        let mut sum = 0.0f64;
        for l in logits.iter_mut() {
            *l = (*l - max) * scale;
            sum += f64::from(l.exp());
        }
        let log_sum = sum.ln() as f32;
        for l in logits.iter_mut() {
            *l -= log_sum;
        }
        let token = if temperature <= 0.0 {
            argmax(logits)
        } else {
            self.truncated_draw(logits)
        };
        let top = match logprobs {
            Some(k) if k > 0 => top_k(logits, k, &mut self.scratch),
            _ => Vec::new(),
        };
        Some(Sampled {
            token,
            logprob: logprobs.map(|_| logits[token as usize]),
            top,
        })
    }

    fn truncated_draw(&mut self, logprobs: &[f32]) -> u32 {
        let p = &self.params;
        let truncate = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if !truncate {
            let mut u: f32 = self.rng.random();
            for (t, &lp) in logprobs.iter().enumerate() {
                u -= lp.exp();
                if u <= 0.0 {
                    return t as u32;
                }
            }
            return argmax(logprobs);
        }
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(
            logprobs
                .iter()
                .enumerate()
                .filter(|(_, lp)| lp.is_finite())
                .map(|(t, &lp)| (t as u32, lp)),
        );
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut keep = cand.len();
        if p.top_k > 0 {
            keep = keep.min(p.top_k);
        }
        if p.min_p > 0.0 {
            let floor = cand[0].1 + p.min_p.ln();
            keep = keep.min(cand.iter().take_while(|c| c.1 >= floor).count().max(1));
        }
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut n = 0;
            for c in &cand[..keep] {
                mass += c.1.exp();
                n += 1;
                if mass >= p.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let kept = &cand[..keep];
        let total: f32 = kept.iter().map(|c| c.1.exp()).sum();
        let mut u: f32 = self.rng.random::<f32>() * total;
        for c in kept {
            u -= c.1.exp();
            if u <= 0.0 {
                return c.0;
            }
        }
        kept[0].0
    }
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest finite values with their indices, largest first.
fn top_k(values: &[f32], k: usize, scratch: &mut Vec<(u32, f32)>) -> Vec<(u32, f32)> {
    scratch.clear();
    scratch.extend(
        values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v)),
    );
    let k = k.min(scratch.len());
    if k == 0 {
        return Vec::new();
    }
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    }
    let mut top = scratch[..k].to_vec();
    top.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, &[], 8)
    }

    #[test]
    fn greedy_takes_the_likeliest_and_reports_normalised_logprobs() {
        let mut s = sampler(SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            ..Default::default()
        });
        let mut logits = vec![0.0, 3.0, 1.0, 2.0, -1.0, 0.5, 0.0, 0.0];
        let out = s.sample(&mut logits, None, 0);
        assert_eq!(out.token, 1);
        assert_eq!(
            out.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(out.logprob, Some(logits[1]));
    }

    #[test]
    fn bias_mask_and_penalties_change_the_choice() {
        let greedy = || SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut banned = sampler(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..greedy()
        });
        assert_eq!(
            banned
                .sample(&mut [0.0, 3.0, 2.0, 0.0, 0., 0., 0., 0.], None, 0)
                .token,
            2
        );

        let mut mask = SimpleVob::alloc(8);
        mask.allow_token(5);
        let mut masked = sampler(greedy());
        assert_eq!(
            masked
                .sample(&mut [0.0, 3.0, 2.0, 0.0, 0., 0., 0., 0.], Some(&mask), 0)
                .token,
            5
        );

        let mut penalised = sampler(SamplingParams {
            frequency_penalty: 2.0,
            ..greedy()
        });
        let logits = || vec![0.0, 3.0, 2.0, 0.0, 0., 0., 0., 0.];
        assert_eq!(penalised.sample(&mut logits(), None, 0).token, 1);
        // Drawn once: 3 − 2 = 1 < 2.
        assert_eq!(penalised.sample(&mut logits(), None, 0).token, 2);

        let mut repeated = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..greedy()
            },
            &[1],
            8,
        );
        // 3 / 2 = 1.5 < 2.
        assert_eq!(repeated.sample(&mut logits(), None, 0).token, 2);
    }

    #[test]
    fn nothing_allowed_falls_back_and_truncation_keeps_the_head() {
        let mut s = sampler(SamplingParams::default());
        let mask = SimpleVob::alloc(8);
        assert_eq!(s.sample(&mut [1.0; 8], Some(&mask), 7).token, 7);

        let mut top1 = sampler(SamplingParams {
            top_k: 1,
            seed: 3,
            ..Default::default()
        });
        let mut min_p = sampler(SamplingParams {
            min_p: 0.9,
            seed: 4,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(
                top1.sample(&mut [0.0, 1.0, 0.9, 0., 0., 0., 0., 0.], None, 0)
                    .token,
                1
            );
            assert_eq!(
                min_p
                    .sample(&mut [0.0, 1.0, 0.5, 0., 0., 0., 0., 0.], None, 0)
                    .token,
                1
            );
        }
    }

    #[test]
    fn a_seed_repeats_and_forks_differ() {
        let params = SamplingParams {
            seed: 9,
            ..Default::default()
        };
        let draws = |s: &mut Sampler| {
            (0..32)
                .map(|_| s.sample(&mut [0.0; 8], None, 0).token)
                .collect::<Vec<_>>()
        };
        let a = draws(&mut sampler(params.clone()));
        assert_eq!(a, draws(&mut sampler(params.clone())));
        assert_ne!(a, draws(&mut sampler(params).fork(1)));
    }
}
