//! The `retouch` command as a user runs it.

use std::process::Command;

fn retouch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_retouch"))
        .args(args)
        .output()
        .expect("retouch runs")
}

/// Writes a random `tiny` pipeline into a fresh temporary folder named for `tag`; a failure
/// shows what `random-model` printed.
fn random_tiny_model(tag: &str) -> std::path::PathBuf {
    let model = std::env::temp_dir().join(format!("retouch-cli-{tag}-{}", std::process::id()));
    let out = retouch(&[
        "random-model",
        "--preset",
        "tiny",
        "--force",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "random-model --out {}: {}{}",
        model.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    model
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
    assert!(dense["gflops"].as_f64().unwrap() > 0.0);
    assert!(dense["gbps"].as_f64().unwrap() > 0.0);
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

/// Without a driver, a CUDA worker or benchmark fails at start with the reason; on a GPU
/// machine there is nothing to check here.
#[test]
fn cuda_without_a_driver_fails_at_start() {
    if retouch_kernels::cuda::driver_present() {
        return;
    }
    for args in [
        &["bench", "--unet", "tiny", "--device", "cuda:0"][..],
        &["serve", "--device", "cuda:0", "--port", "0"][..],
    ] {
        let out = retouch(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cuda:0") && err.contains("no CUDA driver"),
            "{args:?}: {err}"
        );
    }
}

fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn forward_runs_a_unet_on_diffusers_named_tensors() {
    let dir = fixtures().join("unet-sd1");
    let out = std::env::temp_dir().join(format!(
        "retouch-forward-{}.safetensors",
        std::process::id()
    ));
    let run = retouch(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--component",
        "unet",
        "--inputs",
        dir.join("io.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got = retouch_kernels::SafeTensorsFile::open(&out)
        .unwrap()
        .get("sample")
        .unwrap();
    let want = retouch_kernels::SafeTensorsFile::open(dir.join("io.safetensors"))
        .unwrap()
        .get("out.sample")
        .unwrap();
    let (g, w) = (got.to_vec_f32(), want.to_vec_f32());
    let scale = w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32;
    assert!(
        g.iter()
            .zip(&w)
            .all(|(a, b)| (a - b).abs() <= 1e-4 * (b.abs() + scale))
    );
    std::fs::remove_file(out).ok();
}

#[test]
fn forward_names_a_missing_input() {
    let dir = fixtures().join("vae");
    let run = retouch(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--component",
        "vae-decode",
        "--inputs",
        fixtures().join("kernels.safetensors").to_str().unwrap(),
        "--output",
        "/dev/null",
    ]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("latent_sample"), "{err}");
}

#[test]
fn tokenize_prints_padded_ids() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/assets/clip-tokenizer");
    let run = retouch(&[
        "tokenize",
        "--model",
        dir.to_str().unwrap(),
        "a photo of a cat",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ids: Vec<u32> = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
}

/// `retouch replay --matrix` runs the three configurations on fresh engines and reports
/// each edit; `--markdown` writes the table.
#[test]
fn replay_matrix_reports_every_configuration() {
    let model = random_tiny_model("replay");
    let md = model.join("replay.md");
    let run = retouch(&[
        "replay",
        "--model",
        model.to_str().unwrap(),
        "--matrix",
        "--workers",
        "2",
        "--rates",
        "30",
        "--requests",
        "4",
        "--templates",
        "2",
        "--steps",
        "2",
        "--json",
        "--markdown",
        md.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let output: serde_json::Value = serde_json::from_slice(&run.stdout).expect("JSON output");
    let runs = output["runs"].as_array().unwrap();
    let labels: Vec<&str> = runs.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "static + dense + requests",
            "continuous + dense + requests",
            "continuous + cached + cost"
        ]
    );
    for r in runs {
        assert_eq!(r["completed"], 4, "{r}");
        let p50 = r["latency_ms"]["p50"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 <= r["latency_ms"]["p95"].as_f64().unwrap());
    }
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(
        table.contains("| continuous + cached + cost | 30.00 | 4 |"),
        "{table}"
    );
    // Without --rates: the dense capacity is probed and sets two rates, 0.5x and 1.2x.
    let run = retouch(&[
        "replay",
        "--model",
        model.to_str().unwrap(),
        "--requests",
        "2",
        "--templates",
        "1",
        "--steps",
        "2",
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let output: serde_json::Value = serde_json::from_slice(&run.stdout).expect("JSON output");
    let capacity = output["probe"]["capacity"].as_f64().unwrap();
    let rates: Vec<f64> = output["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rate"].as_f64().unwrap())
        .collect();
    assert!(capacity > 0.0);
    // JSON printing may round the last bit.
    assert_eq!(rates.len(), 2);
    for (got, want) in rates.iter().zip([0.5 * capacity, 1.2 * capacity]) {
        assert!(
            (got - want).abs() <= 1e-9 * want,
            "{rates:?} for {capacity}"
        );
    }
    let bad = retouch(&["replay", "--url", "http://127.0.0.1:9", "--matrix"]);
    assert!(!bad.status.success());
    std::fs::remove_dir_all(model).ok();
}

/// `retouch serve` answers on its port and exits cleanly on Ctrl-C (SIGINT), ending its
/// `--trace` file with the tracer's last record.
#[test]
fn serve_answers_and_stops_on_ctrl_c() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    let model = random_tiny_model("serve");
    // A free port: bind, read it back, release it for the server.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let trace = std::env::temp_dir().join(format!("retouch-cli-trace-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_retouch"))
        .args(["serve", "--model", model.to_str().unwrap()])
        .args(["--port", &port.to_string()])
        .args(["--trace", trace.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let health = loop {
        let answer = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        match answer {
            Ok(text) => break text,
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                let _ = child.kill();
                panic!("the server never answered: {e}");
            }
        }
    };
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("retouch serve did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let text = std::fs::read_to_string(&trace).expect("the trace file");
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["kind"], "trace_end", "{text}");
    assert_eq!(last["dropped"], 0, "{text}");
    let _ = std::fs::remove_file(&trace);
}
