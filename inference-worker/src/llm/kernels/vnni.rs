//! The tile kernels again with AVX-512 VNNI, chosen at run time where the CPU reports it:
//! one `vpdpbusd` multiplies 4 unsigned weight bytes by 4 signed activation bytes and adds
//! them into a 32-bit lane, where AVX2 needs `maddubs`, `madd` and an add. The sums are
//! integers, so each kernel gives exactly what its `avx2` twin gives; the tests check that.
//!
//! Owns: the `unsafe` VNNI twins of `avx2`'s tile kernels. Must never: be called unless
//! [`usable`] said yes (the `unsafe` kernels are private; the
//! public entry points check).

// SIMD intrinsics behind a run-time CPU check; each use is commented.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::avx2::{broadcast4, fifth_bits, load32};
use super::layout::{ActBlock, Q4Tile, Q5Tile, Q8Tile, S8Tile};
use super::TILE_ROWS;

/// Whether the kernels here run: allowed, and the CPU has the instructions (checked once
/// by `std`, then cached loads).
#[inline]
pub fn usable() -> bool {
    super::vnni_allowed()
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Safe entry points: each runs its kernel and says `true` where [`usable`], else does
/// nothing and says `false` (the caller then runs its `avx2` twin).
macro_rules! checked {
    ($($name:ident => $kernel:ident($tile:ty);)*) => {$(
        pub fn $name<const N: usize>(
            tiles: &[$tile],
            xs: [&[ActBlock]; N],
            sums: &mut [[f32; TILE_ROWS]; 4],
        ) -> bool {
            if !usable() {
                return false;
            }
            // SAFETY: `usable` checked the features the kernel is compiled with.
            unsafe { $kernel::<N>(tiles, xs, sums) };
            true
        }
    )*};
}

checked! {
    tile_dots => q4_vnni(Q4Tile);
    q5_tile_dots => q5_vnni(Q5Tile);
    q8_tile_dots => q8_vnni(Q8Tile);
    s8_tile_dots => s8_vnni(S8Tile);
}

/// The float epilogue shared by the kernels: `acc += d · a.d · dots (+ m · a.s)`.
#[inline(always)]
unsafe fn scale_into(acc: &mut __m256, d: __m256, a: &ActBlock, dots: __m256i) {
    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
    *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dots), *acc);
}

/// Per vector, the block's 4-bit-group sums: `codes(g)` gives group `g`'s low and high
/// codes (values `4g..4g+4` and `16+4g..16+4g+4` of the 8 rows), the unsigned operand.
#[inline(always)]
unsafe fn nibble_dots<const N: usize>(
    codes: impl Fn(usize) -> (__m256i, __m256i),
    xs: &[&[ActBlock]; N],
    b: usize,
) -> [__m256i; N] {
    let mut dots = [_mm256_setzero_si256(); N];
    for g in 0..4 {
        let (lo, hi) = codes(g);
        for k in 0..N {
            let a = &xs[k][b].q;
            dots[k] = _mm256_dpbusd_epi32(dots[k], lo, broadcast4(a, 4 * g));
            dots[k] = _mm256_dpbusd_epi32(dots[k], hi, broadcast4(a, 16 + 4 * g));
        }
    }
    dots
}

/// `acc += d · a.d · dots + m · a.s` per vector: the epilogue of the offset (4/5-bit) kinds.
#[inline(always)]
unsafe fn offset_into<const N: usize>(
    acc: &mut [__m256; N],
    (d, m): (&[f32; 8], &[f32; 8]),
    xs: &[&[ActBlock]; N],
    b: usize,
    dots: [__m256i; N],
) {
    // SAFETY: `[f32; 8]` loads, unaligned.
    let (d, m) = (_mm256_loadu_ps(d.as_ptr()), _mm256_loadu_ps(m.as_ptr()));
    for k in 0..N {
        let a = &xs[k][b];
        scale_into(&mut acc[k], d, a, dots[k]);
        acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), acc[k]);
    }
}

