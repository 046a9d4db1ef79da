//! f16 values for attention: rounding to f16 precision, appending to the f16 KV cache,
//! widening it to f32, and attention's two products over that cache (query · cached keys,
//! weights · cached values), from its f16 rows or from their f32 widening.
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
use super::avx2::{narrow8, turned_dots8, widen8};
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
)))]
use super::portable::{narrow8, turned_dots8, widen8};

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

/// `avx2::$simd` where the build has AVX2, FMA and F16C, else the plain 64-output loop.
macro_rules! weighted64_with {
    ($simd:ident($($arg:expr),*)) => {{
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        super::avx2::$simd($($arg),*);
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )))]
        weighted_chunk::<Self, 64>($($arg),*);
    }};
}

/// A cached key or value as attention's products read it: f16 as the cache stores it, or
/// f32 where a prompt's chunk widened the cache once for all its positions. Widening is
/// exact, and both run the same arithmetic in the same order, so a position's products do
/// not depend on which one it read.
pub trait Cached: Copy + Send + Sync {
    fn widen8(row: &[Self]) -> [f32; 8];
    fn to_f32(self) -> f32;
    /// 64 outputs of `cached_weighted_sum`, from the rows' first 64 values.
    fn weighted64(weights: &[f32], rows: &[Self], stride: usize, out: &mut [f32]);
}

