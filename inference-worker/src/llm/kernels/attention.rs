//! f16 values for attention: rounding to f16 precision, appending to the f16 KV cache, and
//! attention's two products over that cache (query · cached keys, weights · cached values).
//!
//! Owns: the f16 conversions and the cache-side products, eight lanes at a time (F16C where
//! the build has it). Must never: know the cache's layout beyond a row stride, or touch
//! quantized blocks.

use half::f16;

// Eight values at a time between f32 and f16: F16C where the build has it.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
))]
use super::avx2::{narrow8, widen8};
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
)))]
use super::portable::{narrow8, widen8};

/// One value rounded to the nearest f16, kept as f32.
pub(super) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds every value to the nearest f16 (kept as f32), eight at a time with F16C where the
/// build has it.
pub fn round_to_f16(xs: &mut [f32]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        let mut chunks = xs.chunks_exact_mut(8);
        for chunk in &mut chunks {
            super::avx2::round_to_f16(chunk);
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = round_f16(*x));
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    xs.iter_mut().for_each(|x| *x = round_f16(*x));
}

/// Appends `src` rounded to f16, eight at a time with F16C where the build has it.
pub fn extend_f16(dst: &mut Vec<f16>, src: &[f32]) {
    dst.reserve(src.len());
    let mut chunks = src.chunks_exact(8);
    for chunk in &mut chunks {
        dst.extend_from_slice(&narrow8(chunk));
    }
    dst.extend(chunks.remainder().iter().map(|x| f16::from_f32(*x)));
}

fn dot_f16(q: &[f32], row: &[f16]) -> f32 {
    q.iter().zip(row).map(|(a, b)| a * b.to_f32()).sum()
}

/// `out[p] = scale · q · rows[p]`, where row `p` is `q.len()` f16 values at `p · stride` in
/// `rows` (attention scores over a cache). Eight rows at a time, each in its own eight-lane
/// accumulator, so the horizontal sums of eight dot products overlap instead of each
/// closing a dependency chain alone.
pub fn f16_dots(q: &[f32], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
    let len = q.len();
    if !len.is_multiple_of(8) {
        for (p, o) in out.iter_mut().enumerate() {
            *o = dot_f16(q, &rows[p * stride..p * stride + len]) * scale;
        }
        return;
    }
    let done = out.len() / 8 * 8;
    for (c, chunk) in out.chunks_exact_mut(8).enumerate() {
        let mut acc = [[0f32; 8]; 8];
        for (l, q8) in q.chunks_exact(8).enumerate() {
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = (8 * c + i) * stride + 8 * l;
                let k = widen8(&rows[at..at + 8]);
                for lane in 0..8 {
                    acc[lane] += q8[lane] * k[lane];
                }
            }
        }
        for (o, acc) in chunk.iter_mut().zip(&acc) {
            *o = acc.iter().sum::<f32>() * scale;
        }
    }
    for (p, o) in out.iter_mut().enumerate().skip(done) {
        *o = dot_f16(q, &rows[p * stride..p * stride + len]) * scale;
    }
}

/// `out = Σ_p weights[p] · rows[p]`, where row `p` is `out.len()` f16 values at `p · stride`
/// in `rows` (attention's weighted sum of cached values). Thirty-two outputs at a time stay
/// in registers across all rows.
pub fn f16_weighted_sum(weights: &[f32], rows: &[f16], stride: usize, out: &mut [f32]) {
    let mut at = 0;
    let mut chunks = out.chunks_exact_mut(32);
    for chunk in &mut chunks {
        let mut acc = [0f32; 32];
        for (p, w) in weights.iter().enumerate() {
            let v = &rows[p * stride + at..p * stride + at + 32];
            for (acc, v) in acc.chunks_exact_mut(8).zip(v.chunks_exact(8)) {
                let v = widen8(v);
                for lane in 0..8 {
                    acc[lane] += w * v[lane];
                }
            }
        }
        chunk.copy_from_slice(&acc);
        at += 32;
    }
    let tail = chunks.into_remainder();
    tail.fill(0.0);
    for (p, w) in weights.iter().enumerate() {
        let v = &rows[p * stride + at..p * stride + at + tail.len()];
        for (o, x) in tail.iter_mut().zip(v) {
            *o += w * x.to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdata::vectors;
    use super::*;

    #[test]
    fn f16_attention_helpers_match_plain_loops() {
        // Head sizes with and without whole 8- or 32-value chunks; position counts on both
        // sides of the 8-row blocks.
        for (hd, gap) in [(64, 128), (40, 0), (36, 12), (128, 64)] {
            for len in [1, 7, 8, 9, 30] {
                let stride = hd + gap;
                let xs = vectors(1, len * stride);
                let mut rows = Vec::new();
                extend_f16(&mut rows, &xs);
                for (h, x) in rows.iter().zip(&xs) {
                    assert_eq!(*h, f16::from_f32(*x));
                }
                let q = vectors(1, hd + 3)[3..].to_vec();
                let mut got = vec![0f32; len];
                f16_dots(&q, &rows, stride, 0.5, &mut got);
                for (p, g) in got.iter().enumerate() {
                    let row = &rows[p * stride..];
                    let want = q.iter().zip(row).map(|(a, b)| a * b.to_f32()).sum::<f32>() * 0.5;
                    assert!(
                        (g - want).abs() < 1e-4,
                        "hd {hd} len {len} p {p}: {g} vs {want}"
                    );
                }
                let weights = vectors(1, len + 5)[5..].to_vec();
                let mut sum = vec![f32::NAN; hd];
                f16_weighted_sum(&weights, &rows, stride, &mut sum);
                for (d, s) in sum.iter().enumerate() {
                    let want: f32 = (0..len)
                        .map(|p| weights[p] * rows[p * stride + d].to_f32())
                        .sum();
                    assert!(
                        (s - want).abs() < 1e-4,
                        "hd {hd} len {len} d {d}: {s} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn f16_rounding_in_bulk_equals_one_by_one() {
        let mut xs: Vec<f32> = (0..1003)
            .map(|i| (i as f32 - 500.0) * 0.137 * (1.0 + (i % 7) as f32).powi(3))
            .collect();
        xs.extend([1e-7, 6.0e-5, 65504.0, 70000.0, -0.0, f32::MIN_POSITIVE]);
        let want: Vec<f32> = xs.iter().map(|x| round_f16(*x)).collect();
        round_to_f16(&mut xs);
        assert_eq!(xs, want);
    }
}
