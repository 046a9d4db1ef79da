//! Training a classification head on embeddings (SPEC §12): softmax regression fitted to
//! the optimum of its convex objective by L-BFGS, over the embedding and, where k-fold
//! cross-validation finds they help, the text's word n-gram TF-IDF features, with the L2
//! penalty chosen by the same cross-validation; and where it does better on held-out data
//! one hidden ReLU layer over the embedding, trained by backpropagation and mini-batch Adam
//! with early stopping. Class weights, a stratified validation split, reproducible from a
//! seed.
//!
//! Owns: the arithmetic of training and of a trained head (embeddings standardised with
//! the training split's mean and spread, n-gram features, then the layers), and the
//! held-out metrics. Must never: embed text, know tenants, or touch the store; it takes
//! vectors, texts and labels and gives a head back.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use adam::{fit, fit_epochs};
use backprop::{loss, Grads};
use convex::{cross_validate, fit_exact, uniform, Examples};
use serde::{Deserialize, Serialize};

use super::terms::{Sparse, Terms};

/// How a head is trained; every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Units of the hidden layer tried against plain softmax regression (the one with the
    /// lower held-out loss is kept); 0 trains softmax regression alone.
    pub hidden_units: usize,
    /// Passes over the training split at most (the hidden layer's Adam).
    pub max_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
    /// L2 penalty on the weights (not the biases): `l2 / 2 · ‖W‖²` added to the loss.
    /// Unset: chosen by cross-validation from [`L2_GRID`] for softmax regression, and
    /// from [`HIDDEN_L2`] on the validation split for the hidden layer.
    pub l2: Option<f32>,
    /// Share of each label's examples held out for validation and the metrics.
    pub validation_split: f32,
    /// Epochs without a better validation loss before training stops.
    pub patience: usize,
    /// Weigh each example by the inverse frequency of its label.
    pub class_weights: bool,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hidden_units: 64,
            max_epochs: 200,
            batch_size: 32,
            learning_rate: 0.003,
            l2: None,
            validation_split: 0.2,
            patience: 12,
            class_weights: true,
            seed: 42,
        }
    }
}

impl Options {
    /// Refuses options outside what training can use, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |field: &str, range: &str| Err(format!("options.{field} must be {range}"));
        if self.hidden_units > 1024 {
            return bad("hidden_units", "0 to 1024");
        }
        if !(1..=2000).contains(&self.max_epochs) {
            return bad("max_epochs", "1 to 2000");
        }
        if !(1..=4096).contains(&self.batch_size) {
            return bad("batch_size", "1 to 4096");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return bad("learning_rate", "above 0 and at most 1");
        }
        if self.l2.is_some_and(|l2| !(0.0..=10.0).contains(&l2)) {
            return bad("l2", "0 to 10");
        }
        if !(0.05..=0.5).contains(&self.validation_split) {
            return bad("validation_split", "0.05 to 0.5");
        }
        if !(1..=1000).contains(&self.patience) {
            return bad("patience", "1 to 1000");
        }
        Ok(())
    }
}

/// Examples as vectors of one width and the texts they embed, each with its label's index.
pub struct Dataset {
    pub x: Vec<Vec<f32>>,
    /// The examples' texts, for n-gram features; empty: the embeddings alone.
    pub texts: Vec<String>,
    pub y: Vec<usize>,
    pub classes: usize,
}

impl Dataset {
    fn text(&self, i: usize) -> &str {
        self.texts.get(i).map_or("", String::as_str)
    }
}

/// A dense layer, `out × inp` weights row by row, and biases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Layer {
    pub inp: usize,
    pub out: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl Layer {
    fn new(inp: usize, out: usize, rng: &mut impl Rng, relu_after: bool) -> Self {
        // He initialisation before a ReLU, Xavier before the softmax.
        let scale = if relu_after {
            (2.0 / inp as f32).sqrt()
        } else {
            (1.0 / inp as f32).sqrt()
        };
        Self {
            inp,
            out,
            w: (0..inp * out).map(|_| scale * normal(rng)).collect(),
            b: vec![0.0; out],
        }
    }

    /// `out = W · [x ‖ sparse] + b`: the sparse features' columns follow `x`'s.
    fn forward(&self, x: &[f32], sparse: &[(u32, f32)], out: &mut Vec<f32>) {
        out.clear();
        let dense = x.len();
        out.extend(self.w.chunks_exact(self.inp).zip(&self.b).map(|(row, b)| {
            let terms: f32 = sparse
                .iter()
                .map(|(c, v)| v * row[dense + *c as usize])
                .sum();
            b + dot(row, x) + terms
        }));
    }
}