impl Cached for f16 {
    #[inline(always)]
    fn widen8(row: &[Self]) -> [f32; 8] {
        widen8(row)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn weighted64(weights: &[f32], rows: &[Self], stride: usize, out: &mut [f32]) {
        weighted64_with!(weighted64_f16(weights, rows, stride, out));
    }
}

impl Cached for f32 {
    #[inline(always)]
    fn widen8(row: &[Self]) -> [f32; 8] {
        std::array::from_fn(|i| row[i])
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn weighted64(weights: &[f32], rows: &[Self], stride: usize, out: &mut [f32]) {
        weighted64_with!(weighted64_f32(weights, rows, stride, out));
    }
}

/// Appends `src` widened to f32, eight at a time with F16C where the build has it.
pub fn extend_f32(dst: &mut Vec<f32>, src: &[f16]) {
    dst.reserve(src.len());
    let mut chunks = src.chunks_exact(8);
    for chunk in &mut chunks {
        dst.extend_from_slice(&widen8(chunk));
    }
    dst.extend(chunks.remainder().iter().map(|x| x.to_f32()));
}

fn dot_cached<T: Cached>(q: &[f32], row: &[T]) -> f32 {
    q.iter().zip(row).map(|(a, b)| a * b.to_f32()).sum()
}

/// `out[p] = scale · q · rows[p]`, where row `p` is `q.len()` values at `p · stride` in
/// `rows` (attention scores over a cache). Eight rows at a time, each in its own eight-lane
/// accumulator, so the horizontal sums of eight dot products overlap instead of each
/// closing a dependency chain alone.
pub fn cached_dots<T: Cached>(q: &[f32], rows: &[T], stride: usize, scale: f32, out: &mut [f32]) {
    let len = q.len();
    if !len.is_multiple_of(8) {
        for (p, o) in out.iter_mut().enumerate() {
            *o = dot_cached(q, &rows[p * stride..p * stride + len]) * scale;
        }
        return;
    }
    let done = out.len() / 8 * 8;
    for (c, chunk) in out.chunks_exact_mut(8).enumerate() {
        let mut acc = [[0f32; 8]; 8];
        for (l, q8) in q.chunks_exact(8).enumerate() {
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = (8 * c + i) * stride + 8 * l;
                let k = T::widen8(&rows[at..at + 8]);
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
        *o = dot_cached(q, &rows[p * stride..p * stride + len]) * scale;
    }
}

/// `out = Σ_p weights[p] · rows[p]`, where row `p` is `out.len()` values at `p · stride`
/// in `rows` (attention's weighted sum of cached values). Sixty-four outputs at a time stay
/// in registers across all rows (eight independent sums, enough to hide the adds' latency),
/// then eight at a time. Each output is summed over the rows in order, however it is split.
pub fn cached_weighted_sum<T: Cached>(weights: &[f32], rows: &[T], stride: usize, out: &mut [f32]) {
    let wide = out.len() / 64 * 64;
    let (head, rest) = out.split_at_mut(wide);
    for (c, chunk) in head.chunks_exact_mut(64).enumerate() {
        T::weighted64(weights, &rows[64 * c..], stride, chunk);
    }
    let narrow = rest.len() / 8 * 8;
    let (middle, tail) = rest.split_at_mut(narrow);
    for (c, chunk) in middle.chunks_exact_mut(8).enumerate() {
        weighted_chunk::<T, 8>(weights, &rows[wide + 8 * c..], stride, chunk);
    }
    let at = wide + narrow;
    tail.fill(0.0);
    for (p, w) in weights.iter().enumerate() {
        let v = &rows[p * stride + at..p * stride + at + tail.len()];
        for (o, x) in tail.iter_mut().zip(v) {
            *o += w * x.to_f32();
        }
    }
}

/// `W` outputs (a multiple of 8) of `cached_weighted_sum`, from the rows' first `W` values.
#[inline(always)]
fn weighted_chunk<T: Cached, const W: usize>(
    weights: &[f32],
    rows: &[T],
    stride: usize,
    out: &mut [f32],
) {
    let mut acc = [0f32; W];
    for (p, w) in weights.iter().enumerate() {
        let v = &rows[p * stride..p * stride + W];
        for (acc, v) in acc.chunks_exact_mut(8).zip(v.chunks_exact(8)) {
            let v = T::widen8(v);
            for lane in 0..8 {
                acc[lane] += w * v[lane];
            }
        }
    }
    out.copy_from_slice(&acc);
}

/// A cache's keys widened to f32 for the many queries of a prompt's chunk, and turned eight
/// positions at a time so that eight consecutive values hold one dimension of eight
/// positions: `[head][block][dim][position in block]`. Only whole blocks are kept; the
/// positions after them are read from the f16 cache.
pub struct TurnedKeys {
    hd: usize,
    blocks: usize,
    data: Vec<f32>,
}

impl TurnedKeys {
    /// The first `len` positions of `keys` (rows of `heads · hd` values).
    pub fn new(keys: &[f16], heads: usize, hd: usize, len: usize) -> Self {
        let blocks = len / 8;
        let mut data = vec![0f32; heads * blocks * hd * 8];
        for (i, block) in data.chunks_exact_mut(hd * 8).enumerate() {
            let (head, c) = (i / blocks, i % blocks);
            for p in 0..8 {
                let row = &keys[(8 * c + p) * heads * hd + head * hd..][..hd];
                for (d, k) in row.iter().enumerate() {
                    block[8 * d + p] = k.to_f32();
                }
            }
        }
        Self { hd, blocks, data }
    }

    /// `cached_dots(q, rows, stride, scale, out)` for key head `head`, where `rows` is that
    /// head's f16 cache: the same products summed in the same order, eight positions per
    /// pass with no sums across lanes until the end.
    pub fn dots(
        &self,
        head: usize,
        q: &[f32],
        rows: &[f16],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let hd = self.hd;
        // Heads without whole 8-value chunks, or more whole blocks than were turned: the
        // plain products from the f16 rows.
        if !hd.is_multiple_of(8) || out.len() < 8 || out.len() / 8 > self.blocks {
            return cached_dots(q, rows, stride, scale, out);
        }
        let done = out.len() / 8 * 8;
        let turned = &self.data[head * self.blocks * hd * 8..];
        for (c, chunk) in out[..done].chunks_exact_mut(8).enumerate() {
            let block = &turned[c * hd * 8..(c + 1) * hd * 8];
            let sums = turned_dots8(q, block);
            for (o, s) in chunk.iter_mut().zip(sums) {
                *o = s * scale;
            }
        }
        let len = q.len();
        for (p, o) in out.iter_mut().enumerate().skip(done) {
            *o = dot_cached(q, &rows[p * stride..p * stride + len]) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdata::vectors;
    use super::*;

    #[test]
    fn attention_products_match_plain_loops_from_f16_and_widened_rows() {
        // Head sizes with and without whole 8- or 32-value chunks; position counts on both
        // sides of the 8-row blocks.
        for (hd, gap) in [(64, 128), (40, 0), (36, 12), (128, 64), (32, 96)] {
            for len in [1, 7, 8, 9, 30, 77] {
                let stride = hd + gap;
                let xs = vectors(1, len * stride);
                let mut rows = Vec::new();
                extend_f16(&mut rows, &xs);
                for (h, x) in rows.iter().zip(&xs) {
                    assert_eq!(*h, f16::from_f32(*x));
                }
                let mut wide = Vec::new();
                extend_f32(&mut wide, &rows);
                for (w, h) in wide.iter().zip(&rows) {
                    assert_eq!(*w, h.to_f32());
                }
                let q = vectors(1, hd + 3)[3..].to_vec();
                let mut got = vec![0f32; len];
                cached_dots(&q, &rows, stride, 0.5, &mut got);
                let mut from_wide = vec![0f32; len];
                cached_dots(&q, &wide, stride, 0.5, &mut from_wide);
                assert_eq!(got, from_wide, "hd {hd} len {len}: widened scores differ");
                // Several heads side by side, as in a cache row: the turned keys of each.
                if gap >= hd {
                    let turned = TurnedKeys::new(&rows, stride / hd, hd, len);
                    let mut from_turned = vec![0f32; len];
                    turned.dots(0, &q, &rows, stride, 0.5, &mut from_turned);
                    assert_eq!(got, from_turned, "hd {hd} len {len}: turned scores differ");
                    let mut second = vec![0f32; len];
                    cached_dots(&q, &rows[hd..], stride, 0.5, &mut second);
                    turned.dots(1, &q, &rows[hd..], stride, 0.5, &mut from_turned);
                    assert_eq!(
                        second, from_turned,
                        "hd {hd} len {len}: second head differs"
                    );
                }
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
                cached_weighted_sum(&weights, &rows, stride, &mut sum);
                let mut from_wide = vec![f32::NAN; hd];
                cached_weighted_sum(&weights, &wide, stride, &mut from_wide);
                assert_eq!(sum, from_wide, "hd {hd} len {len}: widened sums differ");
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