/// As `avx2::tile_dots`: nibbles are the unsigned operand, activations the signed one.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_vnni<const N: usize>(
    tiles: &[Q4Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..tiles.len()]);
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, t) in tiles.iter().enumerate() {
        let codes = |g: usize| {
            // SAFETY: a `[u8; 32]` load, unaligned.
            let packed = _mm256_loadu_si256(t.q[g].as_ptr().cast());
            let hi = _mm256_srli_epi16::<4>(packed);
            (_mm256_and_si256(packed, mask), _mm256_and_si256(hi, mask))
        };
        let dots = nibble_dots(codes, &xs, b);
        offset_into(&mut acc, (&t.d, &t.m), &xs, b, dots);
    }
    store(&acc, sums);
}

/// As `avx2::q5_tile_dots`: the fifth bits joined to the nibbles, then as `q4_vnni`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q5_vnni<const N: usize>(
    tiles: &[Q5Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..tiles.len()]);
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, t) in tiles.iter().enumerate() {
        // SAFETY: a `[u8; 32]` load, unaligned.
        let bits = _mm256_loadu_si256(t.h.as_ptr().cast());
        let codes = |g: usize| {
            // SAFETY: a `[u8; 32]` load, unaligned.
            let packed = _mm256_loadu_si256(t.q[g].as_ptr().cast());
            let (low_bits, high_bits) = fifth_bits(bits, g);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask);
            (
                _mm256_or_si256(_mm256_and_si256(packed, mask), low_bits),
                _mm256_or_si256(hi, high_bits),
            )
        };
        let dots = nibble_dots(codes, &xs, b);
        offset_into(&mut acc, (&t.d, &t.m), &xs, b, dots);
    }
    store(&acc, sums);
}

/// Unsigned activation bytes `4g..4g+4` as one 32-bit lane pattern, in every lane.
#[inline(always)]
fn broadcast4u(u: &[u8; 32], at: usize) -> __m256i {
    let word = i32::from_le_bytes([u[at], u[at + 1], u[at + 2], u[at + 3]]);
    // SAFETY: register-only AVX operation (the build's baseline).
    unsafe { _mm256_set1_epi32(word) }
}

/// Per vector, `Σ x · w` over the signed-weight groups `groups` of block `b`, scaled by
/// `d` into `acc`. The activations' unsigned copy (`x + 128`) meets the signed weights:
/// each lane sums `(x + 128) · w`, and `128 · Σ w` (one more `vpdpbusd` against ones per
/// group, shared by the vectors) is taken off.
#[inline(always)]
unsafe fn signed_into<const N: usize>(
    acc: &mut [__m256; N],
    q: &[[i8; 32]],
    groups: std::ops::Range<usize>,
    d: &[f32; 8],
    xs: &[&[ActBlock]; N],
    b: usize,
) {
    let ones = _mm256_set1_epi8(1);
    let mut dots = [_mm256_setzero_si256(); N];
    let mut weights = _mm256_setzero_si256();
    for g in groups {
        let w = load32(&q[g]);
        weights = _mm256_dpbusd_epi32(weights, ones, w);
        for k in 0..N {
            dots[k] = _mm256_dpbusd_epi32(dots[k], broadcast4u(&xs[k][b].u, 4 * g), w);
        }
    }
    let bias = _mm256_slli_epi32::<7>(weights);
    // SAFETY: a `[f32; 8]` load, unaligned.
    let d = _mm256_loadu_ps(d.as_ptr());
    for k in 0..N {
        scale_into(&mut acc[k], d, &xs[k][b], _mm256_sub_epi32(dots[k], bias));
    }
}

/// As `avx2::q8_tile_dots`, through `signed_into` (no sign fix on the activations).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_vnni<const N: usize>(
    tiles: &[Q8Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..tiles.len()]);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, t) in tiles.iter().enumerate() {
        signed_into(&mut acc, &t.q, 0..8, &t.d, &xs, b);
    }
    store(&acc, sums);
}

/// As `avx2::s8_tile_dots`: as `q8_vnni`, each half of the block with its scales.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn s8_vnni<const N: usize>(
    tiles: &[S8Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let xs: [&[ActBlock]; N] = xs.map(|x| &x[..tiles.len()]);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, t) in tiles.iter().enumerate() {
        signed_into(&mut acc, &t.q, 0..4, &t.d[0], &xs, b);
        signed_into(&mut acc, &t.q, 4..8, &t.d[1], &xs, b);
    }
    store(&acc, sums);
}

