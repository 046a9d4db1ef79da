//! Gradient checks, L2, reproducibility, class weights and the split.

use super::*;

/// Three Gaussian blobs in 8 dimensions, `n` per label.
fn blobs(n: usize, seed: u64) -> Dataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for c in 0..3 {
        for _ in 0..n {
            let mut v: Vec<f32> = (0..8).map(|_| 0.6 * normal(&mut rng)).collect();
            v[c] += 2.0;
            x.push(v);
            y.push(c);
        }
    }
    Dataset {
        x,
        texts: Vec::new(),
        y,
        classes: 3,
    }
}

fn labels() -> Vec<String> {
    ["a", "b", "c"].map(String::from).to_vec()
}

fn head(hidden: &[usize], seed: u64) -> Head {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut layers = Vec::new();
    let mut inp = 8;
    for h in hidden {
        layers.push(Layer::new(inp, *h, &mut rng, true));
        inp = *h;
    }
    layers.push(Layer::new(inp, 3, &mut rng, false));
    for l in &mut layers {
        l.b.iter_mut().for_each(|b| *b = 0.1 * normal(&mut rng));
    }
    Head {
        mean: vec![0.0; 8],
        scale: vec![1.0; 8],
        terms: None,
        layers,
    }
}

/// Backpropagation against central differences, for every parameter, with and without
/// the hidden layer, with class weights and L2.
#[test]
fn analytic_gradients_match_numeric_ones() {
    let data = blobs(4, 1);
    let batch: Vec<usize> = (0..data.y.len()).collect();
    let weights = [0.5, 1.0, 2.0];
    for hidden in [vec![], vec![5]] {
        let h = head(&hidden, 2);
        let mut g = Grads::zeros(&h);
        loss(
            &h,
            &data.x,
            &[],
            &data.y,
            &batch,
            &weights,
            0.01,
            Some(&mut g),
        );
        let eps = 1e-2f32;
        let mut checked = 0;
        for k in 0..h.layers.len() {
            for (is_bias, len) in [(false, h.layers[k].w.len()), (true, h.layers[k].b.len())] {
                for j in 0..len {
                    let at = |delta: f32| {
                        let mut p = h.clone();
                        let v = if is_bias {
                            &mut p.layers[k].b[j]
                        } else {
                            &mut p.layers[k].w[j]
                        };
                        *v += delta;
                        loss(&p, &data.x, &[], &data.y, &batch, &weights, 0.01, None) as f64
                    };
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                    let analytic = if is_bias {
                        g.layers[k].1[j]
                    } else {
                        g.layers[k].0[j]
                    } as f64;
                    let tolerance = 2e-3 + 2e-2 * numeric.abs();
                    assert!(
                        (numeric - analytic).abs() < tolerance,
                        "layer {k} {} {j}: numeric {numeric}, analytic {analytic} ({hidden:?})",
                        if is_bias { "bias" } else { "weight" }
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 20);
    }
}

#[test]
fn l2_shrinks_the_weights() {
    let data = blobs(30, 3);
    let norm = |l2: f32| {
        let opts = Options {
            hidden_units: 0,
            l2: Some(l2),
            max_epochs: 60,
            patience: 60,
            ..Options::default()
        };
        let (head, _) = train(&data, &labels(), &opts, &mut |_, _, _| {});
        head.weights_sq()
    };
    let (none, some, strong) = (norm(0.0), norm(0.05), norm(1.0));
    assert!(none > some && some > strong, "{none} {some} {strong}");
}

#[test]
fn separable_labels_are_learned_reproducibly() {
    let data = blobs(40, 5);
    let opts = Options::default();
    let mut epochs = 0;
    let (a, m) = train(&data, &labels(), &opts, &mut |_, e, _| {
        epochs = epochs.max(e)
    });
    assert!(m.accuracy > 0.9 && m.macro_f1 > 0.9, "{m:?}");
    assert_eq!(m.validation_examples, 24);
    assert!(m.best_epoch >= 1 && epochs >= m.best_epoch);
    assert!(m.loss_curve.first().unwrap().train_loss > m.loss_curve.last().unwrap().train_loss);
    let p = a.probabilities(&data.x[0], "");
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    // The same seed gives the same head; another seed another one.
    let (b, _) = train(&data, &labels(), &opts, &mut |_, _, _| {});
    assert_eq!(a, b);
    // Another seed draws another validation split (a convex fit on every example may
    // still end at the same optimum).
    let other = Options { seed: 7, ..opts };
    let (_, n) = train(&data, &labels(), &other, &mut |_, _, _| {});
    assert_ne!(m.loss_curve, n.loss_curve);
}

#[test]
fn class_weights_raise_the_recall_of_a_rare_label() {
    // Label 2 is rare and overlaps the others.
    let mut data = blobs(60, 9);
    let keep: Vec<usize> = (0..data.y.len())
        .filter(|i| data.y[*i] != 2 || i % 6 == 0)
        .collect();
    data.x = keep.iter().map(|i| data.x[*i].clone()).collect();
    data.y = keep.iter().map(|i| data.y[*i]).collect();
    for v in data.x.iter_mut() {
        v[2] *= 0.4;
    }
    let recall = |class_weights| {
        let opts = Options {
            class_weights,
            hidden_units: 0,
            validation_split: 0.5,
            ..Options::default()
        };
        let (_, m) = train(&data, &labels(), &opts, &mut |_, _, _| {});
        m.per_label[2].recall
    };
    assert!(
        recall(true) >= recall(false),
        "{} {}",
        recall(true),
        recall(false)
    );
}

#[test]
fn every_label_keeps_a_training_and_a_validation_example() {
    let y = vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (train, val) = split(&y, 2, 0.2, &mut rng);
    assert_eq!(train.len() + val.len(), y.len());
    for c in 0..2 {
        assert!(train.iter().any(|i| y[*i] == c) && val.iter().any(|i| y[*i] == c));
    }
    assert!(Options {
        l2: Some(-1.0),
        ..Options::default()
    }
    .validate()
    .is_err());
    assert!(Options::default().validate().is_ok());
}

/// Softmax regression ends where the gradient of its objective vanishes, and the penalty
/// cross-validation picks is one of the grid.
#[test]
fn softmax_regression_is_fitted_to_its_optimum() {
    let data = blobs(50, 4);
    let opts = Options {
        hidden_units: 0,
        ..Options::default()
    };
    let (head, m) = train(&data, &labels(), &opts, &mut |_, _, _| {});
    assert!(L2_GRID.contains(&m.l2), "{}", m.l2);
    let all: Vec<usize> = (0..data.y.len()).collect();
    let x: Vec<Vec<f32>> = data.x.iter().map(|v| head.standardise(v)).collect();
    let weights = class_weights(&data.y, &all, 3, true);
    let mut g = Grads::zeros(&head);
    loss(&head, &x, &[], &data.y, &all, &weights, m.l2, Some(&mut g));
    let largest = g.layers[0]
        .0
        .iter()
        .chain(&g.layers[0].1)
        .fold(0f32, |a, v| a.max(v.abs()));
    assert!(largest < 1e-4, "gradient {largest}");
    // Much noise, few examples: a stronger penalty than with many clean ones.
    let noisy = |n, extra: f32| {
        let mut d = blobs(n, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        d.x.iter_mut()
            .flatten()
            .for_each(|v| *v += extra * normal(&mut rng));
        train(&d, &labels(), &opts, &mut |_, _, _| {}).1.l2
    };
    let (few, many) = (noisy(8, 2.0), noisy(200, 0.0));
    assert!(few > many, "{few} {many}");
}

/// The n-gram columns' gradients against central differences, beside the embedding's.
#[test]
fn analytic_gradients_match_numeric_ones_with_n_gram_features() {
    let data = blobs(4, 6);
    let batch: Vec<usize> = (0..data.y.len()).collect();
    let weights = [1.0, 0.5, 2.0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let h = Head {
        mean: vec![0.0; 8],
        scale: vec![1.0; 8],
        terms: None,
        layers: vec![Layer::new(8 + 3, 3, &mut rng, false)],
    };
    let terms: Vec<Sparse> = (0..data.y.len())
        .map(|i| match i % 3 {
            0 => vec![(0, 0.6), (2, 0.8)],
            1 => vec![(1, 1.0)],
            _ => Vec::new(),
        })
        .collect();
    let mut g = Grads::zeros(&h);
    loss(
        &h,
        &data.x,
        &terms,
        &data.y,
        &batch,
        &weights,
        0.01,
        Some(&mut g),
    );
    let eps = 1e-2f32;
    for j in 0..h.layers[0].w.len() {
        let at = |delta: f32| {
            let mut p = h.clone();
            p.layers[0].w[j] += delta;
            loss(&p, &data.x, &terms, &data.y, &batch, &weights, 0.01, None) as f64
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        let analytic = g.layers[0].0[j] as f64;
        assert!(
            (numeric - analytic).abs() < 2e-3 + 2e-2 * numeric.abs(),
            "weight {j}: numeric {numeric}, analytic {analytic}"
        );
    }
}

/// Where the words decide the label and the embedding carries nothing, cross-validation
/// takes the n-gram features and the head learns from them; a word never seen in training
/// is ignored at prediction.
#[test]
fn n_gram_features_are_taken_where_the_words_decide() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let cue = ["calm sea", "loud storm", "warm sun"];
    let filler = [
        "the", "boat", "went", "out", "again", "today", "with", "crew",
    ];
    let (mut x, mut texts, mut y) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..90 {
        let c = i % 3;
        x.push((0..8).map(|_| normal(&mut rng)).collect::<Vec<f32>>());
        let words: Vec<&str> = (0..4)
            .map(|_| filler[rng.random_range(0..filler.len())])
            .collect();
        texts.push(format!(
            "{} {} {}",
            words[..2].join(" "),
            cue[c],
            words[2..].join(" ")
        ));
        y.push(c);
    }
    let data = Dataset {
        x,
        texts,
        y,
        classes: 3,
    };
    let opts = Options {
        hidden_units: 0,
        ..Options::default()
    };
    let (head, m) = train(&data, &labels(), &opts, &mut |_, _, _| {});
    assert!(head.terms.is_some(), "{}", m.architecture);
    assert!(m.architecture.contains("n-grams"), "{}", m.architecture);
    // Chance is a third; the embedding alone scores about that.
    assert!(m.accuracy > 0.8, "{m:?}");
    let p = head.probabilities(&data.x[0], "a loud storm came");
    assert_eq!(argmax(&p), 1, "{p:?}");
    let unknown = head.probabilities(&data.x[0], "zzz qqq");
    let embedding_only = head.probabilities(&data.x[0], "");
    assert_eq!(unknown, embedding_only);
}
