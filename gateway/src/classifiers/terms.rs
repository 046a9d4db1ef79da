//! Word n-gram features of a text: the TF-IDF of its words and word pairs over a
//! vocabulary taken from the training examples, which softmax regression reads beside the
//! embedding (the words a tenant's labels hinge on, which a sentence embedding blurs).
//!
//! Owns: splitting text into words, the vocabulary with its inverse document frequencies,
//! and a text's sparse, unit-length feature vector. Must never: see labels (the vocabulary
//! is unsupervised), or grow past the bound it was fitted with.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Nonzero features of one text: (column in the vocabulary, value), by column.
pub type Sparse = Vec<(u32, f32)>;

/// A vocabulary of words and word pairs with their inverse document frequencies, and
/// the factor on a text's unit-length TF-IDF vector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Terms {
    /// Sorted; a term's column is its position.
    pub grams: Vec<String>,
    pub idf: Vec<f32>,
    pub weight: f32,
}

/// Lower-cased words of at least two letters or digits, in order (as a sentence would be
/// split for a bag of words: punctuation and single characters dropped).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.chars().nth(1).is_some())
        .map(str::to_lowercase)
        .collect()
}

/// The words of `text`, then each pair of neighbouring words.
fn grams(text: &str) -> Vec<String> {
    let words = words(text);
    let pairs = words.windows(2).map(|p| format!("{} {}", p[0], p[1]));
    let mut out: Vec<String> = pairs.collect();
    out.extend(words);
    out
}

impl Terms {
    /// The vocabulary of `texts`: every word and word pair, or when there are more than
    /// `max_terms` the ones in most texts; smoothed inverse document frequencies
    /// `ln((1 + n) / (1 + df)) + 1`.
    pub fn fit<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        weight: f32,
        max_terms: usize,
    ) -> Self {
        let mut df: HashMap<String, u32> = HashMap::new();
        let mut n = 0usize;
        for text in texts {
            n += 1;
            let mut seen = grams(text);
            seen.sort_unstable();
            seen.dedup();
            for g in seen {
                *df.entry(g).or_default() += 1;
            }
        }
        let mut kept: Vec<(String, u32)> = df.into_iter().collect();
        if kept.len() > max_terms {
            kept.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            kept.truncate(max_terms);
        }
        kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let idf = kept
            .iter()
            .map(|(_, d)| ((1.0 + n as f32) / (1.0 + *d as f32)).ln() + 1.0)
            .collect();
        Self {
            grams: kept.into_iter().map(|(g, _)| g).collect(),
            idf,
            weight,
        }
    }

    /// Columns: one per term.
    pub fn width(&self) -> usize {
        self.grams.len()
    }

    /// `text`'s term counts times their idf, scaled to length `weight`; terms outside the
    /// vocabulary are dropped.
    pub fn features(&self, text: &str) -> Sparse {
        let mut counts: HashMap<u32, f32> = HashMap::new();
        for g in grams(text) {
            if let Ok(col) = self.grams.binary_search(&g) {
                *counts.entry(col as u32).or_default() += 1.0;
            }
        }
        let mut out: Sparse = counts
            .into_iter()
            .map(|(col, tf)| (col, tf * self.idf[col as usize]))
            .collect();
        out.sort_unstable_by_key(|(col, _)| *col);
        let norm = out.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|(_, v)| *v *= self.weight / norm);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_pairs_are_counted_with_their_rarity() {
        assert_eq!(words("I LOVE it!! a b_c 2x"), ["love", "it", "b_c", "2x"]);
        let t = Terms::fit(["good movie", "bad movie", "good good day"], 1.0, 100);
        assert_eq!(
            t.grams,
            [
                "bad",
                "bad movie",
                "day",
                "good",
                "good day",
                "good good",
                "good movie",
                "movie"
            ]
        );
        let f = t.features("Good movie, good!");
        // good (twice), good movie, movie; "movie good" is not in the vocabulary. "good"
        // and "movie" are in two texts each, so weigh alike per occurrence.
        let cols: Vec<u32> = f.iter().map(|(c, _)| *c).collect();
        assert_eq!(cols, [3, 6, 7]);
        let value = |c: u32| f.iter().find(|(k, _)| *k == c).map(|(_, v)| *v).unwrap();
        assert!((value(3) - 2.0 * value(7)).abs() < 1e-6);
        let norm: f32 = f.iter().map(|(_, v)| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        // A rarer term weighs more than a common one at equal count.
        assert!(value(6) > value(7));
        assert!(t.features("nothing known here").is_empty());
    }

    #[test]
    fn the_vocabulary_keeps_the_commonest_terms_within_its_bound() {
        let t = Terms::fit(["a1 b1", "a1 c1", "a1 d1"], 2.0, 1);
        assert_eq!(t.grams, ["a1"]);
        assert_eq!(t.features("a1 zz"), vec![(0, 2.0)]);
    }
}
