//! The kernels as plain loops: every target without AVX2/FMA runs these, and the tests use
//! them as the reference the AVX2 kernels must agree with.
//!
//! Owns: the portable row and tile dot products and the f16 conversions eight at a time.
//! Must never: use `unsafe` or target-specific intrinsics.

// With SIMD compiled in, the portable loops serve as the tests' reference.
#![cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]

use half::f16;

use super::layout::{ActBlock, Q4Block, Q4Tile, Q5Block, Q5Tile, Q8Block, Q8Tile, S8Block, S8Tile};
use super::TILE_ROWS;

/// Eight positions' scores from turned keys, as `avx2::turned_dots8`.
pub fn turned_dots8(q: &[f32], block: &[f32]) -> [f32; 8] {
    let mut acc = [[0f32; 8]; 8];
    for (l, q8) in q.chunks_exact(8).enumerate() {
        for (lane, acc) in acc.iter_mut().enumerate() {
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc += q8[lane] * block[64 * l + 8 * lane + i];
            }
        }
    }
    let mut sums = [0f32; 8];
    for acc in &acc {
        for (s, a) in sums.iter_mut().zip(acc) {
            *s += a;
        }
    }
    sums
}

pub fn narrow8(chunk: &[f32]) -> [f16; 8] {
    std::array::from_fn(|i| f16::from_f32(chunk[i]))
}

pub fn widen8(h: &[f16]) -> [f32; 8] {
    std::array::from_fn(|i| h[i].to_f32())
}

pub fn q8_tile_dots<const N: usize>(
    tiles: &[Q8Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    for (k, x) in xs.iter().enumerate() {
        let mut acc = [0f32; TILE_ROWS];
        for (t, a) in tiles.iter().zip(x.iter()) {
            for (r, acc) in acc.iter_mut().enumerate() {
                let mut sum = 0i32;
                for g in 0..8 {
                    for i in 0..4 {
                        sum += i32::from(t.q[g][4 * r + i]) * i32::from(a.q[4 * g + i]);
                    }
                }
                *acc = (t.d[r] * a.d).mul_add(sum as f32, *acc);
            }
        }
        sums[k] = acc;
    }
}

pub fn tile_dots<const N: usize>(
    tiles: &[Q4Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    for (k, x) in xs.iter().enumerate() {
        let mut acc = [0f32; TILE_ROWS];
        for (t, a) in tiles.iter().zip(x.iter()) {
            for (r, acc) in acc.iter_mut().enumerate() {
                let mut sum = 0i32;
                for g in 0..4 {
                    for i in 0..4 {
                        let byte = t.q[g][4 * r + i];
                        sum += i32::from(byte & 0x0F) * i32::from(a.q[4 * g + i])
                            + i32::from(byte >> 4) * i32::from(a.q[16 + 4 * g + i]);
                    }
                }
                *acc = (t.d[r] * a.d).mul_add(sum as f32, *acc);
                *acc = t.m[r].mul_add(a.s, *acc);
            }
        }
        sums[k] = acc;
    }
}

pub fn q4_dots<const N: usize>(row: &[Q4Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = row
            .iter()
            .zip(x)
            .map(|(w, a)| {
                let sum: i32 =
                    w.q.iter()
                        .enumerate()
                        .map(|(k, byte)| {
                            i32::from(byte & 0x0F) * i32::from(a.q[k])
                                + i32::from(byte >> 4) * i32::from(a.q[k + 16])
                        })
                        .sum();
                w.d * a.d * sum as f32 + w.m * a.s
            })
            .sum();
    }
}

pub fn q8_dots<const N: usize>(row: &[Q8Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = row
            .iter()
            .zip(x)
            .map(|(w, a)| {
                let sum: i32 =
                    w.q.iter()
                        .zip(&a.q)
                        .map(|(p, q)| i32::from(*p) * i32::from(*q))
                        .sum();
                w.d * a.d * sum as f32
            })
            .sum();
    }
}

pub fn q5_tile_dots<const N: usize>(
    tiles: &[Q5Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    for (k, x) in xs.iter().enumerate() {
        let mut acc = [0f32; TILE_ROWS];
        for (t, a) in tiles.iter().zip(x.iter()) {
            for (r, acc) in acc.iter_mut().enumerate() {
                let mut sum = 0i32;
                for g in 0..4 {
                    for i in 0..4 {
                        let (byte, bits) = (t.q[g][4 * r + i], t.h[4 * r + i]);
                        let low = (byte & 0x0F) | ((bits >> (2 * g)) & 1) << 4;
                        let high = (byte >> 4) | ((bits >> (2 * g + 1)) & 1) << 4;
                        sum += i32::from(low) * i32::from(a.q[4 * g + i])
                            + i32::from(high) * i32::from(a.q[16 + 4 * g + i]);
                    }
                }
                *acc = (t.d[r] * a.d).mul_add(sum as f32, *acc);
                *acc = t.m[r].mul_add(a.s, *acc);
            }
        }
        sums[k] = acc;
    }
}

pub fn q5_dots<const N: usize>(row: &[Q5Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = row
            .iter()
            .zip(x)
            .map(|(w, a)| {
                let sum: i32 = (0..16)
                    .map(|k| {
                        let low = (w.q[k] & 0x0F) | (((w.qh >> k) & 1) as u8) << 4;
                        let high = (w.q[k] >> 4) | (((w.qh >> (k + 16)) & 1) as u8) << 4;
                        i32::from(low) * i32::from(a.q[k])
                            + i32::from(high) * i32::from(a.q[k + 16])
                    })
                    .sum();
                w.d * a.d * sum as f32 + w.m * a.s
            })
            .sum();
    }
}

pub fn s8_tile_dots<const N: usize>(
    tiles: &[S8Tile],
    xs: [&[ActBlock]; N],
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    for (k, x) in xs.iter().enumerate() {
        let mut acc = [0f32; TILE_ROWS];
        for (t, a) in tiles.iter().zip(x.iter()) {
            for (r, acc) in acc.iter_mut().enumerate() {
                for half in 0..2 {
                    let mut sum = 0i32;
                    for g in 4 * half..4 * half + 4 {
                        for i in 0..4 {
                            sum += i32::from(t.q[g][4 * r + i]) * i32::from(a.q[4 * g + i]);
                        }
                    }
                    *acc = (t.d[half][r] * a.d).mul_add(sum as f32, *acc);
                }
            }
        }
        sums[k] = acc;
    }
}

pub fn s8_dots<const N: usize>(row: &[S8Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = row
            .iter()
            .zip(x)
            .map(|(w, a)| {
                let half = |h: usize| -> f32 {
                    let sum: i32 = (16 * h..16 * h + 16)
                        .map(|i| i32::from(w.q[i]) * i32::from(a.q[i]))
                        .sum();
                    w.d[h] * a.d * sum as f32
                };
                half(0) + half(1)
            })
            .sum();
    }
}

pub fn half_dots<const N: usize>(
    kind: super::floats::HalfKind,
    group: &[u16],
    xs: [&[f32]; N],
    sums: &mut [[f32; 4]; super::floats::HALF_ROWS],
) {
    let rows = super::floats::HALF_ROWS;
    for (i, row_sums) in sums.iter_mut().enumerate() {
        let row = group
            .chunks_exact(8 * rows)
            .flat_map(|chunk| &chunk[8 * i..8 * i + 8]);
        for (x, sum) in xs.iter().zip(row_sums.iter_mut()) {
            *sum = row.clone().zip(*x).map(|(b, v)| kind.widen(*b) * v).sum();
        }
    }
}
