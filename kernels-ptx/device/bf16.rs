//! bfloat16 storage: the upper 16 bits of an f32 (same exponent, 7-bit significand). Rust has
//! no such primitive; the bits travel as `u16`, widened by a shift and narrowed by
//! `cvt.rn.bf16.f32` (`intrinsics::bf16_bits`, round to nearest even, sm_80 and later).

use crate::prelude::*;

#[repr(transparent)]
pub struct Bf16(pub u16);

impl Copy for Bf16 {}

impl Bf16 {
    /// Exact: every bf16 is an f32. (`f32::from_bits` is `core`'s, absent here.)
    #[inline(always)]
    #[allow(unnecessary_transmutes)]
    pub fn to_f32(self) -> f32 {
        unsafe { transmute::<u32, f32>((self.0 as u32) << 16) }
    }

    /// `x` rounded to the nearest bf16 (ties to even).
    #[inline(always)]
    pub fn from_f32(x: f32) -> Bf16 {
        Bf16(crate::intrinsics::bf16_bits(x))
    }
}
