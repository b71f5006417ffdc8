//! The schedulers against diffusers (tests/fixtures/schedulers/, written by
//! tools/fixtures/schedulers.py), on channels-last latents as Retouch stores them, plus the
//! API's error and state behaviour.
//!
//! Timesteps must match exactly. Sigmas, init_noise_sigma, scale_model_input and every step's
//! output must match within a relative error of 1e-4 per element, where the denominator is
//! the element's magnitude but at least the tensor's RMS: PyTorch's CPU f32 `sqrt` is not
//! correctly rounded (1 ulp off for about a fifth of the training sigmas), and the few-ulp
//! differences that leaves are relative to the tensor's scale, so an element that happens to
//! cancel to near zero would otherwise show an arbitrary relative error.

use std::path::{Path, PathBuf};

use retouch_models::kernels::{DType, Device, SafeTensorsFile, Tensor};
use retouch_models::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use serde_json::Value;

const REL_TOL: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/schedulers")
}

/// The fixture script's input stream: splitmix64 mapped to multiples of 2^-22 in [-2, 2).
struct Stream {
    state: u64,
    shape_nchw: Vec<usize>,
}

impl Stream {
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next NCHW tensor, returned channels-last.
    fn tensor(&mut self) -> Tensor {
        let n = self.shape_nchw.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| ((self.next() >> 40) as f64 * 2f64.powi(-22) - 2.0) as f32)
            .collect();
        Tensor::from_vec(data, &self.shape_nchw)
            .unwrap()
            .nchw_to_nhwc()
            .unwrap()
    }
}

/// Largest `|got - want| / max(|want|, rms(want))` over the elements.
fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let rms =
        (want.iter().map(|&w| f64::from(w).powi(2)).sum::<f64>() / want.len() as f64).sqrt() as f32;
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g == w {
                0.0
            } else {
                (g - w).abs() / w.abs().max(rms).max(f32::MIN_POSITIVE)
            }
        })
        .fold(0f32, |m, e| if e.is_nan() { e } else { m.max(e) })
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Distance in units in the last place between two finite f32 of one sign.
fn ulps(a: f32, b: f32) -> u32 {
    a.to_bits().abs_diff(b.to_bits())
}

#[derive(Default)]
struct Report {
    failures: Vec<String>,
    worst: f32,
    checked: usize,
}

impl Report {
    fn check(&mut self, case: &str, what: &str, got: &[f32], want: &[f32]) {
        let err = max_rel_err(got, want);
        self.checked += 1;
        self.worst = self.worst.max(err);
        if err.is_nan() || err > REL_TOL {
            self.failures
                .push(format!("{case}: {what}: relative error {err:e}"));
        }
    }
}

struct Case {
    name: String,
    kind: SchedulerKind,
    steps: usize,
    begin: usize,
    seed: u64,
    timesteps: Vec<f32>,
    sigmas: Option<Vec<f32>>,
    init_noise_sigma: f32,
    config: SchedulerConfig,
}

fn load_cases() -> (Vec<usize>, Vec<Case>) {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    let shape = manifest["shape_nchw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let cases = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            // Parsed from the file, as a model's scheduler_config.json is.
            let config = SchedulerConfig::from_file(dir.join(format!("{name}.json"))).unwrap();
            Case {
                kind: c["kind"].as_str().unwrap().parse().unwrap(),
                steps: c["num_inference_steps"].as_u64().unwrap() as usize,
                begin: c["begin_index"].as_u64().unwrap() as usize,
                seed: c["seed"].as_u64().unwrap(),
                timesteps: floats(&c["timesteps"]),
                sigmas: (!c["sigmas"].is_null()).then(|| floats(&c["sigmas"])),
                init_noise_sigma: c["init_noise_sigma"].as_f64().unwrap() as f32,
                name,
                config,
            }
        })
        .collect();
    (shape, cases)
}

