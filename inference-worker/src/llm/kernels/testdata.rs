//! Deterministic weights and activations for the kernels' tests.

use half::f16;

use super::BLOCK;

pub(super) fn q4_1_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
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

pub(super) fn vectors(n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 3) as f32))
        .collect()
}
