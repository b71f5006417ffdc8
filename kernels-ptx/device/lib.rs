//! Retouch's GPU kernels, written in Rust and compiled to PTX by `tools/ptx-build`.
//!
//! This crate is `no_core` (the nvptx target ships no `core`): `prelude` holds the lang items,
//! `gpu` the thread indices, barriers, shuffles and fast math. Every kernel is an
//! `extern "ptx-kernel"` function whose name says what it computes; the host launchers in
//! `src/cuda/` state the grid, block and shared-memory size each expects. See README.md.

#![no_core]
#![feature(
    no_core,
    lang_items,
    intrinsics,
    rustc_attrs,
    auto_traits,
    abi_ptx,
    link_llvm_intrinsics,
    f16,
    repr_simd,
    decl_macro,
    asm_experimental_arch
)]
#![allow(internal_features, incomplete_features, clippy::missing_safety_doc)]
#![rustc_coherence_is_core]

mod attention;
mod attention_mma;
mod bf16;
mod elementwise;
mod gemm;
mod gemm_f16;
mod gpu;
mod intrinsics;
mod layout;
mod lora;
mod math;
mod mma;
mod norm;
#[allow(dead_code)] // lang items the compiler calls, not this crate
mod prelude;
mod rows;
mod softmax;
