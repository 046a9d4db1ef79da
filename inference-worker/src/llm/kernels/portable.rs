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

use super::layout::{ActBlock, Q4Block, Q4Tile, Q8Block, Q8Tile};
use super::TILE_ROWS;

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
