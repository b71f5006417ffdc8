//! The HTTP API end to end: a server on a loopback port over a random tiny pipeline.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use base64::Engine as _;
use retouch_kernels::DType;
use retouch_models::pipeline::{
    DEFAULT_EDIT_STRENGTH, EditMode, EditRequest, Mask, Pipeline, RgbImage, Template,
};
use retouch_models::random_pipeline::{Preset, RandomPipeline};
use retouch_runtime::engine::State;
use retouch_runtime::http::not_found;
use retouch_runtime::replay::{self, ReplayConfig, Target, TraceConfig};
use retouch_runtime::{BatchPolicy, Engine, EngineConfig};
use serde_json::{Value, json};

const SIZE: usize = 64;

/// The tiny random pipeline, written once per test process.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("retouch-http-model-{}", std::process::id()));
        RandomPipeline::new(Preset::Tiny)
            .write(&dir, true, None)
            .expect("tiny pipeline");
        dir
    })
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retouch-http-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

struct Server {
    base: String,
    engine: Engine,
    client: awc::Client,
}

impl Server {
    async fn start(configure: impl FnOnce(&mut EngineConfig)) -> Server {
        let mut config = EngineConfig::new(model_dir());
        configure(&mut config);
        let engine = Engine::start(config).expect("engine starts");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app_engine = engine.clone();
        let server = HttpServer::new(move || {
            App::new()
                .configure(|cfg| app_engine.configure(cfg))
                .default_service(web::to(not_found))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        actix_rt::spawn(server);
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(300))
            .finish();
        Server {
            base,
            engine,
            client,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; answers the status, the headers' Retry-After, and the body as JSON.
    async fn post(&self, path: &str, body: &Value) -> (u16, Option<String>, Value) {
        let mut res = self
            .client
            .post(self.url(path))
            .send_json(body)
            .await
            .unwrap();
        let retry = res
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = res.body().limit(64 << 20).await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (res.status().as_u16(), retry, json)
    }

    async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let mut res = self.client.get(self.url(path)).send().await.unwrap();
        let bytes = res.body().limit(64 << 20).await.unwrap();
        (res.status().as_u16(), bytes.to_vec())
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, bytes) = self.get(path).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn template(&self, prompt: &str, seed: u64, steps: usize) -> String {
        let (status, _, body) = self
            .post(
                "/v1/templates",
                &json!({ "prompt": prompt, "seed": seed, "steps": steps, "guidance": 4.0 }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.engine.shutdown();
    }
}

/// A PNG mask, white inside the rectangle `x0..x1, y0..y1`.
fn mask_png(width: usize, height: usize, rect: (usize, usize, usize, usize)) -> String {
    let (x0, y0, x1, y1) = rect;
    let mut pixels = vec![0u8; width * height * 3];
    for y in y0..y1 {
        for x in x0..x1 {
            pixels[(y * width + x) * 3..][..3].fill(255);
        }
    }
    let png = RgbImage {
        width,
        height,
        pixels,
    }
    .encode_png()
    .unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn decode_image(b64: &Value) -> RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().expect("image is a string"))
        .unwrap();
    RgbImage::decode_png(&bytes).unwrap()
}

/// The same edit run in-process on the template the server saved.
fn local_edit(
    cache_dir: &Path,
    id: &str,
    mask: &str,
    prompt: &str,
    seed: u64,
    mode: EditMode,
    strength: f32,
) -> RgbImage {
    let pipe = Pipeline::load(model_dir(), None).unwrap();
    let template = Template::load(cache_dir.join(id)).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(mask)
        .unwrap();
    let mask = Mask::from_png(&bytes).unwrap();
    let mut req = EditRequest::new(prompt);
    req.seed = seed;
    req.mode = mode;
    req.strength = strength;
    pipe.edit(&template, &mask, &req, &mut |_, _| {})
        .unwrap()
        .image
}

#[actix_rt::test]
async fn template_edit_png_round_trip() {
    let cache = temp_dir("round-trip");
    let server = Server::start(|c| c.cache_dir = Some(cache.clone())).await;
    // 5 steps: an edit of the default strength 0.6 runs the last 3.
    let id = server.template("a red circle", 1, 5).await;

    let (status, info) = server.get_json(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        (info["width"].as_u64(), info["steps"].as_u64()),
        (Some(64), Some(5))
    );
    assert!(info["cache_bytes"].as_u64().unwrap() > 0);
    let (status, png) = server.get(&format!("/v1/templates/{id}/image")).await;
    assert_eq!(status, 200);
    assert_eq!(RgbImage::decode_png(&png).unwrap().width, SIZE);
    let (_, list) = server.get_json("/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);

    let mask = mask_png(SIZE, SIZE, (8, 8, 40, 40));
    let edit = json!({ "template_id": id, "mask": mask, "prompt": "a blue hat", "seed": 7 });
    let (status, _, body) = server.post("/v1/edits", &edit).await;
    assert_eq!(status, 200, "{body}");
    let cached = decode_image(&body["image"]);
    assert_eq!((cached.width, cached.height), (SIZE, SIZE));
    assert!((body["mask_ratio"].as_f64().unwrap() - 0.25).abs() < 1e-9);
    for key in ["queue_ms", "compute_ms", "total_ms"] {
        assert!(body["timings"][key].as_f64().unwrap() >= 0.0);
    }
    // Served edits are the pipeline's own: bit for bit.
    let want = local_edit(
        &cache,
        &id,
        mask.as_str(),
        "a blue hat",
        7,
        EditMode::Cached,
        DEFAULT_EDIT_STRENGTH,
    );
    assert_eq!(cached, want);

    let request = body["id"].as_u64().unwrap();
    let (status, progress) = server.get_json(&format!("/v1/requests/{request}")).await;
    assert_eq!(status, 200);
    assert_eq!(progress["state"], "done");
    assert_eq!(
        (
            progress["steps_done"].as_u64(),
            progress["steps_total"].as_u64()
        ),
        (Some(3), Some(3))
    );

    // Dense mode, answered as a PNG.
    let dense = json!({ "template_id": id, "mask": mask, "prompt": "a blue hat", "seed": 7, "mode": "dense" });
    let mut res = server
        .client
        .post(server.url("/v1/edits"))
        .insert_header(("accept", "image/png"))
        .send_json(&dense)
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.headers().get("content-type").unwrap(), "image/png");
    let png = res.body().await.unwrap();
    let dense_image = RgbImage::decode_png(&png).unwrap();
    let want = local_edit(
        &cache,
        &id,
        mask.as_str(),
        "a blue hat",
        7,
        EditMode::Dense,
        DEFAULT_EDIT_STRENGTH,
    );
    assert_eq!(dense_image, want);

    let (status, _) = server.get_json("/v1/images/generations").await;
    assert_eq!(status, 405);
    let (status, _, body) = server
        .post(
            "/v1/images/generations",
            &json!({ "prompt": "a boat", "steps": 2 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(decode_image(&body["image"]).width, SIZE);

    let res = server
        .client
        .delete(server.url(&format!("/v1/templates/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);
    assert!(!cache.join(&id).exists());
    let (status, body) = server.get_json(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let res = server
        .client
        .delete(server.url(&format!("/v1/templates/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 404);
}

#[actix_rt::test]
async fn an_abandoned_request_leaves_the_batch() {
    let mut config = EngineConfig::new(model_dir());
    config.max_batch_requests = 1;
    let engine = Engine::start(config).unwrap();
    let mut req = retouch_models::pipeline::GenerateRequest::new("long");
    (req.steps, req.guidance, req.width, req.height) = (500, 1.0, SIZE, SIZE);
    let task = {
        let engine = engine.clone();
        actix_rt::spawn(async move {
            engine
                .run(retouch_runtime::engine::JobSpec::Generate(req))
                .await
        })
    };
    // Ids count from 1 per engine.
    let state = |engine: &Engine| engine.progress(1).map(|p| (p.state, p.steps_done));
    for _ in 0..1000 {
        if matches!(state(&engine), Some((State::Running, n)) if n > 0) {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    for _ in 0..1000 {
        if let Some((State::Cancelled, done)) = state(&engine) {
            assert!(done < 500);
            assert_eq!(engine.loads(), vec![(0, 0)]);
            engine.shutdown();
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the request was not cancelled: {:?}", state(&engine));
}

#[actix_rt::test]
async fn concurrent_edits_over_several_templates_are_distinct_and_correct() {
    let cache = temp_dir("concurrent");
    let server = Server::start(|c| {
        c.cache_dir = Some(cache.clone());
        c.max_batch_requests = 8;
    })
    .await;
    let mut templates = Vec::new();
    for t in 0..4 {
        templates.push(server.template(&format!("template {t}"), t, 2).await);
    }
    let mask = mask_png(SIZE, SIZE, (16, 16, 48, 48));
    let server = std::rc::Rc::new(server);
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let body = json!({
            "template_id": templates[i as usize % 4],
            "mask": mask,
            "prompt": format!("edit number {i}"),
            "seed": i,
        });
        let server = server.clone();
        tasks.push(actix_rt::spawn(async move {
            server.post("/v1/edits", &body).await
        }));
    }
    let mut images = Vec::new();
    for task in tasks {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        images.push(decode_image(&body["image"]));
    }
    let distinct: HashSet<_> = images.iter().map(|i| i.pixels.clone()).collect();
    assert_eq!(distinct.len(), 32, "every edit differs");
    for i in [0u64, 13, 31] {
        let want = local_edit(
            &cache,
            &templates[i as usize % 4],
            &mask,
            &format!("edit number {i}"),
            i,
            EditMode::Cached,
            DEFAULT_EDIT_STRENGTH,
        );
        // Concurrent edits step in fused UNet calls whose products sum over more rows (in
        // another order) than an edit alone: latents agree to ~1e-6 relative, which can
        // move a pixel across a rounding boundary (one level). A mix-up of requests
        // (rows, text, timestep, cache) changes pixels by far more.
        let got = &images[i as usize];
        assert_eq!((got.width, got.height), (want.width, want.height));
        let off = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(
            off <= Some(1),
            "edit {i} differs from the pipeline's by {off:?}"
        );
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, needle: &str) {
    assert_eq!(status, want_status, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(
        message.contains(needle),
        "`{message}` should mention `{needle}`"
    );
}

#[actix_rt::test]
async fn bad_input_gets_a_4xx_that_names_the_problem() {
    let server = Server::start(|c| c.max_body_bytes = 64 << 10).await;
    let id = server.template("base", 0, 1).await;
    let good_mask = mask_png(SIZE, SIZE, (0, 0, 16, 16));
    let edit = |mask: &str| json!({ "template_id": id, "mask": mask, "prompt": "x" });

    let mut res = server
        .client
        .post(server.url("/v1/edits"))
        .insert_header(("content-type", "application/json"))
        .send_body("{not json")
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&res.body().await.unwrap()).unwrap();
    assert_error(res.status().as_u16(), &body, 400, "malformed JSON");

    let (s, _, b) = server
        .post(
            "/v1/edits",
            &json!({ "template_id": "t999", "mask": good_mask, "prompt": "x" }),
        )
        .await;
    assert_error(s, &b, 404, "t999");
    let not_png = base64::engine::general_purpose::STANDARD.encode(b"hello, not a png");
    let (s, _, b) = server.post("/v1/edits", &edit(&not_png)).await;
    assert_error(s, &b, 400, "PNG");
    let (s, _, b) = server.post("/v1/edits", &edit("***")).await;
    assert_error(s, &b, 400, "base64");
    let (s, _, b) = server
        .post("/v1/edits", &edit(&mask_png(32, 32, (0, 0, 8, 8))))
        .await;
    assert_error(s, &b, 400, "mask is 32x32");
    let (s, _, b) = server
        .post("/v1/edits", &edit(&mask_png(SIZE, SIZE, (0, 0, 0, 0))))
        .await;
    assert_error(s, &b, 400, "empty");
    let mut bad_mode = edit(&good_mask);
    bad_mode["mode"] = json!("sparse");
    let (s, _, b) = server.post("/v1/edits", &bad_mode).await;
    assert_error(s, &b, 400, "sparse");
    for (strength, needle) in [
        (json!(0.0), "strength"),
        (json!(1.5), "strength"),
        (json!("half"), "half"),
    ] {
        let mut bad_strength = edit(&good_mask);
        bad_strength["strength"] = strength;
        let (s, _, b) = server.post("/v1/edits", &bad_strength).await;
        assert_error(s, &b, 400, needle);
    }

    for (field, value, needle) in [
        ("steps", json!(0), "steps"),
        ("steps", json!(1001), "steps"),
        ("width", json!(60), "width"),
        ("height", json!(2048), "height"),
        ("guidance", json!(101.0), "guidance"),
        ("guidance", json!(-1.0), "guidance"),
        ("scheduler", json!("plms"), "plms"),
        ("colour", json!("red"), "colour"),
        ("steps", json!("many"), "many"),
    ] {
        for path in ["/v1/templates", "/v1/images/generations"] {
            let mut body = json!({ "prompt": "x", "steps": 1 });
            body[field] = value.clone();
            let (s, _, b) = server.post(path, &body).await;
            assert_error(s, &b, 400, needle);
        }
    }
    let (s, _, b) = server
        .post("/v1/images/generations", &json!({ "steps": 1 }))
        .await;
    assert_error(s, &b, 400, "prompt");

    let huge = "A".repeat(100 << 10);
    let (s, _, b) = server.post("/v1/edits", &edit(&huge)).await;
    assert_error(s, &b, 413, "limit");

    let (s, b) = server.get_json("/v1/nowhere").await;
    assert_error(s, &b, 404, "route");
    let (s, b) = server.get_json("/v1/requests/12345678").await;
    assert_error(s, &b, 404, "12345678");
}

#[actix_rt::test]
async fn a_full_queue_gets_503_with_retry_after() {
    let server = Server::start(|c| {
        c.max_queue = 1;
        c.max_batch_requests = 1;
    })
    .await;
    let server = std::rc::Rc::new(server);
    // 500 steps: tens of seconds on the tiny model, far longer than the checks below.
    let long = json!({ "prompt": "long", "steps": 500, "guidance": 1.0 });
    let running = {
        let server = server.clone();
        actix_rt::spawn(async move { server.post("/v1/images/generations", &long).await })
    };
    wait_for(&server, |w| w["running"] == 1).await;
    let short = json!({ "prompt": "short", "steps": 1 });
    let queued = {
        let (server, short) = (server.clone(), short.clone());
        actix_rt::spawn(async move { server.post("/v1/images/generations", &short).await })
    };
    wait_for(&server, |w| w["queued"] == 1).await;
    let (s, retry, b) = server.post("/v1/images/generations", &short).await;
    assert_error(s, &b, 503, "full");
    assert_eq!(b["error"]["code"], "overloaded");
    assert_eq!(retry.as_deref(), Some("1"));
    running.abort();
    queued.abort();
}

/// Polls /healthz until worker 0 satisfies `ready`.
async fn wait_for(server: &Server, ready: impl Fn(&Value) -> bool) {
    for _ in 0..600 {
        let (_, health) = server.get_json("/healthz").await;
        if ready(&health["workers"][0]) {
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the worker never reached the expected state");
}

fn counter(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[actix_rt::test]
async fn metrics_move_and_static_batching_serves() {
    let server = Server::start(|c| {
        c.policy = BatchPolicy::Static;
        c.max_batch_requests = 2;
    })
    .await;
    let ok = "retouch_requests_total{kind=\"generation\",outcome=\"ok\"}";
    let invalid = "retouch_requests_total{kind=\"generation\",outcome=\"invalid\"}";
    let (_, before) = server.get("/metrics").await;
    let before = String::from_utf8(before).unwrap();
    let server = std::rc::Rc::new(server);
    let mut tasks = Vec::new();
    for seed in 0..3 {
        let server = server.clone();
        let body = json!({ "prompt": "p", "steps": 2, "seed": seed });
        tasks.push(actix_rt::spawn(async move {
            server.post("/v1/images/generations", &body).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().0, 200);
    }
    let (s, _, _) = server
        .post(
            "/v1/images/generations",
            &json!({ "prompt": "p", "steps": 0 }),
        )
        .await;
    assert_eq!(s, 400);
    let (status, after) = server.get("/metrics").await;
    assert_eq!(status, 200);
    let after = String::from_utf8(after).unwrap();
    assert!(counter(&after, ok) >= counter(&before, ok) + 3.0, "{after}");
    assert!(
        counter(&after, invalid) >= counter(&before, invalid) + 1.0,
        "{after}"
    );
    for name in [
        "retouch_step_seconds",
        "retouch_queue_depth",
        "retouch_batch_requests",
    ] {
        assert!(after.contains(name), "{name} missing from {after}");
    }
    let (_, health) = server.get_json("/healthz").await;
    assert_eq!(health["status"], "ok");
}

/// Bytes of one step's activation cache for the server's templates (64x64, guided).
fn step_cache_bytes() -> u64 {
    let pipe = Pipeline::load(model_dir(), None).unwrap();
    let spec = retouch_models::pipeline::TemplateSpec {
        prompt: "measure".into(),
        negative_prompt: String::new(),
        seed: 0,
        steps: 1,
        guidance: 4.0,
        scheduler: "ddim".into(),
        width: SIZE,
        height: SIZE,
    };
    let template = pipe
        .register_template(&spec, Some(DType::F16), &mut |_, _| {})
        .unwrap();
    template.cache_bytes() as u64
}

#[actix_rt::test]
async fn small_cache_budgets_evict_to_disk_and_edits_stay_exact() {
    let step = step_cache_bytes();
    let cache = temp_dir("tiers");
    // Host: one step. A worker's tier: one whole template (4 steps), not two.
    let server = Server::start(|c| {
        c.cache_dir = Some(cache.clone());
        c.cache_host_bytes = step * 3 / 2;
        c.cache_device_bytes = step * 9 / 2;
        c.prefetch_steps = 2;
    })
    .await;
    let metric = |text: &str, name: &str| counter(text, name);
    let (hits, misses) = (
        "retouch_cache_hits_total{tier=\"device\"}",
        "retouch_cache_misses_total",
    );
    let host_evictions = "retouch_cache_evictions_total{tier=\"host\"}";
    let device_evictions = "retouch_cache_evictions_total{tier=\"device\"}";
    let (_, before) = server.get("/metrics").await;
    let before = String::from_utf8(before).unwrap();

    let a = server.template("template a", 1, 4).await;
    let b = server.template("template b", 2, 4).await;
    let (_, info) = server.get_json(&format!("/v1/templates/{a}")).await;
    assert_eq!(info["cache_bytes"].as_u64(), Some(4 * step));
    let mask = mask_png(SIZE, SIZE, (8, 16, 40, 48));
    // A twice (the second time from the worker's tier), then B (evicting A there), twice.
    for (i, id) in [&a, &a, &b, &b].into_iter().enumerate() {
        let prompt = format!("tiered edit {i}");
        // Strength 1: every step of the template's cache is read.
        let body = json!({
            "template_id": id, "mask": mask, "prompt": prompt, "seed": i, "strength": 1.0
        });
        let (status, _, body) = server.post("/v1/edits", &body).await;
        assert_eq!(status, 200, "{body}");
        let want = local_edit(&cache, id, &mask, &prompt, i as u64, EditMode::Cached, 1.0);
        assert_eq!(
            decode_image(&body["image"]),
            want,
            "edit {i} is the pipeline's"
        );
    }
    let engine_cache = server.engine.cache();
    let host = engine_cache.tier_bytes(retouch_runtime::engine::Tier::Host);
    assert!(host <= step * 3 / 2, "host tier {host} over its budget");
    assert_eq!(
        engine_cache.bytes_missing(&b, 0..4, 0),
        0,
        "B is in worker 0's tier"
    );
    assert_eq!(
        engine_cache.bytes_missing(&a, 0..4, 0),
        4 * step,
        "A was evicted from it"
    );

    // A corrupt step file fails the edit that needs it, and only that one.
    let c = server.template("template c", 3, 4).await;
    let corrupt = Template::step_cache_path(cache.join(&c), 2);
    std::fs::write(&corrupt, b"not safetensors").unwrap();
    let server = std::rc::Rc::new(server);
    let edit = |id: &str| json!({ "template_id": id, "mask": mask, "prompt": "x", "seed": 5, "strength": 1.0 });
    let (broken, fine) = {
        let (s1, s2, e1, e2) = (server.clone(), server.clone(), edit(&c), edit(&b));
        (
            actix_rt::spawn(async move { s1.post("/v1/edits", &e1).await }),
            actix_rt::spawn(async move { s2.post("/v1/edits", &e2).await }),
        )
    };
    let (status, _, body) = broken.await.unwrap();
    assert_error(status, &body, 500, "step 2");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("step_0002.safetensors"), "{message}");
    assert_eq!(fine.await.unwrap().0, 200);

    let (_, after) = server.get("/metrics").await;
    let after = String::from_utf8(after).unwrap();
    let moved = |name: &str| metric(&after, name) - metric(&before, name);
    assert!(
        moved(hits) >= 4.0,
        "the second edit of A hits every step\n{after}"
    );
    assert!(
        moved(misses) >= 1.0,
        "the corrupt step was missing\n{after}"
    );
    assert!(
        moved(host_evictions) >= 9.0,
        "3 per template registered\n{after}"
    );
    assert!(moved(device_evictions) >= 4.0, "B pushed A out\n{after}");
    for name in [
        "retouch_cache_bytes{tier=\"host\"}",
        "retouch_cache_bytes{tier=\"disk\"}",
        "retouch_cache_load_seconds",
    ] {
        assert!(after.contains(name), "{name} missing from {after}");
    }
}

fn replay_config(rate: f64, requests: usize) -> ReplayConfig {
    let mut trace = TraceConfig::new(rate, requests);
    trace.templates = 2;
    ReplayConfig {
        trace,
        steps: 2,
        guidance: 4.0,
        mode: EditMode::Dense,
        size: None,
    }
}

#[actix_rt::test]
async fn replay_drives_the_server_over_http() {
    let server = Server::start(|c| c.max_batch_requests = 4).await;
    let target = Target::http(&server.base, Duration::from_secs(300));
    let report = replay::run(&target, &replay_config(40.0, 5), "http", || {})
        .await
        .unwrap();
    assert_eq!(
        (report.completed, report.rejected, report.failed),
        (5, 0, 0),
        "{:?}",
        report.errors
    );
    let latency = report.latency_ms.unwrap();
    assert!(latency.mean > 0.0 && latency.p50 <= latency.p95);
    assert!(report.queue_ms.unwrap().mean >= 0.0);
    assert!(
        report.per_worker.is_empty(),
        "workers are not visible over HTTP"
    );
    let (_, list) = server.get_json("/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 2);
}

#[actix_rt::test]
async fn replay_counts_a_full_servers_503s_as_rejected() {
    let server = Server::start(|c| {
        c.max_queue = 1;
        c.max_batch_requests = 1;
    })
    .await;
    let target = Target::http(&server.base, Duration::from_secs(300));
    let report = replay::run(&target, &replay_config(10_000.0, 10), "full", || {})
        .await
        .unwrap();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(report.completed + report.rejected, 10);
    assert!(report.rejected >= 1 && report.completed >= 1, "{report:?}");
}

/// Keeps DType in use for the cache setting the tests rely on (f16 by default).
#[test]
fn templates_cache_in_f16_by_default() {
    assert_eq!(EngineConfig::new("x").cache_dtype, DType::F16);
}
