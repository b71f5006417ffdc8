//! The dense ops against PyTorch/diffusers outputs recorded by `tools/fixtures/kernels.py`:
//! checks that each op means what its PyTorch counterpart means, not only that it is
//! self-consistent.

use retouch_kernels::{Conv2dParams, Conv2dWeight, SafeTensorsFile, Tensor, TimestepEmbedding};

struct Fixture(SafeTensorsFile);

impl Fixture {
    fn open() -> Fixture {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/kernels.safetensors");
        Fixture(SafeTensorsFile::open(path).expect("fixture file"))
    }

    fn get(&self, name: &str) -> Tensor {
        self.0.get(name).expect(name)
    }
}

/// Element-by-element comparison: |got - want| <= 1e-5 + 1e-4 |want|.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_close_tol(what, got, want, 1e-5);
}

fn assert_close_tol(what: &str, got: &Tensor, want: &Tensor, atol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec_f32(), want.to_vec_f32());
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (atol + 1e-4 * b.abs());
        if excess > worst.0 || a.is_nan() {
            worst = (excess.max(f32::MIN_POSITIVE), i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= 0.0,
        "{what}: element {i} is {} but PyTorch gives {}",
        g[i],
        w[i]
    );
}

#[test]
fn linear_matches_torch() {
    let f = Fixture::open();
    let got = f
        .get("linear.x")
        .linear(&f.get("linear.w"), Some(&f.get("linear.b")))
        .unwrap();
    assert_close("linear", &got, &f.get("linear.out"));
}

#[test]
fn conv_matches_torch() {
    let f = Fixture::open();
    let x = f.get("conv.x");
    let w = Conv2dWeight::from_oihw(&f.get("conv.w"), Some(&f.get("conv.b"))).unwrap();
    let s1 = x.conv2d(&w, Conv2dParams::SAME_3X3).unwrap();
    assert_close("conv stride 1", &s1, &f.get("conv.s1"));
    let s2 = x.conv2d(&w, Conv2dParams::DOWN_3X3).unwrap();
    assert_close("conv stride 2", &s2, &f.get("conv.s2"));
    let w1 = Conv2dWeight::from_oihw(&f.get("conv.w1"), None).unwrap();
    let p = x.conv2d(&w1, Conv2dParams::POINTWISE).unwrap();
    assert_close("conv 1x1", &p, &f.get("conv.1x1"));
}

#[test]
fn norms_match_torch() {
    let f = Fixture::open();
    let x = f.get("gn.x");
    let (w, b) = (f.get("gn.w"), f.get("gn.b"));
    assert_close(
        "group norm",
        &x.group_norm(4, &w, &b, 1e-6, false).unwrap(),
        &f.get("gn.out"),
    );
    assert_close(
        "group norm + silu",
        &x.group_norm(4, &w, &b, 1e-6, true).unwrap(),
        &f.get("gn.silu"),
    );
    let ln = f
        .get("ln.x")
        .layer_norm(&f.get("ln.w"), &f.get("ln.b"), 1e-5)
        .unwrap();
    assert_close("layer norm", &ln, &f.get("ln.out"));
}

#[test]
fn activations_match_torch() {
    let f = Fixture::open();
    let x = f.get("act.x");
    assert_close("silu", &x.silu().unwrap(), &f.get("act.silu"));
    assert_close("gelu", &x.gelu().unwrap(), &f.get("act.gelu"));
    assert_close(
        "gelu tanh",
        &x.gelu_tanh().unwrap(),
        &f.get("act.gelu_tanh"),
    );
    assert_close(
        "quick gelu",
        &x.quick_gelu().unwrap(),
        &f.get("act.quick_gelu"),
    );
    assert_close(
        "softmax",
        &x.softmax_last_dim().unwrap(),
        &f.get("act.softmax"),
    );
    assert_close(
        "geglu",
        &f.get("geglu.x").geglu().unwrap(),
        &f.get("geglu.out"),
    );
}

#[test]
fn attention_matches_torch_sdpa() {
    let f = Fixture::open();
    let cross = Tensor::attention(
        &f.get("attn.q"),
        &f.get("attn.k"),
        &f.get("attn.v"),
        3,
        false,
    )
    .unwrap();
    assert_close("cross attention", &cross, &f.get("attn.out"));
    let causal = Tensor::attention(
        &f.get("causal.q"),
        &f.get("causal.k"),
        &f.get("causal.v"),
        3,
        true,
    )
    .unwrap();
    assert_close("causal attention", &causal, &f.get("causal.out"));
}

#[test]
fn upsampling_and_timestep_embedding_match() {
    let f = Fixture::open();
    let up = f.get("up.x").upsample_nearest2x().unwrap();
    assert_close("upsample", &up, &f.get("up.out"));
    let t = f.get("temb.t");
    // Arguments reach t * freq ~ 1000, where one f32 ulp of a frequency (as PyTorch's and
    // Rust's exp may round differently) moves the phase by ~6e-5: hence the wider bound.
    assert_close_tol(
        "timestep embedding (UNet)",
        &TimestepEmbedding::unet(320).embed(&t).unwrap(),
        &f.get("temb.unet"),
        2e-4,
    );
    let default = TimestepEmbedding {
        dim: 33,
        flip_sin_to_cos: false,
        downscale_freq_shift: 1.0,
        scale: 1.0,
        max_period: 10000.0,
    };
    assert_close(
        "timestep embedding (default)",
        &default.embed(&t).unwrap(),
        &f.get("temb.default"),
    );
}
