//! The kernels with AVX2/FMA (and F16C for the f16 conversions) intrinsics, compiled in on
//! x86-64 targets that have them. Each must give what its `portable` twin gives, up to
//! float summation order; the tests check that.
//!
//! Owns: every `unsafe` block of the chat model's kernels. Must never: be called on a build
//! without these features (the module's cfg and the callers' cfg see to that) or read
//! memory outside the arrays it is handed.

// The SIMD intrinsics are `unsafe` to call with raw pointers; each use is commented.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::f16;

use super::layout::{ActBlock, Q4Block, Q4Tile, Q5Block, Q5Tile, Q8Block, Q8Tile, S8Block, S8Tile};
use super::TILE_ROWS;

/// Four activation bytes `4g..4g+4` of `q` as one 32-bit lane pattern, in every lane.
#[inline(always)]
#[allow(unused_unsafe)]
pub(super) fn broadcast4(q: &[i8; 32], at: usize) -> __m256i {
    let word = i32::from_le_bytes([
        q[at] as u8,
        q[at + 1] as u8,
        q[at + 2] as u8,
        q[at + 3] as u8,
    ]);
    // SAFETY: register-only AVX operation.
    unsafe { _mm256_set1_epi32(word) }
}

/// Per block: four 32-byte loads give all 8 rows' values; for each vector, eight
/// multiply-adds against broadcast activation bytes accumulate 16-bit partial sums
/// (at most 8 · 2 · 15 · 127 = 30 480 in magnitude, so no overflow), one widening
/// multiply-add finishes the 8 row sums, and the scales are applied as vectors.
#[inline(always)]
#[allow(unused_unsafe)]
pub fn tile_dots<const N: usize>(
    tiles: &[Q4Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let len = tiles.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); loads read
    // `[u8; 32]` and `[f32; 8]` arrays, stores write `[f32; 8]` arrays, all unaligned.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, t) in tiles.iter().enumerate() {
            let mut partial = [_mm256_setzero_si256(); N];
            for g in 0..4 {
                let packed = _mm256_loadu_si256(t.q[g].as_ptr().cast());
                let lo = _mm256_and_si256(packed, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask);
                for k in 0..N {
                    let a = &xs[k][b].q;
                    let low = _mm256_maddubs_epi16(lo, broadcast4(a, 4 * g));
                    let high = _mm256_maddubs_epi16(hi, broadcast4(a, 16 + 4 * g));
                    partial[k] = _mm256_add_epi16(partial[k], _mm256_add_epi16(low, high));
                }
            }
            let d = _mm256_loadu_ps(t.d.as_ptr());
            let m = _mm256_loadu_ps(t.m.as_ptr());
            for k in 0..N {
                let a = &xs[k][b];
                let dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(partial[k], ones));
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                acc[k] = _mm256_fmadd_ps(scale, dots, acc[k]);
                acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), acc[k]);
            }
        }
        for k in 0..N {
            _mm256_storeu_ps(sums[k].as_mut_ptr(), acc[k]);
        }
    }
}

/// Eight values rounded to f16.
#[cfg(target_feature = "f16c")]
#[inline(always)]
#[allow(unused_unsafe)]
pub fn narrow8(chunk: &[f32]) -> [f16; 8] {
    assert!(chunk.len() >= 8);
    let mut out = [f16::ZERO; 8];
    // SAFETY: F16C is enabled for this build (the caller's cfg checks it); the load
    // reads the first 8 values of `chunk` (checked above), the store writes the 16 bytes
    // of `out`.
    unsafe {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(chunk.as_ptr()));
        _mm_storeu_si128(out.as_mut_ptr().cast(), h);
    }
    out
}

/// Eight f16 values widened to f32.
#[cfg(target_feature = "f16c")]
#[inline(always)]
#[allow(unused_unsafe)]
pub fn widen8(h: &[f16]) -> [f32; 8] {
    assert!(h.len() >= 8);
    let mut out = [0f32; 8];
    // SAFETY: F16C is enabled for this build (the caller's cfg checks it); the load
    // reads the first 16 bytes of `h` (checked above), the store the 8 values of `out`.
    unsafe {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()));
        _mm256_storeu_ps(out.as_mut_ptr(), v);
    }
    out
}