/// A trained head: standardisation, then one or two layers, then softmax.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Head {
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
    /// N-gram features read by the first layer after the standardised embedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<Terms>,
    /// Hidden layers (ReLU after each), then the output layer.
    pub layers: Vec<Layer>,
}

impl Head {
    /// Label probabilities for one vector (of the width the head was trained on) and the
    /// text it embeds.
    pub fn probabilities(&self, x: &[f32], text: &str) -> Vec<f32> {
        let mut a = self.standardise(x);
        let terms = self.features(text);
        let mut z = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let sparse: &[(u32, f32)] = if i == 0 { &terms } else { &[] };
            layer.forward(&a, sparse, &mut z);
            if i + 1 < self.layers.len() {
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            std::mem::swap(&mut a, &mut z);
        }
        softmax(&mut a);
        a
    }

    pub fn input_width(&self) -> usize {
        self.mean.len()
    }

    pub fn describe(&self) -> String {
        match (self.layers.len(), &self.terms) {
            (1, None) => "softmax regression".to_owned(),
            (1, Some(t)) => format!(
                "softmax regression over the embedding and {} word n-grams",
                t.width()
            ),
            _ => format!("one hidden layer of {} ReLU units", self.layers[0].out),
        }
    }

    fn features(&self, text: &str) -> Sparse {
        self.terms
            .as_ref()
            .map_or_else(Vec::new, |t| t.features(text))
    }

    fn standardise(&self, x: &[f32]) -> Vec<f32> {
        standardise(x, &self.mean, &self.scale)
    }

    fn weights_sq(&self) -> f32 {
        self.layers
            .iter()
            .map(|l| l.w.iter().map(|w| w * w).sum::<f32>())
            .sum()
    }
}

/// One epoch of the loss curve.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: f32,
    pub validation_loss: f32,
}

/// Precision, recall and F1 of one label on the validation split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabelMetrics {
    pub label: String,
    pub precision: f32,
    pub recall: f32,
    pub f1: f32,
    pub support: usize,
}

/// What training reports: held-out figures and the curve of the head kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub accuracy: f32,
    pub macro_f1: f32,
    pub per_label: Vec<LabelMetrics>,
    pub loss_curve: Vec<Epoch>,
    /// The epoch whose weights were kept (lowest validation loss).
    pub best_epoch: usize,
    pub architecture: String,
    /// The L2 penalty of the head kept.
    pub l2: f32,
    pub train_examples: usize,
    pub validation_examples: usize,
}

/// The L2 penalties softmax regression tries when none is set, strongest first, on inputs
/// scaled to unit average variance: for a few thousand examples the best lies around
/// 0.1–1 (more examples, less penalty).
pub const L2_GRID: [f32; 7] = [3.2, 1.6, 0.8, 0.4, 0.2, 0.1, 0.05];
/// Folds of the cross-validation that chooses among [`L2_GRID`].
pub const FOLDS: usize = 5;
/// The penalties the hidden layer tries when none is set (it overfits sooner).
pub const HIDDEN_L2: [f32; 2] = [1.0, 0.3];
/// Lengths of the n-gram feature vector beside the standardised embedding (whose length
/// is about the root of its width) that softmax regression tries, by cross-validation:
/// 0 is the embedding alone.
pub const TERM_WEIGHTS: [f32; 2] = [0.0, 1.0];
/// Word n-grams kept at most, and at most this many weights over all labels.
pub const MAX_TERMS: usize = 100_000;
const MAX_TERM_WEIGHTS: usize = 2_000_000;

/// What one training run tries: hidden layer widths (none: softmax regression) and L2
/// (none: chosen by cross-validation).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub hidden: Vec<usize>,
    pub l2: Option<f32>,
    /// The n-gram features' length (see [`TERM_WEIGHTS`]) once chosen; 0: none.
    pub term_weight: f32,
}

impl Metrics {
    /// The validation loss of the epoch kept.
    pub fn validation_loss(&self) -> f32 {
        self.loss_curve
            .get(self.best_epoch.saturating_sub(1))
            .map_or(f32::INFINITY, |e| e.validation_loss)
    }
}

impl Candidate {
    /// A freshly initialised head of this shape over standardised inputs and `terms`.
    fn head(
        &self,
        mean: Vec<f32>,
        scale: Vec<f32>,
        terms: Option<Terms>,
        classes: usize,
        rng: &mut impl Rng,
    ) -> Head {
        let mut layers = Vec::new();
        let mut inp = mean.len() + terms.as_ref().map_or(0, Terms::width);
        for h in &self.hidden {
            layers.push(Layer::new(inp, *h, rng, true));
            inp = *h;
        }
        layers.push(Layer::new(inp, classes, rng, false));
        Head {
            mean,
            scale,
            terms,
            layers,
        }
    }
}

