//! Zero-shot classification: the input and each label are embedded; a label's score is the
//! softmax of the scaled cosine similarities, so scores sum to one.
//!
//! Owns: the scores and the prediction from vectors already embedded. Must never: embed
//! text or depend on which model made the vectors, beyond their being unit length.

use std::collections::BTreeMap;

use openai_types::Classification;

/// Cosines of unit vectors lie in [-1, 1]; this scale turns their small differences into a
/// usable confidence (the inverse of the temperature used in contrastive training).
const SIMILARITY_SCALE: f32 = 20.0;

/// Classifies each input vector against the label vectors (all unit length).
pub fn classify(
    inputs: &[Vec<f32>],
    labels: &[String],
    label_vectors: &[Vec<f32>],
) -> Vec<Classification> {
    inputs
        .iter()
        .map(|input| {
            let logits: Vec<f32> = label_vectors
                .iter()
                .map(|l| SIMILARITY_SCALE * dot(input, l))
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            let probs: Vec<f32> = exp.iter().map(|e| e / total).collect();
            let (best, confidence) =
                probs
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |acc, (i, p)| {
                        if *p > acc.1 {
                            (i, *p)
                        } else {
                            acc
                        }
                    });
            Classification {
                prediction: labels[best].clone(),
                confidence,
                scores: labels
                    .iter()
                    .cloned()
                    .zip(probs)
                    .collect::<BTreeMap<_, _>>(),
            }
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_label_wins_and_scores_sum_to_one() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let vecs = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let out = classify(&[vec![0.8, 0.6]], &labels, &vecs);
        assert_eq!(out[0].prediction, "a");
        let sum: f32 = out[0].scores.values().sum();
        assert!((sum - 1.0).abs() < 1e-5);
        assert!(out[0].confidence > 0.5);
    }
}
