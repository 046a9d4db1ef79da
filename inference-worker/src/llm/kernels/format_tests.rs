//! Every GGUF format the kernels read, against candle's own dequantizer as the independent
//! reference: random blocks at odd sizes (row kernels and 8-row tiles), the rows read back
//! exactly, and products for 1–9 vectors equal to the dequantized rows times the quantized
//! activations, through the SIMD kernels and the portable ones alike.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;

use super::layout::ActBlock;
use super::matrix::Matrix;
use super::testdata::vectors;
use super::{kquant, TILE_ROWS};
use super::{portable, BlockKind, Q4Matrix, Q5Matrix, Q8Acts, Q8Matrix, S8Matrix, BLOCK};

/// Random bytes for `rows × cols` values of a format, its f16 scales set to sane values.
fn random_blocks(dtype: GgmlDType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
    let (values, bytes, halves): (usize, usize, &[usize]) = match dtype {
        GgmlDType::Q4_0 => (32, 18, &[0]),
        GgmlDType::Q4_1 => (32, 20, &[0, 2]),
        GgmlDType::Q5_0 => (32, 22, &[0]),
        GgmlDType::Q5_1 => (32, 24, &[0, 2]),
        GgmlDType::Q8_0 => (32, 34, &[0]),
        GgmlDType::Q3K => (256, kquant::Q3_K_BYTES, &[108]),
        GgmlDType::Q4K => (256, kquant::Q4_K_BYTES, &[0, 2]),
        GgmlDType::Q5K => (256, kquant::Q5_K_BYTES, &[0, 2]),
        GgmlDType::Q6K => (256, kquant::Q6_K_BYTES, &[208]),
        other => panic!("no generator for {other:?}"),
    };
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 8) as u8
    };
    let mut raw = Vec::with_capacity(rows * cols / values * bytes);
    for _ in 0..rows * cols / values {
        let mut block: Vec<u8> = (0..bytes).map(|_| next()).collect();
        for (k, &at) in halves.iter().enumerate() {
            // A scale, then (where there is one) a min: added and negative in Q4_1 and Q5_1,
            // subtracted and positive in the K-quants.
            let v = f32::from(next()) / 4000.0 + 0.002;
            let negative = k == 1 && matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1);
            let v = if negative { -v } else { v };
            block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
        raw.extend(block);
    }
    raw
}