/// Each vector's 8 row sums into `sums`.
#[inline(always)]
unsafe fn store<const N: usize>(acc: &[__m256; N], sums: &mut [[f32; TILE_ROWS]; 4]) {
    for k in 0..N {
        // SAFETY: a `[f32; 8]` store, unaligned.
        _mm256_storeu_ps(sums[k].as_mut_ptr(), acc[k]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdata::vectors;
    use super::super::{avx2, Q8Acts, BLOCK};
    use super::*;

    /// Deterministic bytes.
    fn bytes(seed: u32) -> impl FnMut() -> u8 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as u8
        }
    }

    fn scales(next: &mut impl FnMut() -> u8) -> [f32; 8] {
        std::array::from_fn(|_| f32::from(next()) / 1000.0 - 0.1)
    }

    /// Integer sums and the same float steps: every kernel equals its AVX2 twin exactly,
    /// for 1 to 4 vectors, with weights at the ends of their ranges.
    #[test]
    fn vnni_kernels_equal_their_avx2_twins() {
        if !usable() {
            println!("this CPU has no AVX-512 VNNI: the twins cannot run here");
            return;
        }
        let blocks = 5;
        let mut next = bytes(11);
        let q4: Vec<Q4Tile> = (0..blocks)
            .map(|_| Q4Tile {
                d: scales(&mut next),
                m: scales(&mut next),
                q: std::array::from_fn(|_| std::array::from_fn(|_| next())),
            })
            .collect();
        let q5: Vec<Q5Tile> = (0..blocks)
            .map(|_| Q5Tile {
                d: scales(&mut next),
                m: scales(&mut next),
                h: std::array::from_fn(|_| next()),
                q: std::array::from_fn(|_| std::array::from_fn(|_| next())),
            })
            .collect();
        let q8: Vec<Q8Tile> = (0..blocks)
            .map(|_| Q8Tile {
                d: scales(&mut next),
                q: std::array::from_fn(|_| std::array::from_fn(|_| next() as i8)),
            })
            .collect();
        let s8: Vec<S8Tile> = (0..blocks)
            .map(|_| S8Tile {
                d: [scales(&mut next), scales(&mut next)],
                q: std::array::from_fn(|_| std::array::from_fn(|_| (next() % 65) as i8 - 32)),
            })
            .collect();
        let cols = blocks * BLOCK;
        let acts = Q8Acts::quantize(&vectors(4, cols), cols);
        fn same(a: &[[f32; TILE_ROWS]; 4], b: &[[f32; TILE_ROWS]; 4], what: &str) {
            let bits = |s: &[[f32; TILE_ROWS]; 4]| -> Vec<u32> {
                s.iter().flatten().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(a), bits(b), "{what}: {a:?} vs {b:?}");
        }
        macro_rules! check {
            ($n:literal) => {{
                let xs: [&[ActBlock]; $n] = std::array::from_fn(|k| acts.vector(k));
                let (mut a, mut b) = ([[0f32; TILE_ROWS]; 4], [[0f32; TILE_ROWS]; 4]);
                assert!(tile_dots::<$n>(&q4, xs, &mut a));
                avx2::tile_dots::<$n>(&q4, xs, &mut b);
                same(&a, &b, concat!("Q4, ", $n));
                assert!(q5_tile_dots::<$n>(&q5, xs, &mut a));
                avx2::q5_tile_dots::<$n>(&q5, xs, &mut b);
                same(&a, &b, concat!("Q5, ", $n));
                assert!(q8_tile_dots::<$n>(&q8, xs, &mut a));
                avx2::q8_tile_dots::<$n>(&q8, xs, &mut b);
                same(&a, &b, concat!("Q8, ", $n));
                assert!(s8_tile_dots::<$n>(&s8, xs, &mut a));
                avx2::s8_tile_dots::<$n>(&s8, xs, &mut b);
                same(&a, &b, concat!("S8, ", $n));
            }};
        }
        check!(1);
        check!(2);
        check!(3);
        check!(4);
    }
}
