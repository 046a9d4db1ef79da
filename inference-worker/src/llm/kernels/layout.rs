//! How the kernels' blocks sit in memory after loading: one block per format, the 8-row
//! tiles of the batched kernels, and the quantized activation block they all meet.
//!
//! Owns: the block and tile structs and the byte interleaving that builds and reads tiles.
//! Must never: compute (dot products are in `avx2` and `portable`) or parse file bytes.

use super::TILE_ROWS;

/// 32 values `d · q + m`, `q` in 0..16: byte `i` holds value `i` in its low nibble and value
/// `i + 16` in its high one. Scales are widened to f32 at load so the kernels convert
/// nothing.
#[derive(Clone, Copy)]
pub struct Q4Block {
    pub(super) d: f32,
    pub(super) m: f32,
    pub(super) q: [u8; 16],
}

/// One block of 32 values from each of 8 consecutive rows, interleaved so that one 256-bit
/// register holds the same 4 positions of all 8 rows: `q[g]` is bytes `4g..4g+4` of each
/// row's block in turn (low nibbles: values `4g..4g+4`, high nibbles: `16+4g..16+4g+4`).
/// A multiply-add against 4 broadcast activation bytes then yields one partial sum per row
/// in each lane, with no horizontal reduction.
#[derive(Clone, Copy)]
pub struct Q4Tile {
    pub(super) d: [f32; 8],
    pub(super) m: [f32; 8],
    pub(super) q: [[u8; 32]; 4],
}

/// 32 values `d · q`, `q` in -128..128.
#[derive(Clone, Copy)]
pub struct Q8Block {
    pub(super) d: f32,
    pub(super) q: [i8; 32],
}

/// One 8-bit block from each of 8 consecutive rows, interleaved like `Q4Tile`: `q[g]` is
/// bytes `4g..4g+4` of each row's block in turn.
#[derive(Clone, Copy)]
pub struct Q8Tile {
    pub(super) d: [f32; 8],
    pub(super) q: [[i8; 32]; 8],
}

/// 32 values `d · q + m`, `q` in 0..32: the low 4 bits as in `Q4Block`, the fifth bit of
/// value `i` in bit `i` of `qh` (GGUF Q5_0, Q5_1 and the sub-blocks of Q5_K).
#[derive(Clone, Copy)]
pub struct Q5Block {
    pub(super) d: f32,
    pub(super) m: f32,
    pub(super) qh: u32,
    pub(super) q: [u8; 16],
}

/// 8 rows of `Q5Block`: the low bits interleaved as in `Q4Tile`, the fifth bits beside
/// them: byte `4r + i` of `h` holds, for row `r`, the fifth bit of value `4g + i` in bit
/// `2g` and that of value `16 + 4g + i` in bit `2g + 1`, so each group of `q` finds its
/// bits at one shift.
#[derive(Clone, Copy)]
pub struct Q5Tile {
    pub(super) d: [f32; 8],
    pub(super) m: [f32; 8],
    pub(super) h: [u8; 32],
    pub(super) q: [[u8; 32]; 4],
}

/// 32 values `d[0] · q` (the first 16) and `d[1] · q` (the last 16), `q` in -32..=32: the
/// 32-value blocks of GGUF Q6_K and Q3_K, whose scales change every 16 values.
#[derive(Clone, Copy)]
pub struct S8Block {
    pub(super) d: [f32; 2],
    pub(super) q: [i8; 32],
}

/// 8 rows of `S8Block`, interleaved like `Q8Tile`: groups 0–3 hold the first 16 values of
/// each row, groups 4–7 the last 16.
#[derive(Clone, Copy)]
pub struct S8Tile {
    pub(super) d: [[f32; 8]; 2],
    pub(super) q: [[i8; 32]; 8],
}

/// 32 quantized activations with `s = d · Σ q`, the term that meets a 4-bit block's `m`.
#[derive(Clone, Copy)]
pub struct ActBlock {
    pub(super) d: f32,
    pub(super) s: f32,
    pub(super) q: [i8; 32],
    /// `q + 128` as unsigned bytes: the unsigned operand of VNNI's byte dot products.
    pub(super) u: [u8; 32],
}

/// Interleaves 8 rows' bytes: group `g` holds bytes `4g..4g+4` of each row in turn.
pub(super) fn interleave<T: Copy + Default, const G: usize>(
    rows: [&[T]; TILE_ROWS],
) -> [[T; 32]; G] {
    let mut groups = [[T::default(); 32]; G];
    for (g, lanes) in groups.iter_mut().enumerate() {
        for (row, lane) in rows.iter().zip(lanes.chunks_exact_mut(4)) {
            lane.copy_from_slice(&row[4 * g..4 * g + 4]);
        }
    }
    groups
}

/// One row's bytes back out of interleaved groups.
pub(super) fn deinterleave<T: Copy + Default, const W: usize>(
    groups: &[[T; 32]],
    lane: usize,
) -> [T; W] {
    let mut row = [T::default(); W];
    for (g, chunk) in row.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&groups[g][4 * lane..4 * lane + 4]);
    }
    row
}