/// Eight positions' scores from turned keys (`block[64l + 8·lane + i]` is dimension
/// `8l + lane` of position `i`): per position, lane `lane` sums `q[8l + lane] · k[8l + lane]`
/// over `l` in order, then the lanes are added in order, as `attention::cached_dots` does
/// for one row.
pub fn turned_dots8(q: &[f32], block: &[f32]) -> [f32; 8] {
    assert!(q.len().is_multiple_of(8) && block.len() >= 8 * q.len());
    let mut out = [0f32; 8];
    // SAFETY: AVX is enabled for this build (the caller's cfg checks it); every load reads
    // 8 values of `block` below `8 · q.len()` or one value of `q` (both checked above); the
    // store writes the 8 values of `out`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 8];
        for l in 0..q.len() / 8 {
            for (lane, acc) in acc.iter_mut().enumerate() {
                let qv = _mm256_broadcast_ss(&q[8 * l + lane]);
                let k = _mm256_loadu_ps(block.as_ptr().add(64 * l + 8 * lane));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(qv, k));
            }
        }
        let mut sum = _mm256_setzero_ps();
        for acc in acc {
            sum = _mm256_add_ps(sum, acc);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), sum);
    }
    out
}

/// `out[j] = Σ_p weights[p] · rows[p · stride + j]` for 64 outputs, the rows' values read by
/// `load` eight at a time; each output summed over the rows in order, a product then an add.
/// Eight accumulators stay in registers across all rows.
#[inline(always)]
fn weighted64<T>(
    weights: &[f32],
    rows: &[T],
    stride: usize,
    load: unsafe fn(*const T) -> __m256,
    out: &mut [f32],
) {
    assert!(out.len() >= 64);
    assert!(weights.is_empty() || rows.len() >= (weights.len() - 1) * stride + 64);
    // SAFETY: AVX is enabled for this build; each load reads 8 values of row
    // `p < weights.len()` below offset 64, inside `rows`, and each store 8 of the 64 values
    // of `out` (both checked above).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (p, w) in weights.iter().enumerate() {
            let w = _mm256_set1_ps(*w);
            for (c, acc) in acc.iter_mut().enumerate() {
                let v = load(rows.as_ptr().add(p * stride + 8 * c));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, v));
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), *acc);
        }
    }
}

/// `weighted64` over f32 rows.
pub fn weighted64_f32(weights: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    weighted64(weights, rows, stride, load8_f32, out);
}

/// `weighted64` over f16 rows, widened with F16C.
pub fn weighted64_f16(weights: &[f32], rows: &[f16], stride: usize, out: &mut [f32]) {
    weighted64(weights, rows, stride, load8_f16, out);
}

/// Eight f32 values at `at`.
///
/// # Safety
/// AVX enabled, and 8 values readable at `at`.
#[inline(always)]
unsafe fn load8_f32(at: *const f32) -> __m256 {
    _mm256_loadu_ps(at)
}

/// Eight f16 values at `at`, widened.
///
/// # Safety
/// F16C enabled, and 8 values readable at `at`.
#[inline(always)]
unsafe fn load8_f16(at: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(at.cast()))
}

