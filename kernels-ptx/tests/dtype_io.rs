//! Dtype conversion round trips and safetensors save/load.

mod common;

use std::path::PathBuf;

use common::*;
use half::{bf16, f16};
use retouch_kernels::{DType, Device, Error, SafeTensorsFile, Tensor, save_safetensors};

/// f32 values that exercise rounding: random ones of several magnitudes, exact ties, values
/// that overflow f16, subnormals of both half types, signed zero, infinities and NaN.
fn tricky_f32() -> Vec<f32> {
    let mut v = randn_affine(&[200], 1, 100.0, 0.0).to_vec_f32();
    v.extend(randn_affine(&[100], 2, 1e-3, 0.0).to_vec_f32());
    v.extend([
        1.0 + 2f32.powi(-11),       // f16 tie -> 1.0 (even)
        1.0 + 3.0 * 2f32.powi(-11), // f16 tie -> 1 + 2^-9 (even)
        1.0 + 2f32.powi(-8),        // bf16 tie -> 1.0
        1.0 + 3.0 * 2f32.powi(-8),  // bf16 tie -> 1 + 2^-6
        65504.0,
        65520.0, // rounds to f16 infinity
        1e5,
        -1e5,
        3e-6,  // f16 subnormal
        1e-8,  // below f16's smallest subnormal
        1e-39, // f32 (and bf16) subnormal
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3.0e38,
    ]);
    v
}

#[test]
fn f32_to_half_rounds_to_nearest_even() {
    let v = tricky_f32();
    let x = Tensor::from_vec(v.clone(), &[v.len()]).unwrap();
    let h = x.to_dtype(DType::F16).unwrap();
    assert_eq!((h.dtype(), h.shape()), (DType::F16, x.shape()));
    let hb = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(hb.dtype(), DType::BF16);
    for (i, &f) in v.iter().enumerate() {
        let (got, want) = (h.as_slice::<f16>().unwrap()[i], f16::from_f32(f));
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "f16 of {f}: got {got}, want {want}"
        );
        let (got, want) = (hb.as_slice::<bf16>().unwrap()[i], bf16::from_f32(f));
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "bf16 of {f}: got {got}, want {want}"
        );
    }
    // The ties, spelled out.
    let n = 300;
    let f16s = h.as_slice::<f16>().unwrap();
    assert_eq!(f16s[n].to_f32(), 1.0);
    assert_eq!(f16s[n + 1].to_f32(), 1.0 + 2f32.powi(-9));
    assert!(f16s[n + 5].is_infinite());
    let bf16s = hb.as_slice::<bf16>().unwrap();
    assert_eq!(bf16s[n + 2].to_f32(), 1.0);
    assert_eq!(bf16s[n + 3].to_f32(), 1.0 + 2f32.powi(-6));
}

#[test]
fn round_trips() {
    // half -> f32 -> half is the identity for every finite and infinite value.
    let v = tricky_f32();
    let x = Tensor::from_vec(v.clone(), &[v.len()]).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let h = x.to_dtype(dtype).unwrap();
        let back = h.to_dtype(DType::F32).unwrap().to_dtype(dtype).unwrap();
        let (a, b) = (h.to_vec_f32(), back.to_vec_f32());
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                "{dtype:?} round trip at {i}: {p} vs {q}"
            );
        }
        // f32 -> half -> f32 equals the half crate's rounding.
        let widened = h.to_dtype(DType::F32).unwrap();
        assert_eq!(widened.dtype(), DType::F32);
        for (i, &f) in v.iter().enumerate() {
            let want = round_to(dtype, f as f64) as f32;
            let got = widened.as_slice::<f32>().unwrap()[i];
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && f.is_nan()),
                "{dtype:?} widen at {i}: {got} vs {want} (from {f})"
            );
        }
    }
    // f16 -> bf16 goes through the f16 value.
    let h = x.to_dtype(DType::F16).unwrap();
    let b = h.to_dtype(DType::BF16).unwrap();
    for (p, q) in h
        .as_slice::<f16>()
        .unwrap()
        .iter()
        .zip(b.as_slice::<bf16>().unwrap())
    {
        let want = bf16::from_f32(p.to_f32());
        assert!(q.to_bits() == want.to_bits() || (q.is_nan() && want.is_nan()));
    }
    // Same dtype: an identical copy.
    let same = x.to_dtype(DType::F32).unwrap();
    assert_bits_eq("f32 -> f32", &same.to_vec_f32(), &v);
}