fn check_timesteps(case: &Case, got: &[f32], report: &mut Report) -> bool {
    // Euler with Karras sigmas has fractional timesteps from diffusers' `_sigma_to_t` over
    // `np.log` of f32 sigmas; NumPy's SIMD f32 log and PyTorch's sqrt are not correctly
    // rounded, so those may differ in the last bit. Every other timestep is exact.
    let karras_euler =
        case.kind == SchedulerKind::Euler && case.config.use_karras_sigmas == Some(true);
    let ok = got.len() == case.timesteps.len()
        && got
            .iter()
            .zip(&case.timesteps)
            .all(|(&g, &w)| g == w || (karras_euler && ulps(g, w) <= 2));
    if !ok {
        report.failures.push(format!(
            "{}: timesteps {got:?}, diffusers {:?}",
            case.name, case.timesteps
        ));
    }
    ok
}

fn run_case(case: &Case, shape_nchw: &[usize], report: &mut Report) {
    let name = case.name.as_str();
    let mut sched: Scheduler = case.config.build(case.kind, case.steps).unwrap();
    assert_eq!(sched.kind(), case.kind);
    if !check_timesteps(case, sched.timesteps(), report) {
        return;
    }
    match (&case.sigmas, sched.sigmas()) {
        (None, None) => {}
        (Some(want), Some(got)) => report.check(name, "sigmas", got, want),
        _ => report
            .failures
            .push(format!("{name}: sigmas present on one side only")),
    }
    report.check(
        name,
        "init_noise_sigma",
        &[sched.init_noise_sigma()],
        &[case.init_noise_sigma],
    );

    let file = SafeTensorsFile::open(fixture_dir().join(format!("{name}.safetensors"))).unwrap();
    let get = |n: &str| file.get(n).unwrap().to_vec_f32();
    let mut stream = Stream {
        state: case.seed,
        shape_nchw: shape_nchw.to_vec(),
    };
    let mut sample = if case.begin > 0 {
        let (original, noise) = (stream.tensor(), stream.tensor());
        sched.set_begin_index(case.begin).unwrap();
        sched.add_noise(&original, &noise).unwrap()
    } else {
        stream
            .tensor()
            .affine(sched.init_noise_sigma(), 0.0)
            .unwrap()
    };
    report.check(name, "initial sample", &sample.to_vec_f32(), &get("sample"));

    let prev = get("prev");
    let scaled = (case.kind == SchedulerKind::Euler).then(|| get("scaled"));
    let per = sample.elem_count();
    let n = case.timesteps.len();
    assert_eq!(prev.len(), per * (n - case.begin), "{name}");
    for k in case.begin..n {
        assert_eq!(sched.steps_done(), k);
        assert_eq!(sched.current_timestep(), Some(sched.timesteps()[k]));
        let slot = (k - case.begin) * per..(k - case.begin + 1) * per;
        let input = sched.scale_model_input(&sample).unwrap();
        match &scaled {
            Some(s) => report.check(
                name,
                &format!("scale_model_input {k}"),
                &input.to_vec_f32(),
                &s[slot.clone()],
            ),
            None => assert_eq!(input.to_vec_f32(), sample.to_vec_f32(), "{name}"),
        }
        let model_output = stream.tensor();
        sample = sched.step(&model_output, &sample).unwrap();
        report.check(
            name,
            &format!("step {k}"),
            &sample.to_vec_f32(),
            &prev[slot],
        );
    }
    assert!(sched.is_finished(), "{name}");
    assert_eq!(sched.current_timestep(), None);
    assert!(sched.step(&sample, &sample).is_err(), "{name}");
    assert!(sched.scale_model_input(&sample).is_err(), "{name}");
}