/// The heads training tries, simplest first: softmax regression, then the hidden layer at
/// each of its penalties.
pub fn candidates(opts: &Options) -> Vec<Candidate> {
    let mut out = vec![Candidate {
        hidden: Vec::new(),
        l2: opts.l2,
        term_weight: 0.0,
    }];
    if opts.hidden_units > 0 {
        let grid = opts.l2.map_or(HIDDEN_L2.to_vec(), |l2| vec![l2]);
        out.extend(grid.into_iter().map(|l2| Candidate {
            hidden: vec![opts.hidden_units],
            l2: Some(l2),
            term_weight: 0.0,
        }));
    }
    out
}

/// Where training is, for progress reports: which candidate (an index into
/// [`candidates`]), and its steps (fits or epochs) done and at most.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, usize);

/// Trains every candidate on `data`'s training split (labels named by `labels`) and keeps
/// the one with the lowest held-out cross-entropy (the simplest of equals); then trains that
/// candidate again on every example (softmax regression to its optimum, the hidden layer
/// for as many epochs as its best), which is the head returned (it has seen a fifth more
/// examples). The metrics are the kept candidate's on the validation split, which the
/// returned head has seen: they are what its training split alone scored on examples it
/// had not.
pub fn train(
    data: &Dataset,
    labels: &[String],
    opts: &Options,
    progress: Progress<'_>,
) -> (Head, Metrics) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let (train_idx, val_idx) = split(&data.y, data.classes, opts.validation_split, &mut rng);
    let width = data.x.first().map_or(0, Vec::len);
    let (mean, scale) = standardisation(&data.x, &train_idx, width);
    let weights = class_weights(&data.y, &train_idx, data.classes, opts.class_weights);
    let mut best: Option<(Head, Metrics, Candidate)> = None;
    for (which, mut candidate) in candidates(opts).into_iter().enumerate() {
        let mut report = |e, total| progress(which, e, total);
        let (trained, curve, best_epoch) = match candidate.l2 {
            Some(l2) if !candidate.hidden.is_empty() => {
                let head =
                    candidate.head(mean.clone(), scale.clone(), None, data.classes, &mut rng);
                let std_x = standardise_all(&head, &data.x);
                fit(
                    head,
                    &std_x,
                    &data.y,
                    &train_idx,
                    &val_idx,
                    &weights,
                    l2,
                    opts,
                    &mut rng,
                    &mut report,
                )
            }
            l2 => {
                let scale = uniform(&scale);
                let std_x: Vec<Vec<f32>> = data
                    .x
                    .iter()
                    .map(|x| standardise(x, &mean, &scale))
                    .collect();
                let chosen = choose_softmax(
                    data,
                    &std_x,
                    &train_idx,
                    (&mean, &scale),
                    &weights,
                    l2,
                    &mut rng,
                    &mut report,
                );
                (candidate.l2, candidate.term_weight) = (Some(chosen.l2), chosen.term_weight);
                let set = Examples {
                    x: &std_x,
                    terms: &chosen.sparse,
                    y: &data.y,
                    weights: &weights,
                };
                let (trained, curve) =
                    fit_exact(chosen.head, &set, &train_idx, Some(&val_idx), chosen.l2);
                let last = curve.len();
                (trained, curve, last)
            }
        };
        let l2 = candidate.l2.unwrap_or_default();
        let mut metrics = evaluate(
            &trained,
            data,
            &val_idx,
            labels,
            curve,
            best_epoch,
            train_idx.len(),
        );
        metrics.l2 = l2;
        // Chosen by held-out cross-entropy: on a few hundred examples it ranks candidates
        // far less noisily than their F1.
        let better = best
            .as_ref()
            .is_none_or(|(_, m, _)| metrics.validation_loss() < m.validation_loss() - 1e-4);
        if better {
            best = Some((trained, metrics, candidate));
        }
    }
    // At least one candidate (softmax regression) is always trained.
    let Some((_, metrics, candidate)) = best else {
        return unreachable_head(width, data.classes);
    };
    let all: Vec<usize> = (0..data.y.len()).collect();
    let (mean, scale) = standardisation(&data.x, &all, width);
    let weights = class_weights(&data.y, &all, data.classes, opts.class_weights);
    let l2 = metrics.l2;
    let head = if candidate.hidden.is_empty() {
        let terms =
            (candidate.term_weight > 0.0).then(|| fit_terms(data, &all, candidate.term_weight));
        let head = candidate.head(mean, uniform(&scale), terms, data.classes, &mut rng);
        let std_x = standardise_all(&head, &data.x);
        let sparse = features_all(&head, data);
        let set = Examples {
            x: &std_x,
            terms: &sparse,
            y: &data.y,
            weights: &weights,
        };
        fit_exact(head, &set, &all, None, l2).0
    } else {
        let head = candidate.head(mean, scale, None, data.classes, &mut rng);
        let std_x = standardise_all(&head, &data.x);
        fit_epochs(
            head,
            &std_x,
            &data.y,
            &all,
            &weights,
            l2,
            metrics.best_epoch.max(1),
            opts,
            &mut rng,
        )
    };
    (head, metrics)
}