/// A block of 32 activations as `acts::quantize_block` makes it, eight lanes at a time:
/// the scale from `max |x|`, the values `x · (127 / max)` rounded half to even, their sum.
/// The same operations on the same values, so the same bytes and sums.
pub fn quantize_block(block: &[f32]) -> (f32, [i8; 32], i32) {
    assert!(block.len() >= 32);
    let mut q = [0i8; 32];
    // SAFETY: AVX2 is enabled for this build; the loads read the 32 values of `block`
    // (checked above), the store writes the 32 bytes of `q`.
    unsafe {
        let x: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(block.as_ptr().add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let mut amax = _mm256_setzero_ps();
        for x in x {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), amax);
        let amax = lanes.iter().fold(0f32, |a, x| a.max(*x));
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let inv = _mm256_set1_ps(inv);
        let ints = x.map(|x| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, inv),
            );
            _mm256_cvtps_epi32(r)
        });
        // Sum of the 32 integers.
        let total = _mm256_add_epi32(
            _mm256_add_epi32(ints[0], ints[1]),
            _mm256_add_epi32(ints[2], ints[3]),
        );
        let half = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256::<1>(total),
        );
        let half = _mm_hadd_epi32(half, half);
        let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(half, half));
        // 32-bit to 8-bit in order: packs work within 128-bit halves, a permute restores order.
        let words = [
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        ];
        let bytes = _mm256_packs_epi16(words[0], words[1]);
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
        (amax, q, sum)
    }
}

/// Eight values through f16 and back.
#[inline(always)]
#[allow(unused_unsafe)]
pub fn round_to_f16(chunk: &mut [f32]) {
    assert_eq!(chunk.len(), 8);
    // SAFETY: F16C is enabled for this build (x86-64-v3 includes it; the caller's cfg
    // checks it); the load and store touch exactly the 8 values of `chunk`.
    unsafe {
        let v = _mm256_loadu_ps(chunk.as_ptr());
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_cvtph_ps(h));
    }
}

/// Per block: for each group of 4 positions, the 8 rows' weights in one register; each
/// vector's 4 activation bytes are broadcast, given the weights' signs (`maddubs` takes
/// one unsigned operand) and multiplied against the weights' magnitudes; 32-bit row sums
/// accumulate per block (a 16-bit pair sum can reach 32 512, so no 16-bit carrying).
#[inline(always)]
#[allow(unused_unsafe)]
pub fn q8_tile_dots<const N: usize>(
    tiles: &[Q8Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let len = tiles.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); loads read
    // `[i8; 32]` and `[f32; 8]` arrays, stores write `[f32; 8]` arrays, all unaligned.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, t) in tiles.iter().enumerate() {
            let mut dots = [_mm256_setzero_si256(); N];
            for g in 0..8 {
                let w = load32(&t.q[g]);
                let magnitude = _mm256_sign_epi8(w, w);
                for k in 0..N {
                    let x = _mm256_sign_epi8(broadcast4(&xs[k][b].q, 4 * g), w);
                    let pairs = _mm256_maddubs_epi16(magnitude, x);
                    dots[k] = _mm256_add_epi32(dots[k], _mm256_madd_epi16(pairs, ones));
                }
            }
            let d = _mm256_loadu_ps(t.d.as_ptr());
            for k in 0..N {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(xs[k][b].d));
                acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dots[k]), acc[k]);
            }
        }
        for k in 0..N {
            _mm256_storeu_ps(sums[k].as_mut_ptr(), acc[k]);
        }
    }
}

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
pub(super) fn load32(x: &[i8; 32]) -> __m256i {
    // SAFETY: `x` is 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(x.as_ptr().cast()) }
}

