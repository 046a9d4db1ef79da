//! Mini-batch Adam, for heads with a hidden layer (their loss is not convex).

use rand::seq::SliceRandom;
use rand::Rng;

use super::{loss, Epoch, Grads, Head, Options};

/// Adam's moments for every parameter, in the order of [`Grads`].
pub(super) struct Adam {
    m: Vec<(Vec<f32>, Vec<f32>)>,
    v: Vec<(Vec<f32>, Vec<f32>)>,
    t: i32,
    /// Where each batch's gradients are summed.
    grads: Grads,
}

impl Adam {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;

    pub(super) fn new(head: &Head) -> Self {
        let zeros = Grads::zeros(head).layers;
        Self {
            m: zeros.clone(),
            v: zeros,
            t: 0,
            grads: Grads::zeros(head),
        }
    }

    /// One pass over `order` (shuffled first) in mini-batches, a step after each.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn epoch(
        &mut self,
        head: &mut Head,
        x: &[Vec<f32>],
        y: &[usize],
        order: &mut [usize],
        weights: &[f32],
        l2: f32,
        opts: &Options,
        rng: &mut impl Rng,
    ) {
        order.shuffle(rng);
        for batch in order.chunks(opts.batch_size) {
            self.grads.clear();
            loss(head, x, &[], y, batch, weights, l2, Some(&mut self.grads));
            let grads = std::mem::replace(&mut self.grads, Grads { layers: Vec::new() });
            self.step(head, &grads, opts.learning_rate);
            self.grads = grads;
        }
    }

    fn step(&mut self, head: &mut Head, g: &Grads, lr: f32) {
        self.t += 1;
        let (c1, c2) = (1.0 - Self::B1.powi(self.t), 1.0 - Self::B2.powi(self.t));
        for (k, layer) in head.layers.iter_mut().enumerate() {
            let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
                for i in 0..p.len() {
                    m[i] = Self::B1 * m[i] + (1.0 - Self::B1) * g[i];
                    v[i] = Self::B2 * v[i] + (1.0 - Self::B2) * g[i] * g[i];
                    p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
                }
            };
            let (mw, mb) = &mut self.m[k];
            let (vw, vb) = &mut self.v[k];
            update(&mut layer.w, &g.layers[k].0, mw, vw);
            update(&mut layer.b, &g.layers[k].1, mb, vb);
        }
    }
}

/// Mini-batch Adam until the validation loss has not improved for `patience` epochs; the
/// weights of the best epoch are kept. Returns them, the curve and the best epoch.
#[allow(clippy::too_many_arguments)]
pub(super) fn fit(
    mut head: Head,
    x: &[Vec<f32>],
    y: &[usize],
    train: &[usize],
    val: &[usize],
    weights: &[f32],
    l2: f32,
    opts: &Options,
    rng: &mut impl Rng,
    progress: &mut dyn FnMut(usize, usize),
) -> (Head, Vec<Epoch>, usize) {
    let mut adam = Adam::new(&head);
    let mut order = train.to_vec();
    let mut curve = Vec::new();
    let (mut best, mut best_loss, mut best_epoch) = (head.clone(), f32::INFINITY, 0);
    for epoch in 1..=opts.max_epochs {
        adam.epoch(&mut head, x, y, &mut order, weights, l2, opts, rng);
        let train_loss = loss(&head, x, &[], y, train, weights, l2, None);
        let validation_loss = loss(&head, x, &[], y, val, weights, 0.0, None);
        curve.push(Epoch {
            epoch,
            train_loss,
            validation_loss,
        });
        progress(epoch, opts.max_epochs);
        if validation_loss < best_loss - 1e-5 {
            (best, best_loss, best_epoch) = (head.clone(), validation_loss, epoch);
        } else if epoch - best_epoch >= opts.patience {
            break;
        }
    }
    (best, curve, best_epoch)
}

/// Mini-batch Adam for exactly `epochs` epochs on `train`.
#[allow(clippy::too_many_arguments)]
pub(super) fn fit_epochs(
    mut head: Head,
    x: &[Vec<f32>],
    y: &[usize],
    train: &[usize],
    weights: &[f32],
    l2: f32,
    epochs: usize,
    opts: &Options,
    rng: &mut impl Rng,
) -> Head {
    let mut adam = Adam::new(&head);
    let mut order = train.to_vec();
    for _ in 0..epochs {
        adam.epoch(&mut head, x, y, &mut order, weights, l2, opts, rng);
    }
    head
}
