//! `retouch selftest`: on a machine without a CUDA driver it fails at start with a clear
//! message; with one, every kernel check passes.

use std::process::Command;

fn retouch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_retouch"))
        .args(args)
        .output()
        .expect("retouch runs")
}

#[test]
fn selftest_on_cuda_fails_clearly_without_a_driver_and_passes_with_one() {
    let out = retouch(&["selftest", "--device", "cuda:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if retouch_kernels::cuda::driver_present() {
        assert!(out.status.success(), "{stdout}\n{err}");
        assert!(
            stdout.contains("PASS") && !stdout.contains("FAIL"),
            "{stdout}"
        );
    } else {
        assert!(!out.status.success());
        assert!(
            err.contains("cuda:0") && err.contains("no CUDA driver"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn selftest_needs_a_cuda_device() {
    let out = retouch(&["selftest", "--device", "cpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda:N"), "{err}");
    let out = retouch(&["selftest", "--device", "tpu:0"]);
    assert!(!out.status.success());
}