#[inline(always)]
#[allow(unused_unsafe)]
fn unpack(packed: &[u8; 16]) -> __m256i {
    // SAFETY: a 16-byte unaligned load from a `[u8; 16]`; the rest is register-only.
    unsafe {
        let bytes = _mm_loadu_si128(packed.as_ptr().cast());
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

/// Eight partial sums of `u · x` for unsigned bytes `u` and signed bytes `x`, as floats.
#[inline(always)]
#[allow(unused_unsafe)]
fn products(u: __m256i, x: __m256i) -> __m256 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let pairs = _mm256_maddubs_epi16(u, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// Two blocks per iteration into separate accumulators, so consecutive blocks do not
/// wait on each other's multiply-add.
#[inline(always)]
#[allow(unused_unsafe)]
pub fn q4_dots<const N: usize>(row: &[Q4Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    let len = row.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); memory is read
    // only through `unpack` and `load32`, from arrays.
    unsafe {
        let mut even = [_mm256_setzero_ps(); N];
        let mut odd = [_mm256_setzero_ps(); N];
        let mut offsets = [0f32; N];
        let pairs = row.chunks_exact(2);
        let tail = pairs.remainder();
        for (p, w) in pairs.enumerate() {
            let j = 2 * p;
            let (n0, n1) = (unpack(&w[0].q), unpack(&w[1].q));
            for k in 0..N {
                let (a0, a1) = (&xs[k][j], &xs[k][j + 1]);
                let (d0, d1) = (w[0].d * a0.d, w[1].d * a1.d);
                even[k] = _mm256_fmadd_ps(_mm256_set1_ps(d0), products(n0, load32(&a0.q)), even[k]);
                odd[k] = _mm256_fmadd_ps(_mm256_set1_ps(d1), products(n1, load32(&a1.q)), odd[k]);
                offsets[k] += w[0].m * a0.s + w[1].m * a1.s;
            }
        }
        if let [w] = tail {
            let j = len - 1;
            let nibbles = unpack(&w.q);
            for k in 0..N {
                let a = &xs[k][j];
                let d = _mm256_set1_ps(w.d * a.d);
                even[k] = _mm256_fmadd_ps(d, products(nibbles, load32(&a.q)), even[k]);
                offsets[k] += w.m * a.s;
            }
        }
        for k in 0..N {
            out[k] = hsum(_mm256_add_ps(even[k], odd[k])) + offsets[k];
        }
    }
}

#[inline(always)]
#[allow(unused_unsafe)]
pub fn q8_dots<const N: usize>(row: &[Q8Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    let len = row.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); memory is read
    // only through `load32`, from arrays.
    unsafe {
        let mut even = [_mm256_setzero_ps(); N];
        let mut odd = [_mm256_setzero_ps(); N];
        let pairs = row.chunks_exact(2);
        let tail = pairs.remainder();
        // maddubs multiplies unsigned by signed: the weight's magnitude times x carrying
        // the weight's sign.
        for (p, w) in pairs.enumerate() {
            let j = 2 * p;
            let (q0, q1) = (load32(&w[0].q), load32(&w[1].q));
            let (m0, m1) = (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(q1, q1));
            for k in 0..N {
                let (a0, a1) = (&xs[k][j], &xs[k][j + 1]);
                let x0 = _mm256_sign_epi8(load32(&a0.q), q0);
                let x1 = _mm256_sign_epi8(load32(&a1.q), q1);
                let (d0, d1) = (w[0].d * a0.d, w[1].d * a1.d);
                even[k] = _mm256_fmadd_ps(_mm256_set1_ps(d0), products(m0, x0), even[k]);
                odd[k] = _mm256_fmadd_ps(_mm256_set1_ps(d1), products(m1, x1), odd[k]);
            }
        }
        if let [w] = tail {
            let j = len - 1;
            let q = load32(&w.q);
            let magnitude = _mm256_sign_epi8(q, q);
            for k in 0..N {
                let a = &xs[k][j];
                let x = _mm256_sign_epi8(load32(&a.q), q);
                let d = _mm256_set1_ps(w.d * a.d);
                even[k] = _mm256_fmadd_ps(d, products(magnitude, x), even[k]);
            }
        }
        for k in 0..N {
            out[k] = hsum(_mm256_add_ps(even[k], odd[k]));
        }
    }
}

/// The fifth bits of group `g` of a `Q5Tile` (its `h` in `bits`) as 0x10 in each byte: for
/// the low nibbles (bit `2g` moved to bit 4) and the high ones (bit `2g + 1`). A 16-bit
/// shift of at most 4 keeps bit 4 of each byte within that byte.
#[inline(always)]
#[allow(unused_unsafe)]
pub(super) fn fifth_bits(bits: __m256i, g: usize) -> (__m256i, __m256i) {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let (low, high) = match g {
            0 => (_mm256_slli_epi16::<4>(bits), _mm256_slli_epi16::<3>(bits)),
            1 => (_mm256_slli_epi16::<2>(bits), _mm256_slli_epi16::<1>(bits)),
            2 => (bits, _mm256_srli_epi16::<1>(bits)),
            _ => (_mm256_srli_epi16::<2>(bits), _mm256_srli_epi16::<3>(bits)),
        };
        let bit4 = _mm256_set1_epi8(0x10);
        (_mm256_and_si256(low, bit4), _mm256_and_si256(high, bit4))
    }
}

/// As `tile_dots`, with each group's fifth bits added to its nibbles. The 16-bit partial
/// sums widen every two groups (2 · 2 · 2 · 31 · 127 = 31 496 at most).
#[inline(always)]
#[allow(unused_unsafe)]
pub fn q5_tile_dots<const N: usize>(
    tiles: &[Q5Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let len = tiles.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); loads read
    // `[u8; 32]` and `[f32; 8]` arrays, stores write `[f32; 8]` arrays, all unaligned.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, t) in tiles.iter().enumerate() {
            let bits = _mm256_loadu_si256(t.h.as_ptr().cast());
            let mut dots = [_mm256_setzero_si256(); N];
            for pair in 0..2 {
                let mut partial = [_mm256_setzero_si256(); N];
                for g in 2 * pair..2 * pair + 2 {
                    let packed = _mm256_loadu_si256(t.q[g].as_ptr().cast());
                    let (low_bits, high_bits) = fifth_bits(bits, g);
                    let lo = _mm256_or_si256(_mm256_and_si256(packed, mask), low_bits);
                    let hi = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask),
                        high_bits,
                    );
                    for k in 0..N {
                        let a = &xs[k][b].q;
                        let low = _mm256_maddubs_epi16(lo, broadcast4(a, 4 * g));
                        let high = _mm256_maddubs_epi16(hi, broadcast4(a, 16 + 4 * g));
                        partial[k] = _mm256_add_epi16(partial[k], _mm256_add_epi16(low, high));
                    }
                }
                for k in 0..N {
                    dots[k] = _mm256_add_epi32(dots[k], _mm256_madd_epi16(partial[k], ones));
                }
            }
            let d = _mm256_loadu_ps(t.d.as_ptr());
            let m = _mm256_loadu_ps(t.m.as_ptr());
            for k in 0..N {
                let a = &xs[k][b];
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dots[k]), acc[k]);
                acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), acc[k]);
            }
        }
        for k in 0..N {
            _mm256_storeu_ps(sums[k].as_mut_ptr(), acc[k]);
        }
    }
}

