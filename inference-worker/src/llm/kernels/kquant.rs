//! GGUF's K-quant super-blocks (256 values with packed sub-block scales) unpacked into the
//! 32-value blocks the kernels run, with no rounding: each sub-block's scale times the
//! super-block's scale is exact in f32, so the values are the file's values.
//!
//! Owns: the byte layouts of Q3_K, Q4_K, Q5_K and Q6_K and their scale packing. Must
//! never: compute products or choose a block kind for a matrix (that is `weights`').

use super::layout::{Q4Block, Q5Block, S8Block};
use super::matrix::half_at;

/// Values per super-block.
pub const SUPER: usize = 256;
/// Bytes per super-block of each format.
pub const Q3_K_BYTES: usize = 110;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;

/// Scale and min (6 bits each) of sub-block `j` of 8, from the 12 bytes Q4_K and Q5_K pack
/// them in: the first four pairs in the low 6 bits of bytes 0–7, the last four split
/// between the nibbles of bytes 8–11 and the top 2 bits of bytes 0–7.
fn scale_min(packed: &[u8], j: usize) -> (f32, f32) {
    let (scale, min) = if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    };
    (f32::from(scale), f32::from(min))
}

/// Low nibbles of `lo` for values 0..16, of `hi` for 16..32: the nibble order of `Q4Block`.
fn nibbles(values: &[u8; 32]) -> [u8; 16] {
    std::array::from_fn(|i| (values[i] & 0x0F) | (values[i + 16] & 0x0F) << 4)
}

/// Q4_K (`d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`): sub-block `s` is
/// `d · scale_s · q − dmin · min_s`, its 4-bit values in the low (even `s`) or high (odd
/// `s`) nibbles of bytes `32 (s / 2)..`.
pub fn q4_k(b: &[u8]) -> [Q4Block; 8] {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (packed, qs) = (&b[4..16], &b[16..144]);
    std::array::from_fn(|s| {
        let (scale, min) = scale_min(packed, s);
        let run = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        let values: [u8; 32] = std::array::from_fn(|l| run[l] >> (4 * (s % 2)));
        Q4Block {
            d: d * scale,
            m: -(dmin * min),
            q: nibbles(&values),
        }
    })
}

/// Q5_K (`d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`): as Q4_K, with the
/// fifth bit of value `l` of sub-block `s` in bit `s` of `qh[l]`.
pub fn q5_k(b: &[u8]) -> [Q5Block; 8] {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (packed, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    std::array::from_fn(|s| {
        let (scale, min) = scale_min(packed, s);
        let run = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        let values: [u8; 32] = std::array::from_fn(|l| run[l] >> (4 * (s % 2)));
        let high = (0..32).fold(0u32, |acc, l| acc | u32::from((qh[l] >> s) & 1) << l);
        Q5Block {
            d: d * scale,
            m: -(dmin * min),
            qh: high,
            q: nibbles(&values),
        }
    })
}

/// Q6_K (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`): value `d · scale · (q −
/// 32)`, a scale per 16 values. Each half of 128 values takes 64 bytes of `ql` and 32 of
/// `qh`; its 32-value block `k` reads the low (`k` < 2) or high nibbles of `ql[32 (k % 2)..]`
/// and bits `2k, 2k + 1` of `qh`.
pub fn q6_k(b: &[u8]) -> [S8Block; 8] {
    let (ql, qh, scales, d) = (&b[..128], &b[128..192], &b[192..208], half_at(b, 208));
    std::array::from_fn(|block| {
        let (half, k) = (block / 4, block % 4);
        let ql = &ql[64 * half + 32 * (k % 2)..];
        let qh = &qh[32 * half..];
        let q = std::array::from_fn(|l| {
            let low = (ql[l] >> (4 * (k / 2))) & 0x0F;
            let high = (qh[l] >> (2 * k)) & 3;
            ((low | high << 4) as i8) - 32
        });
        let scale = |i: usize| d * f32::from(scales[8 * half + 2 * k + i] as i8);
        S8Block {
            d: [scale(0), scale(1)],
            q,
        }
    })
}

/// Q3_K (`hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`): value `d · (scale −
/// 32) · (q − 4 · (1 − h))` with 2-bit `q`, a high bit `h` and a 6-bit scale per 16 values.
/// Block `4 n + j` takes bits `2j, 2j + 1` of `qs[32 n..32 n + 32]` and bit `4 n + j` of
/// `hmask`.
pub fn q3_k(b: &[u8]) -> [S8Block; 8] {
    let (hmask, qs, packed, d) = (&b[..32], &b[32..96], &b[96..108], half_at(b, 108));
    // Sixteen 6-bit scales: low nibbles from bytes 0–7 (both halves), top 2 bits from 8–11.
    let scale = |s: usize| {
        let low = if s < 8 {
            packed[s] & 0x0F
        } else {
            packed[s - 8] >> 4
        };
        let high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
        d * (f32::from(low | high << 4) - 32.0)
    };
    std::array::from_fn(|block| {
        let (n, j) = (block / 4, block % 4);
        let q = std::array::from_fn(|l| {
            let low = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
            let high = (hmask[l] >> block) & 1;
            if high == 1 {
                low
            } else {
                low - 4
            }
        });
        S8Block {
            d: [scale(2 * block), scale(2 * block + 1)],
            q,
        }
    })
}
