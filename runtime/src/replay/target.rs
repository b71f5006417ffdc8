//! What a replay drives: an engine in this process, or a server over HTTP. Both answer an
//! edit with its outcome; latency is measured by the caller around the call.

use std::time::Duration;

use base64::Engine as _;
use retouch_models::pipeline::{EditMode, EditRequest, JobOutput, Mask, RgbImage, TemplateSpec};
use serde_json::{Value, json};

use crate::engine::{Engine, EngineError, JobSpec};

/// How one edit ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done {
        /// Submission to admission into a batch, as the engine measured it.
        queue_ms: f64,
        /// The worker that ran it (known in-process only).
        worker: Option<usize>,
    },
    /// Refused because every queue was full (HTTP 503); not retried.
    Rejected,
    Failed(String),
}

#[derive(Clone)]
pub enum Target {
    Engine(Engine),
    Http { client: awc::Client, base: String },
}

impl Target {
    /// A server at `base` (e.g. `http://127.0.0.1:8080`); requests wait up to `timeout`.
    pub fn http(base: &str, timeout: Duration) -> Target {
        Target::Http {
            client: awc::Client::builder().timeout(timeout).finish(),
            base: base.trim_end_matches('/').to_string(),
        }
    }

    /// Registers a template; answers its id and size. A zero width or height asks for the
    /// model's native size.
    pub async fn register(&self, spec: &TemplateSpec) -> Result<(String, usize, usize), String> {
        match self {
            Target::Engine(engine) => {
                let mut spec = spec.clone();
                let native = engine.model().native_size;
                for side in [&mut spec.width, &mut spec.height] {
                    if *side == 0 {
                        *side = native;
                    }
                }
                let (_, result) = engine.run(JobSpec::Template(spec.clone())).await;
                let done = result.map_err(|e| format!("registering a template: {e}"))?;
                let JobOutput::Template(template) = done.output else {
                    return Err("registering a template produced something else".into());
                };
                let id = engine.templates().new_id();
                engine
                    .templates()
                    .persist(&id, &template)
                    .map_err(|e| format!("saving template {id}: {e}"))?;
                engine.templates().insert(id.clone(), template);
                Ok((id, spec.width, spec.height))
            }
            Target::Http { client, base } => {
                let mut body = json!({
                    "prompt": spec.prompt, "seed": spec.seed, "steps": spec.steps,
                    "guidance": spec.guidance,
                });
                if spec.width > 0 && spec.height > 0 {
                    (body["width"], body["height"]) = (json!(spec.width), json!(spec.height));
                }
                let (status, body) = post(client, &format!("{base}/v1/templates"), &body).await?;
                if status != 201 {
                    return Err(format!("registering a template: HTTP {status}: {body}"));
                }
                let field = |name: &str| {
                    body[name]
                        .as_u64()
                        .ok_or_else(|| format!("registering a template: no {name} in {body}"))
                };
                let id = body["id"]
                    .as_str()
                    .ok_or_else(|| format!("registering a template: no id in {body}"))?;
                Ok((
                    id.to_string(),
                    field("width")? as usize,
                    field("height")? as usize,
                ))
            }
        }
    }

    pub async fn edit(&self, template_id: &str, mask: Mask, req: EditRequest) -> Outcome {
        match self {
            Target::Engine(engine) => {
                let Some(template) = engine.templates().get(template_id) else {
                    return Outcome::Failed(format!("unknown template {template_id}"));
                };
                let cache = match req.mode {
                    EditMode::Cached => match engine.templates().lease(template_id) {
                        Ok(lease) => Some(lease),
                        Err(e) => return Outcome::Failed(e.to_string()),
                    },
                    EditMode::Dense => None,
                };
                let spec = JobSpec::Edit {
                    template,
                    template_id: template_id.to_string(),
                    cache,
                    mask,
                    req,
                };
                match engine.run(spec).await.1 {
                    Ok(done) => Outcome::Done {
                        queue_ms: done.queue_ms,
                        worker: Some(done.worker),
                    },
                    Err(EngineError::Overloaded { .. }) => Outcome::Rejected,
                    Err(e) => Outcome::Failed(e.to_string()),
                }
            }
            Target::Http { client, base } => {
                let png = match mask_png(&mask) {
                    Ok(png) => png,
                    Err(e) => return Outcome::Failed(e),
                };
                let mode = match req.mode {
                    EditMode::Dense => "dense",
                    EditMode::Cached => "cached",
                };
                let mut body = json!({
                    "template_id": template_id, "mask": png, "prompt": req.prompt,
                    "seed": req.seed, "mode": mode,
                });
                if let Some(g) = req.guidance {
                    body["guidance"] = json!(g);
                }
                match post(client, &format!("{base}/v1/edits"), &body).await {
                    Ok((200, body)) => Outcome::Done {
                        queue_ms: body["timings"]["queue_ms"].as_f64().unwrap_or(f64::NAN),
                        worker: None,
                    },
                    Ok((503, _)) => Outcome::Rejected,
                    Ok((status, body)) => Outcome::Failed(format!("HTTP {status}: {body}")),
                    Err(e) => Outcome::Failed(e),
                }
            }
        }
    }
}

/// POSTs JSON; answers the status and the body as JSON (Null if it is not JSON).
async fn post(client: &awc::Client, url: &str, body: &Value) -> Result<(u16, Value), String> {
    let mut res = client
        .post(url)
        .send_json(body)
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let bytes = res
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| format!("POST {url}: reading the response: {e}"))?;
    Ok((
        res.status().as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// The mask as the API takes it: a base64 PNG, white inside.
fn mask_png(mask: &Mask) -> Result<String, String> {
    let pixels = mask
        .values
        .iter()
        .flat_map(|&v| [if v > 0.0 { 255u8 } else { 0 }; 3])
        .collect();
    let png = RgbImage {
        width: mask.width,
        height: mask.height,
        pixels,
    }
    .encode_png()
    .map_err(|e| format!("encoding the mask: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}