#[test]
fn schedulers_match_diffusers() {
    let (shape, cases) = load_cases();
    let mut report = Report::default();
    for case in &cases {
        run_case(case, &shape, &mut report);
    }
    eprintln!(
        "{} cases, {} tensors compared, worst relative error {:e}",
        cases.len(),
        report.checked,
        report.worst
    );
    assert!(
        report.failures.is_empty(),
        "{} mismatches:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}

const SD15: &str = r#"{
  "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
  "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
  "trained_betas": null, "clip_sample": false
}"#;

fn sd15() -> SchedulerConfig {
    SchedulerConfig::from_json(SD15).unwrap()
}

fn error_of(json: &str, kind: SchedulerKind) -> String {
    let config = SchedulerConfig::from_json(json).unwrap();
    config.build(kind, 10).unwrap_err().to_string()
}

#[test]
fn missing_fields_take_the_target_class_defaults() {
    let config = sd15();
    assert_eq!(config.class_name.as_deref(), Some("PNDMScheduler"));
    // DDIM defaults to "leading" spacing (with the config's offset), Euler and DPM to
    // "linspace".
    let ddim = config.build(SchedulerKind::Ddim, 4).unwrap();
    assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    let euler = config.build(SchedulerKind::Euler, 4).unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    let dpm = config.build(SchedulerKind::DpmPp2m, 4).unwrap();
    assert_eq!(dpm.timesteps(), &[999.0, 749.0, 500.0, 250.0]);
    assert_eq!(ddim.init_noise_sigma(), 1.0);
    assert_eq!(dpm.init_noise_sigma(), 1.0);
    assert!(euler.init_noise_sigma() > 14.0);
    // An empty config is diffusers' class defaults.
    let empty = SchedulerConfig::from_json("{}").unwrap();
    assert_eq!(
        empty.build(SchedulerKind::Ddim, 2).unwrap().timesteps(),
        &[500.0, 0.0]
    );
}

#[test]
fn unsupported_and_bad_configs_are_clear_errors() {
    let cases = [
        (
            r#"{"thresholding": true}"#,
            SchedulerKind::Ddim,
            "thresholding",
        ),
        (
            r#"{"use_exponential_sigmas": true}"#,
            SchedulerKind::Euler,
            "use_exponential_sigmas",
        ),
        (
            r#"{"use_beta_sigmas": true}"#,
            SchedulerKind::DpmPp2m,
            "use_beta_sigmas",
        ),
        (
            r#"{"use_lu_lambdas": true}"#,
            SchedulerKind::DpmPp2m,
            "use_lu_lambdas",
        ),
        (
            r#"{"variance_type": "learned_range"}"#,
            SchedulerKind::DpmPp2m,
            "variance_type",
        ),
        (
            r#"{"prediction_type": "flow_prediction"}"#,
            SchedulerKind::DpmPp2m,
            "prediction_type",
        ),
        (
            r#"{"beta_schedule": "sigmoid"}"#,
            SchedulerKind::Euler,
            "beta_schedule",
        ),
        (
            r#"{"timestep_spacing": "karras"}"#,
            SchedulerKind::Ddim,
            "timestep_spacing",
        ),
        (
            r#"{"interpolation_type": "cubic"}"#,
            SchedulerKind::Euler,
            "interpolation_type",
        ),
        (
            r#"{"final_sigmas_type": "one"}"#,
            SchedulerKind::DpmPp2m,
            "final_sigmas_type",
        ),
        (
            r#"{"solver_type": "rk4"}"#,
            SchedulerKind::DpmPp2m,
            "solver_type",
        ),
        (
            r#"{"timestep_type": "continuous", "prediction_type": "v_prediction"}"#,
            SchedulerKind::Euler,
            "timestep_type",
        ),
        (
            r#"{"clip_sample_range": -1}"#,
            SchedulerKind::Ddim,
            "clip_sample_range",
        ),
        (
            r#"{"trained_betas": [0.1, 0.2]}"#,
            SchedulerKind::Ddim,
            "trained_betas",
        ),
        (r#"{"steps_offset": 1000}"#, SchedulerKind::Ddim, "outside"),
    ];
    for (json, kind, needle) in cases {
        let message = error_of(json, kind);
        assert!(message.contains(needle), "{json}: {message}");
    }
    // Wrong JSON types and non-JSON text are errors, not panics.
    assert!(SchedulerConfig::from_json(r#"{"clip_sample": "yes"}"#).is_err());
    assert!(SchedulerConfig::from_json("not json").is_err());
    let missing = SchedulerConfig::from_file("/nonexistent/scheduler_config.json");
    assert!(missing.unwrap_err().to_string().contains("/nonexistent"));
    // Step counts.
    let config = sd15();
    assert!(config.build(SchedulerKind::Euler, 0).is_err());
    assert!(config.build(SchedulerKind::Euler, 1001).is_err());
    // Kind names.
    assert_eq!(
        "dpmpp-2m".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::DpmPp2m
    );
    let err = "dpm++".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(err.contains("ddim") && err.contains("dpmpp-2m"), "{err}");
}

#[test]
fn python_non_finite_tokens_parse() {
    let config =
        SchedulerConfig::from_json(r#"{"lambda_min_clipped": -Infinity, "sigma_max": null}"#)
            .unwrap();
    assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
    assert_eq!(config.sigma_max, None);
    assert!(config.build(SchedulerKind::DpmPp2m, 5).is_ok());
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let mut sched = sd15().build(SchedulerKind::DpmPp2m, 3).unwrap();
    let x = Tensor::randn(&[1, 2, 3, 4], 1, Device::Cpu);
    let other = Tensor::randn(&[1, 3, 2, 4], 2, Device::Cpu);
    assert!(sched.step(&other, &x).is_err());
    let half = x.to_dtype(DType::F16).unwrap();
    assert!(sched.step(&half, &half).is_err());
    assert!(sched.add_noise(&x, &other).is_err());
    assert!(sched.add_noise_at(&x, &x, 3).is_err());
    assert!(sched.set_begin_index(4).is_err());
    // Failed calls leave the state as it was.
    assert_eq!(sched.steps_done(), 0);
    sched.step(&x, &x).unwrap();
    assert!(sched.set_begin_index(0).is_err());
    // Beginning at the end is an empty (finished) schedule.
    let mut done = sd15().build(SchedulerKind::Euler, 3).unwrap();
    done.set_begin_index(3).unwrap();
    assert!(done.is_finished());
    assert!(done.step(&x, &x).is_err());
}

#[test]
fn requests_keep_their_own_state() {
    // Two requests interleaved at different steps give the same results as one alone: each
    // scheduler owns its step index and DPM-Solver++ history.
    for kind in SchedulerKind::ALL {
        let config = sd15();
        let outputs: Vec<Tensor> = (0..8)
            .map(|i| Tensor::randn(&[1, 2, 3, 4], 100 + i, Device::Cpu))
            .collect();
        let start = Tensor::randn(&[1, 2, 3, 4], 7, Device::Cpu);
        let mut alone = config.build(kind, 8).unwrap();
        let mut expected = vec![start.clone()];
        for m in &outputs {
            let x = alone.step(m, expected.last().unwrap()).unwrap();
            expected.push(x);
        }
        let mut a = config.build(kind, 8).unwrap();
        let mut b = config.build(kind, 8).unwrap();
        let (mut xa, mut xb) = (start.clone(), start.clone());
        for (i, m) in outputs.iter().enumerate() {
            xa = a.step(m, &xa).unwrap();
            if i >= 3 {
                xb = b.step(&outputs[i - 3], &xb).unwrap();
            }
        }
        for (i, m) in outputs.iter().enumerate().skip(5) {
            xb = b.step(m, &xb).unwrap();
            assert_eq!(b.steps_done(), i + 1);
        }
        assert_eq!(xa.to_vec_f32(), expected[8].to_vec_f32(), "{kind}");
        assert_eq!(xb.to_vec_f32(), expected[8].to_vec_f32(), "{kind}");
    }
}

#[test]
fn trailing_spacing_has_the_requested_step_count() {
    // np.arange(1000, 0, -1000 / 61) has 62 elements; diffusers then runs a 62nd step at
    // timestep -1. Retouch drops it: 61 steps, all at valid timesteps.
    let config = SchedulerConfig::from_json(r#"{"timestep_spacing": "trailing"}"#).unwrap();
    for kind in SchedulerKind::ALL {
        for n in [61, 103, 7, 1000] {
            let sched = config.build(kind, n).unwrap();
            assert_eq!(sched.num_steps(), n, "{kind} {n}");
            assert!(
                sched
                    .timesteps()
                    .iter()
                    .all(|&t| (0.0..1000.0).contains(&t))
            );
        }
    }
}