/// Bit `i` of `qh` as 0x10 in byte `i`: each byte picks its source byte of `qh`, keeps its
/// own bit and compares.
#[inline(always)]
#[allow(unused_unsafe)]
fn bits_to_bytes(qh: u32) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

#[inline(always)]
#[allow(unused_unsafe)]
pub fn q5_dots<const N: usize>(row: &[Q5Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    let len = row.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); memory is read
    // only through `unpack` and `load32`, from arrays.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offsets = [0f32; N];
        for (j, w) in row.iter().enumerate() {
            let codes = _mm256_or_si256(unpack(&w.q), bits_to_bytes(w.qh));
            for k in 0..N {
                let a = &xs[k][j];
                let d = _mm256_set1_ps(w.d * a.d);
                acc[k] = _mm256_fmadd_ps(d, products(codes, load32(&a.q)), acc[k]);
                offsets[k] += w.m * a.s;
            }
        }
        for k in 0..N {
            out[k] = hsum(acc[k]) + offsets[k];
        }
    }
}

/// As `q8_tile_dots`, with the first four groups (values 0–15) and the last four summed
/// apart for their own scales. Values within ±32 let four groups' pair sums stay in 16
/// bits (4 · 2 · 32 · 127 = 32 512) before one widening per half.
#[inline(always)]
#[allow(unused_unsafe)]
pub fn s8_tile_dots<const N: usize>(
    tiles: &[S8Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let len = tiles.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); loads read
    // `[i8; 32]` and `[f32; 8]` arrays, stores write `[f32; 8]` arrays, all unaligned.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, t) in tiles.iter().enumerate() {
            for half in 0..2 {
                let mut partial = [_mm256_setzero_si256(); N];
                for g in 4 * half..4 * half + 4 {
                    let w = load32(&t.q[g]);
                    let magnitude = _mm256_sign_epi8(w, w);
                    for k in 0..N {
                        let x = _mm256_sign_epi8(broadcast4(&xs[k][b].q, 4 * g), w);
                        partial[k] =
                            _mm256_add_epi16(partial[k], _mm256_maddubs_epi16(magnitude, x));
                    }
                }
                let d = _mm256_loadu_ps(t.d[half].as_ptr());
                for k in 0..N {
                    let dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(partial[k], ones));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(xs[k][b].d));
                    acc[k] = _mm256_fmadd_ps(scale, dots, acc[k]);
                }
            }
        }
        for k in 0..N {
            _mm256_storeu_ps(sums[k].as_mut_ptr(), acc[k]);
        }
    }
}