/// Softmax regression as cross-validation chose it, not yet fitted.
struct Chosen {
    head: Head,
    /// Every example's n-gram features under the head's vocabulary.
    sparse: Vec<Sparse>,
    l2: f32,
    term_weight: f32,
}

/// The n-gram weight of [`TERM_WEIGHTS`] (the vocabulary taken from `train`) and the L2
/// penalty (`l2`, or one of [`L2_GRID`]) whose softmax regression has the lowest
/// cross-validated loss on `train`, on the same folds for every pair (the embedding alone
/// and the stronger penalty among equals).
#[allow(clippy::too_many_arguments)]
fn choose_softmax(
    data: &Dataset,
    std_x: &[Vec<f32>],
    train: &[usize],
    (mean, scale): (&[f32], &[f32]),
    weights: &[f32],
    l2: Option<f32>,
    rng: &mut impl Rng,
    progress: &mut dyn FnMut(usize, usize),
) -> Chosen {
    let term_weights: &[f32] = if data.texts.is_empty() {
        &[0.0]
    } else {
        &TERM_WEIGHTS
    };
    let grid = l2.map_or(L2_GRID.to_vec(), |l2| vec![l2]);
    let folds = convex::folds(&data.y, train, FOLDS, rng);
    let steps = grid.len() * folds.len();
    let total = term_weights.len() * steps;
    let mut best: Option<(f32, Chosen)> = None;
    for (k, &term_weight) in term_weights.iter().enumerate() {
        let terms = (term_weight > 0.0).then(|| fit_terms(data, train, term_weight));
        let candidate = Candidate {
            hidden: Vec::new(),
            l2: None,
            term_weight,
        };
        let head = candidate.head(mean.to_vec(), scale.to_vec(), terms, data.classes, rng);
        let sparse = features_all(&head, data);
        let set = Examples {
            x: std_x,
            terms: &sparse,
            y: &data.y,
            weights,
        };
        let (l2, held_out) = cross_validate(&head, &set, train, &folds, &grid, &mut |d| {
            progress(k * steps + d, total)
        });
        let better = best
            .as_ref()
            .is_none_or(|(b, _)| held_out < b - 1e-4 * train.len() as f32);
        if better {
            let chosen = Chosen {
                head,
                sparse,
                l2,
                term_weight,
            };
            best = Some((held_out, chosen));
        }
    }
    match best {
        Some((_, chosen)) => chosen,
        // `term_weights` is never empty.
        None => Chosen {
            head: unreachable_head(mean.len(), data.classes).0,
            sparse: Vec::new(),
            l2: grid[0],
            term_weight: 0.0,
        },
    }
}

/// The vocabulary of the examples `idx`, within the bound for `data`'s labels.
fn fit_terms(data: &Dataset, idx: &[usize], weight: f32) -> Terms {
    let max = MAX_TERMS.min(MAX_TERM_WEIGHTS / data.classes.max(1));
    Terms::fit(idx.iter().map(|&i| data.text(i)), weight, max)
}

fn standardise_all(head: &Head, x: &[Vec<f32>]) -> Vec<Vec<f32>> {
    x.iter().map(|v| head.standardise(v)).collect()
}

fn features_all(head: &Head, data: &Dataset) -> Vec<Sparse> {
    (0..data.y.len())
        .map(|i| head.features(data.text(i)))
        .collect()
}

fn standardise(x: &[f32], mean: &[f32], scale: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(mean)
        .zip(scale)
        .map(|((v, m), s)| (v - m) * s)
        .collect()
}