#[test]
fn integer_conversions() {
    let ids = Tensor::from_vec(vec![49406i64, -3, 0, 1 << 40], &[2, 2]).unwrap();
    assert_eq!(
        ids.to_dtype(DType::I64).unwrap().as_slice::<i64>().unwrap(),
        ids.as_slice::<i64>().unwrap()
    );
    assert!(
        ids.to_dtype(DType::F32).is_err(),
        "integer tensors convert only to i64"
    );
    let x = Tensor::from_vec(vec![2.75f32, -1.5, 7.0], &[3]).unwrap();
    let i = x.to_dtype(DType::I64).unwrap();
    assert_eq!(i.as_slice::<i64>().unwrap(), [2, -1, 7]);
}

/// A fresh, unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "retouch-kernels-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn safetensors_round_trip() {
    let dir = TempDir::new("st");
    let path = dir.0.join("weights.safetensors");
    let f32_t = randn(&[3, 5, 7], 10);
    let f16_t = randn(&[13], 11).to_dtype(DType::F16).unwrap();
    let bf16_t = randn(&[2, 3], 12).to_dtype(DType::BF16).unwrap();
    let i64_t = Tensor::from_vec(vec![49406i64, -7, 1 << 40, 0, 3], &[5]).unwrap();
    let tensors = [
        ("unet.conv_in.weight", &f32_t),
        ("te.f16", &f16_t),
        ("a.bf16", &bf16_t),
        ("ids", &i64_t),
    ];
    save_safetensors(&path, tensors.iter().map(|(n, t)| (*n, *t))).unwrap();

    let file = SafeTensorsFile::open(&path).unwrap();
    assert_eq!(file.path(), path.as_path());
    assert_eq!(
        file.names(),
        ["a.bf16", "ids", "te.f16", "unet.conv_in.weight"]
    );
    for (name, want) in tensors {
        assert!(file.contains(name));
        assert_eq!(file.shape(name).unwrap(), want.shape());
        let got = file.get(name).unwrap();
        assert_eq!(got.dtype(), want.dtype(), "{name}");
        assert_eq!(got.shape(), want.shape(), "{name}");
        assert_eq!(got.device(), Device::Cpu);
        match want.dtype() {
            DType::F32 => assert_eq!(
                got.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>(),
                want.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            ),
            DType::F16 => assert_eq!(
                got.as_slice::<f16>().unwrap(),
                want.as_slice::<f16>().unwrap()
            ),
            DType::BF16 => assert_eq!(
                got.as_slice::<bf16>().unwrap(),
                want.as_slice::<bf16>().unwrap()
            ),
            DType::I64 => assert_eq!(
                got.as_slice::<i64>().unwrap(),
                want.as_slice::<i64>().unwrap()
            ),
        }
    }
    let all = file.load_all().unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(
        all["ids"].as_slice::<i64>().unwrap(),
        i64_t.as_slice::<i64>().unwrap()
    );
}

#[test]
fn safetensors_missing_tensor_and_file() {
    let dir = TempDir::new("st-missing");
    let path = dir.0.join("one.safetensors");
    let t = randn(&[4], 20);
    save_safetensors(&path, [("present", &t)]).unwrap();
    let file = SafeTensorsFile::open(&path).unwrap();
    assert!(!file.contains("absent"));
    match file.get("absent") {
        Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "absent"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert!(matches!(
        file.shape("absent"),
        Err(Error::MissingTensor { .. })
    ));
    assert!(matches!(
        SafeTensorsFile::open(dir.0.join("nope.safetensors")),
        Err(Error::Io { .. })
    ));
    // A file that is not safetensors.
    let junk = dir.0.join("junk.safetensors");
    std::fs::write(&junk, b"definitely not a header").unwrap();
    assert!(matches!(
        SafeTensorsFile::open(&junk),
        Err(Error::SafeTensors { .. })
    ));
}
