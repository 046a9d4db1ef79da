//! Quantized matrix × vector kernels for the chat engine, in the block formats of GGUF.
//!
//! Weights stay in 4- or 8-bit blocks of 32; activations are quantized to 8-bit blocks of
//! 32 (each with its scale and, for the 4-bit kind, the scaled sum of its values) and the
//! dot products are integer sums scaled once per block, as llama.cpp does. One call
//! multiplies a matrix by a whole batch of vectors: each weight row is read from memory once
//! and used for every vector, which is what makes batched decoding cheaper than decoding
//! sequences one by one.
//!
//! Owns: the block layouts after loading, activation quantization, the dot products and the
//! row-parallel matrix multiply. Must never: allocate per block or know about models.
//!
//! The x86-64 path uses AVX2/FMA intrinsics (compiled in when the target has them, as the
//! workspace's default `target-cpu` does); every other target uses the portable loops, and a
//! test checks that both agree.

// The SIMD intrinsics are `unsafe` to call with raw pointers; each use is commented.
#![allow(unsafe_code)]

use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// A matrix of 4-bit blocks: value = `d · q + m` with `q` in 0..16. Q4_0 files load into
/// this form too (`m = -8 d`). Rows are contiguous runs of `cols / 32` blocks.
#[derive(Clone, Default)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    d: Vec<f32>,
    m: Vec<f32>,
    /// Byte `i` of a block holds value `i` in its low nibble and value `i + 16` in its high.
    q: Vec<[u8; 16]>,
}

/// A matrix of 8-bit blocks: value = `d · q` with `q` in -128..128.
#[derive(Clone, Default)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    d: Vec<f32>,
    q: Vec<[i8; 32]>,
}

/// Vectors quantized for the kernels, concatenated (`n` vectors of `cols / 32` blocks).
#[derive(Default)]
pub struct Q8Acts {
    blocks_per_vec: usize,
    d: Vec<f32>,
    /// `d · Σ q` per block, the term that meets a 4-bit block's offset `m`.
    s: Vec<f32>,
    q: Vec<[i8; 32]>,
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl Q4Matrix {
    /// From GGUF Q4_1 blocks (`d: f16, m: f16, qs: [u8; 16]`, 20 bytes).
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 20, |b| {
            (half_at(b, 0), half_at(b, 2), &b[4..20])
        })
    }

    /// From GGUF Q4_0 blocks (`d: f16, qs: [u8; 16]`, 18 bytes; value = `d · (q − 8)`).
    pub fn from_q4_0(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 18, |b| {
            let d = half_at(b, 0);
            (d, -8.0 * d, &b[2..18])
        })
    }

    fn parse(
        raw: &[u8],
        rows: usize,
        cols: usize,
        block_bytes: usize,
        split: impl Fn(&[u8]) -> (f32, f32, &[u8]),
    ) -> anyhow::Result<Self> {
        check_shape(raw.len(), rows, cols, block_bytes)?;
        let blocks = rows * cols / BLOCK;
        let mut out = Self {
            rows,
            cols,
            d: Vec::with_capacity(blocks),
            m: Vec::with_capacity(blocks),
            q: Vec::with_capacity(blocks),
        };
        for b in raw.chunks_exact(block_bytes) {
            let (d, m, q) = split(b);
            let mut nibbles = [0u8; 16];
            nibbles.copy_from_slice(q);
            out.d.push(d);
            out.m.push(m);
            out.q.push(nibbles);
        }
        Ok(out)
    }

    /// Appends the rows of `other` (same width), so several projections of one input run as
    /// one multiply.
    pub fn stack(&mut self, other: &Self) {
        debug_assert_eq!(self.cols, other.cols);
        self.rows += other.rows;
        self.d.extend_from_slice(&other.d);
        self.m.extend_from_slice(&other.m);
        self.q.extend_from_slice(&other.q);
    }

    /// Row `r` as f32 values.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / BLOCK;
        for (j, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let i = r * bpr + j;
            for (k, byte) in self.q[i].iter().enumerate() {
                chunk[k] = self.d[i] * f32::from(byte & 0x0F) + self.m[i];
                chunk[k + 16] = self.d[i] * f32::from(byte >> 4) + self.m[i];
            }
        }
    }
}

