//! Softmax regression to the optimum of its convex objective: L-BFGS fits, and the k-fold
//! cross-validation that chooses the L2 penalty.

use rand::seq::SliceRandom;
use rand::Rng;

use super::{loss, Epoch, Grads, Head, Sparse};
use crate::classifiers::lbfgs;

/// L-BFGS iterations at most for one fit.
const MAX_ITERATIONS: usize = 500;

/// One spread for every dimension (the root mean square of the per-dimension ones), so a
/// penalty weighs every direction of the embedding space alike, as the embedding model
/// laid it out.
pub(super) fn uniform(scale: &[f32]) -> Vec<f32> {
    let n = scale.len().max(1) as f32;
    let var = scale.iter().map(|s| 1.0 / (s * s)).sum::<f32>() / n;
    vec![1.0 / var.sqrt().max(1e-6); scale.len()]
}

/// Per label, its members dealt in turn to `k` folds after a shuffle.
pub(super) fn folds(y: &[usize], idx: &[usize], k: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut shuffled = idx.to_vec();
    shuffled.shuffle(rng);
    shuffled.sort_by_key(|i| y[*i]);
    let mut out = vec![Vec::new(); k];
    for (j, i) in shuffled.into_iter().enumerate() {
        out[j % k].push(i);
    }
    out.iter_mut().for_each(|f| f.sort_unstable());
    out.retain(|f| !f.is_empty());
    out
}

/// Standardised examples, their n-gram features (none: empty), their labels and the class
/// weights.
pub(super) struct Examples<'a> {
    pub x: &'a [Vec<f32>],
    pub terms: &'a [Sparse],
    pub y: &'a [usize],
    pub weights: &'a [f32],
}

/// The penalty of `grid` whose softmax regression, fitted on all but one of `folds` of
/// `train`, has the lowest cross-entropy on the fold left out, summed over the folds
/// (the strongest of equals), and that sum. Each fit starts where the previous penalty's
/// ended; `progress` has the fits done.
pub(super) fn cross_validate(
    head: &Head,
    set: &Examples<'_>,
    train: &[usize],
    folds: &[Vec<usize>],
    grid: &[f32],
    progress: &mut dyn FnMut(usize),
) -> (f32, f32) {
    let mut starts: Vec<Head> = vec![head.clone(); folds.len()];
    let (mut best, mut best_loss) = (grid.first().copied().unwrap_or(0.0), f32::INFINITY);
    for (g, &l2) in grid.iter().enumerate() {
        let mut held_out = 0.0;
        for (k, fold) in folds.iter().enumerate() {
            let rest: Vec<usize> = train
                .iter()
                .copied()
                .filter(|i| fold.binary_search(i).is_err())
                .collect();
            let start = std::mem::replace(&mut starts[k], head.clone());
            let (fitted, _) = fit_exact(start, set, &rest, None, l2);
            held_out += loss(
                &fitted,
                set.x,
                set.terms,
                set.y,
                fold,
                set.weights,
                0.0,
                None,
            ) * fold.len() as f32;
            starts[k] = fitted;
            progress(g * folds.len() + k + 1);
        }
        if held_out < best_loss - 1e-4 * train.len() as f32 {
            (best, best_loss) = (l2, held_out);
        }
    }
    (best, best_loss)
}

/// Softmax regression (a head of one layer) fitted by L-BFGS to the optimum of the
/// weighted cross-entropy of `train` plus the L2 penalty. With `val`, the curve has each
/// iteration's training and validation loss.
pub(super) fn fit_exact(
    mut head: Head,
    set: &Examples<'_>,
    train: &[usize],
    val: Option<&[usize]>,
    l2: f32,
) -> (Head, Vec<Epoch>) {
    let mut params: Vec<f64> = head.layers[0]
        .w
        .iter()
        .chain(&head.layers[0].b)
        .map(|v| *v as f64)
        .collect();
    let split = head.layers[0].w.len();
    let mut grads = Grads::zeros(&head);
    let load = |head: &mut Head, p: &[f64]| {
        let layer = &mut head.layers[0];
        layer
            .w
            .iter_mut()
            .zip(&p[..split])
            .for_each(|(w, v)| *w = *v as f32);
        layer
            .b
            .iter_mut()
            .zip(&p[split..])
            .for_each(|(b, v)| *b = *v as f32);
    };
    let mut probe = head.clone();
    let mut objective = |p: &[f64], g: &mut [f64]| {
        load(&mut probe, p);
        grads.clear();
        let value = loss(
            &probe,
            set.x,
            set.terms,
            set.y,
            train,
            set.weights,
            l2,
            Some(&mut grads),
        );
        let (gw, gb) = &grads.layers[0];
        g.iter_mut()
            .zip(gw.iter().chain(gb))
            .for_each(|(g, v)| *g = *v as f64);
        value as f64
    };
    let mut curve = Vec::new();
    let mut shown = head.clone();
    let mut after = |epoch: usize, value: f64, p: &[f64]| {
        if let Some(val) = val {
            load(&mut shown, p);
            let validation_loss =
                loss(&shown, set.x, set.terms, set.y, val, set.weights, 0.0, None);
            curve.push(Epoch {
                epoch,
                train_loss: value as f32,
                validation_loss,
            });
        }
    };
    lbfgs::minimise(&mut params, &mut objective, MAX_ITERATIONS, &mut after);
    load(&mut head, &params);
    (head, curve)
}
