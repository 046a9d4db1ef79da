//! Backpropagation: the weighted cross-entropy of a head over a batch, plus its L2 penalty,
//! and the gradients of both with respect to every layer.
//!
//! Owns: `Grads` and `loss`. Must never: update weights (the optimisers do).

use super::{softmax, Head, Sparse};

/// Gradients of the loss with respect to every layer's weights and biases.
pub(super) struct Grads {
    pub(super) layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Grads {
    pub(super) fn zeros(head: &Head) -> Self {
        Self {
            layers: head
                .layers
                .iter()
                .map(|l| (vec![0.0; l.w.len()], vec![0.0; l.b.len()]))
                .collect(),
        }
    }

    pub(super) fn clear(&mut self) {
        for (w, b) in &mut self.layers {
            w.iter_mut().for_each(|v| *v = 0.0);
            b.iter_mut().for_each(|v| *v = 0.0);
        }
    }
}

/// The weighted mean cross-entropy of `batch` plus the L2 penalty; with `grads`, their
/// gradients are added there (backpropagation through the layers).
#[allow(clippy::too_many_arguments)]
pub(super) fn loss(
    head: &Head,
    x: &[Vec<f32>],
    terms: &[Sparse],
    y: &[usize],
    batch: &[usize],
    weights: &[f32],
    l2: f32,
    mut grads: Option<&mut Grads>,
) -> f32 {
    if batch.is_empty() {
        return 0.0;
    }
    let n = batch.len() as f32;
    let depth = head.layers.len();
    let mut total = 0.0f32;
    // Activations of each layer's input, kept for the backward pass.
    let mut acts: Vec<Vec<f32>> = vec![Vec::new(); depth + 1];
    let mut delta = Vec::new();
    let mut back = Vec::new();
    for &i in batch {
        acts[0].clear();
        acts[0].extend_from_slice(&x[i]);
        let sparse = terms.get(i).map_or(&[][..], Vec::as_slice);
        for (k, layer) in head.layers.iter().enumerate() {
            let (inp, out) = acts.split_at_mut(k + 1);
            let sparse = if k == 0 { sparse } else { &[] };
            layer.forward(&inp[k], sparse, &mut out[0]);
            if k + 1 < depth {
                out[0].iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        let probs = &mut acts[depth];
        softmax(probs);
        let w = weights[y[i]];
        total += -w * probs[y[i]].max(1e-12).ln();
        let Some(g) = grads.as_deref_mut() else {
            continue;
        };
        // d(loss)/d(logits) = w · (p − onehot) / n
        delta.clear();
        delta.extend(
            probs
                .iter()
                .enumerate()
                .map(|(c, p)| w * (p - if c == y[i] { 1.0 } else { 0.0 }) / n),
        );
        for k in (0..depth).rev() {
            let layer = &head.layers[k];
            let input = &acts[k];
            let (gw, gb) = &mut g.layers[k];
            for (o, d) in delta.iter().enumerate() {
                gb[o] += d;
                let row = &mut gw[o * layer.inp..(o + 1) * layer.inp];
                row.iter_mut().zip(input).for_each(|(gw, a)| *gw += d * a);
                if k == 0 {
                    for (c, v) in sparse {
                        row[input.len() + *c as usize] += d * v;
                    }
                }
            }
            if k == 0 {
                break;
            }
            // Back through the weights, then the ReLU of the layer below.
            back.clear();
            back.resize(layer.inp, 0.0);
            for (o, d) in delta.iter().enumerate() {
                let row = &layer.w[o * layer.inp..(o + 1) * layer.inp];
                back.iter_mut().zip(row).for_each(|(b, w)| *b += d * w);
            }
            back.iter_mut().zip(input).for_each(|(b, a)| {
                if *a <= 0.0 {
                    *b = 0.0
                }
            });
            std::mem::swap(&mut delta, &mut back);
        }
    }
    if let Some(g) = grads {
        for (layer, (gw, _)) in head.layers.iter().zip(&mut g.layers) {
            gw.iter_mut().zip(&layer.w).for_each(|(g, w)| *g += l2 * w);
        }
    }
    total / n + 0.5 * l2 * head.weights_sq()
}