fn reference(dtype: GgmlDType, raw: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    qtensor_from_ggml(dtype, raw, vec![rows, cols], &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Dequantized activations: what the kernels' integer sums stand for.
fn dequantized(acts: &Q8Acts, v: usize) -> Vec<f32> {
    acts.vector(v)
        .iter()
        .flat_map(|a: &ActBlock| a.q.map(|q| a.d * f32::from(q)))
        .collect()
}

type RowKernel<B> = fn(&[B], [&[ActBlock]; 1], &mut [f32]);
type TileKernel<B> = fn(&[<B as BlockKind>::Tile], [&[ActBlock]; 1], &mut [[f32; TILE_ROWS]; 4]);

/// The checks for one matrix `m` made from `raw`, given its kind's portable kernels.
fn check<B: BlockKind>(
    name: &str,
    dtype: GgmlDType,
    raw: &[u8],
    m: Matrix<B>,
    portable_row: RowKernel<B>,
    portable_tile: TileKernel<B>,
) {
    let (rows, cols) = (m.rows, m.cols);
    let want = reference(dtype, raw, rows, cols);
    let mut tiled = m.clone();
    tiled.pack();
    assert_eq!(tiled.tiles.is_empty(), !rows.is_multiple_of(TILE_ROWS));
    let mut row = vec![0f32; cols];
    for matrix in [&m, &tiled] {
        for r in 0..rows {
            matrix.dequantize_row(r, &mut row);
            for (c, (got, want)) in row.iter().zip(&want[r * cols..]).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{name} {rows}x{cols}: row {r} col {c}: {got} vs candle's {want}"
                );
            }
        }
    }
    let bpr = cols / BLOCK;
    for n in [1, 2, 3, 4, 5, 9, 37] {
        let xs = vectors(n, cols);
        let acts = Q8Acts::quantize(&xs, cols);
        let (mut plain_out, mut tiled_out) = (Vec::new(), Vec::new());
        m.matmul(&acts, &mut plain_out);
        tiled.matmul(&acts, &mut tiled_out);
        for v in 0..n {
            let x = dequantized(&acts, v);
            for r in 0..rows {
                let w = &want[r * cols..(r + 1) * cols];
                let exact: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let size: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| f64::from((a * b).abs()))
                    .sum();
                // The offset terms use the activations' sum kept at f16, as llama.cpp does.
                let tolerance = 2e-3 * size + 1e-4;
                let mut portable = [0f32; 1];
                let mut tile_sums = [[0f32; TILE_ROWS]; 4];
                let portable = if tiled.tiles.is_empty() {
                    portable_row(
                        &m.blocks[r * bpr..(r + 1) * bpr],
                        [acts.vector(v)],
                        &mut portable,
                    );
                    portable[0]
                } else {
                    let group = r / TILE_ROWS;
                    portable_tile(
                        &tiled.tiles[group * bpr..(group + 1) * bpr],
                        [acts.vector(v)],
                        &mut tile_sums,
                    );
                    tile_sums[0][r % TILE_ROWS]
                };
                for (what, got) in [
                    ("rows", plain_out[v * rows + r]),
                    ("tiles", tiled_out[v * rows + r]),
                    ("portable", portable),
                ] {
                    assert!(
                        (f64::from(got) - exact).abs() <= tolerance,
                        "{name} {rows}x{cols} n={n} v={v} r={r} {what}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

/// Row counts for the row kernels (odd) and the tiles, and widths of 1–3 blocks or super-blocks.
const SHAPES_32: [(usize, usize); 3] = [(5, 96), (24, 160), (16, 32)];
const SHAPES_256: [(usize, usize); 3] = [(7, 512), (16, 768), (8, 256)];

#[test]
fn four_bit_formats_match_candle() {
    for (i, (rows, cols)) in SHAPES_32.into_iter().enumerate() {
        let raw = random_blocks(GgmlDType::Q4_0, rows, cols, 10 + i as u32);
        let m = Q4Matrix::from_q4_0(&raw, rows, cols).unwrap();
        check(
            "Q4_0",
            GgmlDType::Q4_0,
            &raw,
            m,
            portable::q4_dots::<1>,
            portable::tile_dots::<1>,
        );
        let raw = random_blocks(GgmlDType::Q4_1, rows, cols, 20 + i as u32);
        let m = Q4Matrix::from_q4_1(&raw, rows, cols).unwrap();
        check(
            "Q4_1",
            GgmlDType::Q4_1,
            &raw,
            m,
            portable::q4_dots::<1>,
            portable::tile_dots::<1>,
        );
    }
    for (i, (rows, cols)) in SHAPES_256.into_iter().enumerate() {
        let raw = random_blocks(GgmlDType::Q4K, rows, cols, 30 + i as u32);
        let m = Q4Matrix::from_q4_k(&raw, rows, cols).unwrap();
        check(
            "Q4_K",
            GgmlDType::Q4K,
            &raw,
            m,
            portable::q4_dots::<1>,
            portable::tile_dots::<1>,
        );
    }
}

#[test]
fn five_bit_formats_match_candle() {
    for (i, (rows, cols)) in SHAPES_32.into_iter().enumerate() {
        let raw = random_blocks(GgmlDType::Q5_0, rows, cols, 40 + i as u32);
        let m = Q5Matrix::from_q5_0(&raw, rows, cols).unwrap();
        check(
            "Q5_0",
            GgmlDType::Q5_0,
            &raw,
            m,
            portable::q5_dots::<1>,
            portable::q5_tile_dots::<1>,
        );
        let raw = random_blocks(GgmlDType::Q5_1, rows, cols, 50 + i as u32);
        let m = Q5Matrix::from_q5_1(&raw, rows, cols).unwrap();
        check(
            "Q5_1",
            GgmlDType::Q5_1,
            &raw,
            m,
            portable::q5_dots::<1>,
            portable::q5_tile_dots::<1>,
        );
    }
    for (i, (rows, cols)) in SHAPES_256.into_iter().enumerate() {
        let raw = random_blocks(GgmlDType::Q5K, rows, cols, 60 + i as u32);
        let m = Q5Matrix::from_q5_k(&raw, rows, cols).unwrap();
        check(
            "Q5_K",
            GgmlDType::Q5K,
            &raw,
            m,
            portable::q5_dots::<1>,
            portable::q5_tile_dots::<1>,
        );
    }
}

#[test]
fn six_and_three_bit_k_quants_match_candle() {
    for (i, (rows, cols)) in SHAPES_256.into_iter().enumerate() {
        let raw = random_blocks(GgmlDType::Q6K, rows, cols, 70 + i as u32);
        let m = S8Matrix::from_q6_k(&raw, rows, cols).unwrap();
        check(
            "Q6_K",
            GgmlDType::Q6K,
            &raw,
            m,
            portable::s8_dots::<1>,
            portable::s8_tile_dots::<1>,
        );
        let raw = random_blocks(GgmlDType::Q3K, rows, cols, 80 + i as u32);
        let m = S8Matrix::from_q3_k(&raw, rows, cols).unwrap();
        check(
            "Q3_K",
            GgmlDType::Q3K,
            &raw,
            m,
            portable::s8_dots::<1>,
            portable::s8_tile_dots::<1>,
        );
    }
}

#[test]
fn eight_bit_format_matches_candle() {
    for (i, (rows, cols)) in SHAPES_32.into_iter().enumerate() {
        let raw = random_blocks(GgmlDType::Q8_0, rows, cols, 90 + i as u32);
        let m = Q8Matrix::from_q8_0(&raw, rows, cols).unwrap();
        check(
            "Q8_0",
            GgmlDType::Q8_0,
            &raw,
            m,
            portable::q8_dots::<1>,
            portable::q8_tile_dots::<1>,
        );
    }
}

#[test]
fn a_k_quant_tensor_of_the_wrong_width_is_refused() {
    assert!(Q4Matrix::from_q4_k(&[0u8; kquant::Q4_K_BYTES], 1, 128).is_err());
    assert!(S8Matrix::from_q6_k(&[0u8; kquant::Q6_K_BYTES], 2, 256).is_err());
}
