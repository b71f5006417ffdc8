//! The `retouch` command as a user runs it.

use std::process::Command;

fn retouch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_retouch"))
        .args(args)
        .output()
        .expect("retouch runs")
}

#[test]
fn bench_reports_masked_ops_against_their_dense_version() {
    let out = retouch(&[
        "bench",
        "--quick",
        "--json",
        "--filter",
        "conv3x3",
        "--min-time-ms",
        "0",
        "--min-runs",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let results = results.as_array().expect("a list of measurements");
    let dense = results
        .iter()
        .find(|m| m["name"] == "conv3x3 64x64x320")
        .expect("the dense conv is measured");
    assert!(dense["median_ms"].as_f64().unwrap() > 0.0);
    let masked: Vec<_> = results
        .iter()
        .filter(|m| m["name"].as_str().unwrap().starts_with("masked conv3x3"))
        .collect();
    assert_eq!(masked.len(), 5, "one case per mask ratio");
    for m in masked {
        assert_eq!(m["baseline"], "conv3x3 64x64x320");
        assert!(m["ratio"].as_f64().unwrap() > 0.0, "{m}");
    }
}

#[test]
fn bench_rejects_a_filter_that_matches_nothing() {
    let out = retouch(&["bench", "--filter", "no such kernel"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no benchmark case matches"), "{err}");
}

#[test]
fn an_unavailable_device_is_a_clear_error() {
    let out = retouch(&["bench", "--device", "cuda:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cuda:0") && err.contains("not available"),
        "{err}"
    );
}