impl Q8Matrix {
    /// From GGUF Q8_0 blocks (`d: f16, qs: [i8; 32]`, 34 bytes).
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        check_shape(raw.len(), rows, cols, 34)?;
        let blocks = rows * cols / BLOCK;
        let mut out = Self {
            rows,
            cols,
            d: Vec::with_capacity(blocks),
            q: Vec::with_capacity(blocks),
        };
        for b in raw.chunks_exact(34) {
            let mut q = [0i8; 32];
            for (dst, src) in q.iter_mut().zip(&b[2..34]) {
                *dst = *src as i8;
            }
            out.d.push(half_at(b, 0));
            out.q.push(q);
        }
        Ok(out)
    }

    pub fn stack(&mut self, other: &Self) {
        debug_assert_eq!(self.cols, other.cols);
        self.rows += other.rows;
        self.d.extend_from_slice(&other.d);
        self.q.extend_from_slice(&other.q);
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / BLOCK;
        for (j, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let i = r * bpr + j;
            for (v, q) in chunk.iter_mut().zip(&self.q[i]) {
                *v = self.d[i] * f32::from(*q);
            }
        }
    }
}

fn check_shape(len: usize, rows: usize, cols: usize, block_bytes: usize) -> anyhow::Result<()> {
    if !cols.is_multiple_of(BLOCK) {
        anyhow::bail!("rows of {cols} values are not whole blocks of {BLOCK}");
    }
    let want = rows * cols / BLOCK * block_bytes;
    if len != want {
        anyhow::bail!("tensor holds {len} bytes; {rows}×{cols} needs {want}");
    }
    Ok(())
}

impl Q8Acts {
    /// Quantizes `n` vectors of `cols` values each (`xs.len() == n · cols`), rounding each
    /// block's scale to f16 as the file formats do.
    pub fn quantize(xs: &[f32], cols: usize) -> Self {
        let bpr = cols / BLOCK;
        let blocks = xs.len() / BLOCK;
        let mut out = Self {
            blocks_per_vec: bpr,
            d: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
            q: Vec::with_capacity(blocks),
        };
        for block in xs.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
            let d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut q = [0i8; 32];
            let mut sum = 0i32;
            for (dst, x) in q.iter_mut().zip(block) {
                let v = (x * inv).round() as i8;
                *dst = v;
                sum += i32::from(v);
            }
            out.d.push(round_f16(d));
            out.s.push(round_f16(d * sum as f32));
            out.q.push(q);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.d.len().checked_div(self.blocks_per_vec).unwrap_or(0)
    }

    fn range(&self, v: usize) -> std::ops::Range<usize> {
        v * self.blocks_per_vec..(v + 1) * self.blocks_per_vec
    }
}

/// Rows handled per parallel task: a few tasks per thread so uneven progress evens out,
/// but never so few rows that scheduling costs more than the work.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(16).min(rows.max(1))
}

/// A matrix whose rows the kernels can dot with quantized vectors.
trait Kernel: Sync {
    fn shape(&self) -> (usize, usize);

    /// Dot products of the blocks `row` with `N` vectors whose blocks start at `starts`.
    fn dots<const N: usize>(
        &self,
        row: std::ops::Range<usize>,
        acts: &Q8Acts,
        starts: [usize; N],
        out: &mut [f32],
    );

    /// `out[v · rows + r] = row r · vector v` for every vector of `acts`.
    fn matmul(&self, acts: &Q8Acts, out: &mut Vec<f32>) {
        let (rows, cols) = self.shape();
        let bpr = cols / BLOCK;
        let n = acts.len();
        // Computed row-major by weight row (each row read once for all vectors, up to four
        // at a time), then transposed to one contiguous output per vector.
        let mut by_row = vec![0f32; rows * n];
        let chunk = rows_per_task(rows);
        by_row
            .par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|(c, part)| {
                for (i, row_out) in part.chunks_exact_mut(n).enumerate() {
                    let r = c * chunk + i;
                    let blocks = r * bpr..(r + 1) * bpr;
                    let mut v = 0;
                    while v < n {
                        let take = (n - v).min(4);
                        let slot = &mut row_out[v..v + take];
                        let start = |k: usize| acts.range(v + k).start;
                        match take {
                            4 => self.dots::<4>(
                                blocks.clone(),
                                acts,
                                std::array::from_fn(start),
                                slot,
                            ),
                            3 => self.dots::<3>(
                                blocks.clone(),
                                acts,
                                std::array::from_fn(start),
                                slot,
                            ),
                            2 => self.dots::<2>(
                                blocks.clone(),
                                acts,
                                std::array::from_fn(start),
                                slot,
                            ),
                            _ => self.dots::<1>(
                                blocks.clone(),
                                acts,
                                std::array::from_fn(start),
                                slot,
                            ),
                        }
                        v += take;
                    }
                }
            });
        out.clear();
        out.resize(rows * n, 0.0);
        for r in 0..rows {
            for v in 0..n {
                out[v * rows + r] = by_row[r * n + v];
            }
        }
    }
}