fn unreachable_head(width: usize, classes: usize) -> (Head, Metrics) {
    (
        Head {
            mean: vec![0.0; width],
            scale: vec![1.0; width],
            terms: None,
            layers: vec![Layer {
                inp: width,
                out: classes,
                w: vec![0.0; width * classes],
                b: vec![0.0; classes],
            }],
        },
        Metrics {
            accuracy: 0.0,
            macro_f1: 0.0,
            per_label: Vec::new(),
            loss_curve: Vec::new(),
            best_epoch: 0,
            architecture: "softmax regression".into(),
            l2: 0.0,
            train_examples: 0,
            validation_examples: 0,
        },
    )
}

/// Per label, a shuffled `split` share (at least one, at most all but one) to validation.
fn split(y: &[usize], classes: usize, share: f32, rng: &mut impl Rng) -> (Vec<usize>, Vec<usize>) {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, c) in y.iter().enumerate() {
        by_class[*c].push(i);
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for mut members in by_class {
        members.shuffle(rng);
        let n = members.len();
        let held =
            ((n as f32 * share).round() as usize).clamp(usize::from(n >= 2), n.saturating_sub(1));
        val.extend_from_slice(&members[..held]);
        train.extend_from_slice(&members[held..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Per-dimension mean and inverse spread of the training split.
fn standardisation(x: &[Vec<f32>], train: &[usize], width: usize) -> (Vec<f32>, Vec<f32>) {
    let n = train.len().max(1) as f32;
    let mut mean = vec![0.0f32; width];
    for &i in train {
        mean.iter_mut().zip(&x[i]).for_each(|(m, v)| *m += v / n);
    }
    let mut var = vec![0.0f32; width];
    for &i in train {
        var.iter_mut()
            .zip(&x[i])
            .zip(&mean)
            .for_each(|((s, v), m)| *s += (v - m) * (v - m) / n);
    }
    let scale = var.iter().map(|v| 1.0 / (v.sqrt() + 1e-6)).collect();
    (mean, scale)
}

/// Inverse label frequency on the training split, normalised to average one.
fn class_weights(y: &[usize], train: &[usize], classes: usize, on: bool) -> Vec<f32> {
    if !on {
        return vec![1.0; classes];
    }
    let mut counts = vec![0usize; classes];
    for &i in train {
        counts[y[i]] += 1;
    }
    let n = train.len() as f32;
    counts
        .iter()
        .map(|c| {
            if *c == 0 {
                0.0
            } else {
                n / (classes as f32 * *c as f32)
            }
        })
        .collect()
}

fn evaluate(
    head: &Head,
    data: &Dataset,
    val: &[usize],
    labels: &[String],
    loss_curve: Vec<Epoch>,
    best_epoch: usize,
    train_examples: usize,
) -> Metrics {
    let k = data.classes;
    // confusion[truth][predicted]
    let mut confusion = vec![vec![0usize; k]; k];
    for &i in val {
        let p = head.probabilities(&data.x[i], data.text(i));
        confusion[data.y[i]][argmax(&p)] += 1;
    }
    let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
    let per_label: Vec<LabelMetrics> = (0..k)
        .map(|c| {
            let tp = confusion[c][c] as f32;
            let predicted: usize = (0..k).map(|t| confusion[t][c]).sum();
            let support: usize = confusion[c].iter().sum();
            let precision = if predicted == 0 {
                0.0
            } else {
                tp / predicted as f32
            };
            let recall = if support == 0 {
                0.0
            } else {
                tp / support as f32
            };
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            LabelMetrics {
                label: labels.get(c).cloned().unwrap_or_default(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    Metrics {
        accuracy: correct as f32 / val.len().max(1) as f32,
        macro_f1: per_label.iter().map(|l| l.f1).sum::<f32>() / k.max(1) as f32,
        per_label,
        loss_curve,
        best_epoch,
        architecture: head.describe(),
        l2: 0.0,
        train_examples,
        validation_examples: val.len(),
    }
}

pub fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |acc, (i, v)| {
            if *v > acc.1 {
                (i, *v)
            } else {
                acc
            }
        })
        .0
}

fn softmax(z: &mut [f32]) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    z.iter_mut().for_each(|v| *v /= sum);
}

/// In eight running sums, which the compiler keeps in vector registers (one sum in order
/// cannot be reordered, so it stays scalar).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut sums = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            sums[k] += x[k] * y[k];
        }
    }
    let tail = n - n % 8;
    let rest: f32 = a[tail..].iter().zip(&b[tail..]).map(|(x, y)| x * y).sum();
    sums.iter().sum::<f32>() + rest
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

mod adam;
mod backprop;
mod convex;
#[cfg(test)]
mod tests;