#[inline(always)]
#[allow(unused_unsafe)]
pub fn s8_dots<const N: usize>(row: &[S8Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    let len = row.len();
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); memory is read
    // only through `load32`, from arrays.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); N];
        for (j, w) in row.iter().enumerate() {
            let q = load32(&w.q);
            let magnitude = _mm256_sign_epi8(q, q);
            for k in 0..N {
                let a = &xs[k][j];
                let x = _mm256_sign_epi8(load32(&a.q), q);
                // Products' lanes 0–3 cover values 0–15, lanes 4–7 values 16–31.
                let scale = _mm256_set_m128(_mm_set1_ps(w.d[1] * a.d), _mm_set1_ps(w.d[0] * a.d));
                acc[k] = _mm256_fmadd_ps(scale, products(magnitude, x), acc[k]);
            }
        }
        for k in 0..N {
            out[k] = hsum(acc[k]);
        }
    }
}

/// Eight 16-bit floats widened: by F16C, or for bfloat16 by moving the bits to the top half.
#[inline(always)]
#[allow(unused_unsafe)]
fn widen_half<const BF16: bool>(bits: &[u16]) -> __m256 {
    assert!(bits.len() >= 8);
    // SAFETY: F16C/AVX2 are enabled for this build; the load reads the first 16 bytes of
    // `bits` (checked above).
    unsafe {
        let raw = _mm_loadu_si128(bits.as_ptr().cast());
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        } else {
            _mm256_cvtph_ps(raw)
        }
    }
}

/// `HALF_ROWS` (3) interleaved rows (`floats::interleave`) against `N` vectors, eight
/// columns a step: each row's eight weights are widened once and meet every vector (12
/// accumulators and 3 widened rows in the 16 registers; the vectors are read as memory
/// operands).
#[inline(always)]
#[allow(unused_unsafe)]
pub fn half_dots<const N: usize, const BF16: bool>(
    group: &[u16],
    xs: [&[f32]; N],
    sums: &mut [[f32; 4]; super::floats::HALF_ROWS],
) {
    const ROWS: usize = super::floats::HALF_ROWS;
    let cols = group.len() / ROWS;
    let xs: [&[f32]; N] = xs.map(|x| &x[..cols]);
    let group = &group[..ROWS * cols];
    // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); every load reads 8
    // values at `c < cols - 7` of vectors `cols` long (`cols` is a multiple of 8); the
    // weights are read by `widen_half`, which checks its slice.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); N]; ROWS];
        let mut c = 0;
        while c + 8 <= cols {
            let at = ROWS * c;
            let w: [__m256; ROWS] =
                std::array::from_fn(|i| widen_half::<BF16>(&group[at + 8 * i..]));
            for k in 0..N {
                let x = _mm256_loadu_ps(xs[k].as_ptr().add(c));
                for (acc, w) in acc.iter_mut().zip(&w) {
                    acc[k] = _mm256_fmadd_ps(*w, x, acc[k]);
                }
            }
            c += 8;
        }
        for (row, row_acc) in acc.iter().enumerate() {
            for k in 0..N {
                sums[row][k] = hsum(row_acc[k]);
            }
        }
    }
}