/// The kernel impl of a matrix type: the SIMD dot products where the build has AVX2/FMA,
/// the portable ones elsewhere.
macro_rules! kernel {
    ($matrix:ty, $dots:ident) => {
        impl Kernel for $matrix {
            fn shape(&self) -> (usize, usize) {
                (self.rows, self.cols)
            }

            fn dots<const N: usize>(
                &self,
                row: std::ops::Range<usize>,
                acts: &Q8Acts,
                starts: [usize; N],
                out: &mut [f32],
            ) {
                #[cfg(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma"
                ))]
                simd::$dots::<N>(self, row, acts, starts, out);
                #[cfg(not(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma"
                )))]
                portable::$dots::<N>(self, row, acts, starts, out);
            }
        }

        impl $matrix {
            /// `out[v · rows + r] = row r · vector v` for every vector of `acts`.
            pub fn matmul(&self, acts: &Q8Acts, out: &mut Vec<f32>) {
                Kernel::matmul(self, acts, out);
            }
        }
    };
}

kernel!(Q4Matrix, q4_dots);
kernel!(Q8Matrix, q8_dots);

// With SIMD compiled in, the portable loops serve as the tests' reference.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
mod portable {
    use super::{Q4Matrix, Q8Acts, Q8Matrix};

    pub fn q4_dots<const N: usize>(
        w: &Q4Matrix,
        row: std::ops::Range<usize>,
        acts: &Q8Acts,
        starts: [usize; N],
        out: &mut [f32],
    ) {
        let mut acc = [0f32; N];
        for (j, i) in row.enumerate() {
            let mut lo = [0i32; 16];
            let mut hi = [0i32; 16];
            for (k, byte) in w.q[i].iter().enumerate() {
                lo[k] = i32::from(byte & 0x0F);
                hi[k] = i32::from(byte >> 4);
            }
            for (a, start) in acc.iter_mut().zip(starts) {
                let x = &acts.q[start + j];
                let mut sum = 0i32;
                for k in 0..16 {
                    sum += lo[k] * i32::from(x[k]) + hi[k] * i32::from(x[k + 16]);
                }
                *a += w.d[i] * acts.d[start + j] * sum as f32 + w.m[i] * acts.s[start + j];
            }
        }
        out.copy_from_slice(&acc);
    }

    pub fn q8_dots<const N: usize>(
        w: &Q8Matrix,
        row: std::ops::Range<usize>,
        acts: &Q8Acts,
        starts: [usize; N],
        out: &mut [f32],
    ) {
        let mut acc = [0f32; N];
        for (j, i) in row.enumerate() {
            for (a, start) in acc.iter_mut().zip(starts) {
                let x = &acts.q[start + j];
                let sum: i32 = w.q[i]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| i32::from(*a) * i32::from(*b))
                    .sum();
                *a += w.d[i] * acts.d[start + j] * sum as f32;
            }
        }
        out.copy_from_slice(&acc);
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd {
    use std::arch::x86_64::*;

    use super::{Q4Matrix, Q8Acts, Q8Matrix};

    #[inline(always)]
    #[allow(unused_unsafe)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only AVX operations; the target has AVX (checked by cfg).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }

    #[inline(always)]
    #[allow(unused_unsafe)]
    fn load32(x: &[i8; 32]) -> __m256i {
        // SAFETY: `x` is 32 readable bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(x.as_ptr().cast()) }
    }

    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn q4_dots<const N: usize>(
        w: &Q4Matrix,
        row: std::ops::Range<usize>,
        acts: &Q8Acts,
        starts: [usize; N],
        out: &mut [f32],
    ) {
        // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); the only memory
        // access is the 16-byte load below, from a `[u8; 16]`.
        unsafe {
            let mask = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            let mut offsets = [0f32; N];
            for (j, i) in row.enumerate() {
                let packed = _mm_loadu_si128(w.q[i].as_ptr().cast());
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
                let nibbles = _mm256_and_si256(both, mask);
                let (d, m) = (w.d[i], w.m[i]);
                for k in 0..N {
                    let a = starts[k] + j;
                    let x = load32(&acts.q[a]);
                    let pairs = _mm256_maddubs_epi16(nibbles, x);
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * acts.d[a]), sums, acc[k]);
                    offsets[k] += m * acts.s[a];
                }
            }
            for k in 0..N {
                out[k] = hsum(acc[k]) + offsets[k];
            }
        }
    }

    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn q8_dots<const N: usize>(
        w: &Q8Matrix,
        row: std::ops::Range<usize>,
        acts: &Q8Acts,
        starts: [usize; N],
        out: &mut [f32],
    ) {
        // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); loads go through
        // `load32` from `[i8; 32]` arrays.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            for (j, i) in row.enumerate() {
                let q = load32(&w.q[i]);
                // maddubs multiplies unsigned by signed: move the weight's sign onto x.
                let magnitude = _mm256_sign_epi8(q, q);
                let d = w.d[i];
                for k in 0..N {
                    let a = starts[k] + j;
                    let x = _mm256_sign_epi8(load32(&acts.q[a]), q);
                    let pairs = _mm256_maddubs_epi16(magnitude, x);
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * acts.d[a]), sums, acc[k]);
                }
            }
            for k in 0..N {
                out[k] = hsum(acc[k]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as u8
        };
        let mut raw = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.01 + f32::from(next()) / 5000.0);
            let m = f16::from_f32(-(f32::from(next()) / 1000.0));
            raw.extend_from_slice(&d.to_le_bytes());
            raw.extend_from_slice(&m.to_le_bytes());
            for _ in 0..16 {
                raw.push(next());
            }
        }
        raw
    }

    fn vectors(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 3) as f32))
            .collect()
    }

    #[test]
    fn q4_matmul_matches_dequantized_reference_for_every_batch_size() {
        let (rows, cols) = (37, 96);
        let w = Q4Matrix::from_q4_1(&q4_1_bytes(rows, cols, 7), rows, cols).unwrap();
        for n in [1, 2, 3, 4, 5, 9] {
            let xs = vectors(n, cols);
            let acts = Q8Acts::quantize(&xs, cols);
            let mut out = Vec::new();
            w.matmul(&acts, &mut out);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                for v in 0..n {
                    let exact: f32 = row.iter().zip(&xs[v * cols..]).map(|(a, b)| a * b).sum();
                    let got = out[v * rows + r];
                    let scale = row.iter().map(|x| x.abs()).sum::<f32>() + 1.0;
                    assert!(
                        (got - exact).abs() < 0.02 * scale,
                        "n={n} r={r} v={v}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_and_portable_kernels_agree() {
        let (rows, cols) = (5, 64);
        let w4 = Q4Matrix::from_q4_1(&q4_1_bytes(rows, cols, 3), rows, cols).unwrap();
        let mut raw8 = Vec::new();
        for i in 0..rows * cols / BLOCK {
            raw8.extend_from_slice(&f16::from_f32(0.02 + i as f32 / 100.0).to_le_bytes());
            raw8.extend((0..32).map(|k| ((k * 37 + i * 11) % 256) as u8));
        }
        let w8 = Q8Matrix::from_q8_0(&raw8, rows, cols).unwrap();
        let acts = Q8Acts::quantize(&vectors(3, cols), cols);
        let bpr = cols / BLOCK;
        for r in 0..rows {
            let starts = [0, bpr, 2 * bpr];
            let (mut a, mut b) = ([0f32; 3], [0f32; 3]);
            portable::q4_dots::<3>(&w4, r * bpr..(r + 1) * bpr, &acts, starts, &mut a);
            w4.dots::<3>(r * bpr..(r + 1) * bpr, &acts, starts, &mut b);
            for k in 0..3 {
                assert!(
                    (a[k] - b[k]).abs() <= 1e-3 * a[k].abs().max(1.0),
                    "{a:?} {b:?}"
                );
            }
            portable::q8_dots::<3>(&w8, r * bpr..(r + 1) * bpr, &acts, starts, &mut a);
            w8.dots::<3>(r * bpr..(r + 1) * bpr, &acts, starts, &mut b);
            for k in 0..3 {
                assert!(
                    (a[k] - b[k]).abs() <= 1e-3 * a[k].abs().max(1.0),
                    "{a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn q4_0_is_q4_1_with_offset_minus_eight_d() {
        let raw = [
            f16::from_f32(0.5).to_le_bytes().to_vec(),
            (0..16u8).map(|i| i | (15 - i) << 4).collect(),
        ]
        .concat();
        let w = Q4Matrix::from_q4_0(&raw, 1, 32).unwrap();
        let mut row = [0f32; 32];
        w.dequantize_row(0, &mut row);
        assert_eq!(row[0], -4.0);
        assert_eq!(row[15], 3.5);
        assert_eq!(row[16], 3.5);
        assert_eq!(row[31], -4.0);
    }

    #[test]
    fn rejects_a_tensor_of_the_wrong_size() {
        assert!(Q4Matrix::from_q4_1(&[0u8; 40], 1, 32).is_err());
        assert!(Q8Matrix::from_q8_0(&[0u8; 34], 1, 48).is_err());
    }
}
