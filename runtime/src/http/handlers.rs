//! Template, edit and generation routes.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{ACCEPT, CONTENT_TYPE};
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use retouch_models::pipeline::{EditMode, JobOutput, RgbImage, Template};
use serde_json::json;

use super::bodies::{EditBody, GenerationBody};
use super::error::ApiError;
use crate::engine::{Completed, Engine, JobSpec, RequestId, telemetry};

type Result<T> = std::result::Result<T, ApiError>;

/// Counts a request refused before it reached the engine.
fn refused(kind: &'static str, e: ApiError) -> ApiError {
    let outcome = if e.status == StatusCode::NOT_FOUND {
        "not_found"
    } else {
        "invalid"
    };
    telemetry::count(kind, outcome);
    e
}

/// PNG encoding off the async threads.
async fn encode_png(image: RgbImage) -> Result<Vec<u8>> {
    web::block(move || image.encode_png())
        .await
        .map_err(|e| ApiError::internal(format!("encoding the image: {e}")))?
        .map_err(|e| ApiError::internal(format!("encoding the image: {e}")))
}

fn timings(done: &Completed, total_ms: f64) -> serde_json::Value {
    json!({ "queue_ms": done.queue_ms, "compute_ms": done.compute_ms, "total_ms": total_ms })
}

fn wants_png(req: &HttpRequest) -> bool {
    req.headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("image/png"))
}

fn png_response(id: RequestId, png: Vec<u8>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "image/png"))
        .insert_header(("X-Request-Id", id.to_string()))
        .body(png)
}

fn unexpected(what: &str) -> ApiError {
    ApiError::internal(format!("the worker returned something other than {what}"))
}

fn template_json(engine: &Engine, id: &str, t: &Template) -> serde_json::Value {
    json!({
        "id": id,
        "width": t.spec.width,
        "height": t.spec.height,
        "steps": t.spec.steps,
        "cache_bytes": engine.templates().cache_bytes(id),
        "spec": t.spec,
    })
}

pub async fn create_template(
    engine: web::Data<Engine>,
    body: web::Json<GenerationBody>,
) -> Result<HttpResponse> {
    let spec = body
        .to_template_spec(engine.model().native_size)
        .map_err(|e| refused("template", e))?;
    let (request_id, result) = engine.run(JobSpec::Template(spec)).await;
    let done = result?;
    let JobOutput::Template(template) = done.output else {
        return Err(unexpected("a template"));
    };
    let id = engine.templates().new_id();
    let (store_engine, store_id) = (engine.clone(), id.clone());
    let template = web::block(move || {
        store_engine
            .templates()
            .persist(&store_id, &template)
            .map(|()| template)
    })
    .await
    .map_err(|e| ApiError::internal(format!("saving the template: {e}")))?
    .map_err(|e| ApiError::internal(format!("saving the template: {e}")))?;
    let template = engine.templates().insert(id.clone(), template);
    let mut out = template_json(&engine, &id, &template);
    out["request_id"] = json!(request_id);
    Ok(HttpResponse::Created().json(out))
}

pub async fn list_templates(engine: web::Data<Engine>) -> HttpResponse {
    let all: Vec<_> = engine
        .templates()
        .list()
        .iter()
        .map(|(id, t)| template_json(&engine, id, t))
        .collect();
    HttpResponse::Ok().json(json!({ "templates": all }))
}

fn find(engine: &Engine, id: &str) -> Result<Arc<Template>> {
    engine
        .templates()
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("unknown template `{id}`")))
}

pub async fn get_template(
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let template = find(&engine, &id)?;
    Ok(HttpResponse::Ok().json(template_json(&engine, &id, &template)))
}

pub async fn template_image(
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let template = find(&engine, &id)?;
    let png = encode_png(template.image.clone()).await?;
    Ok(HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "image/png"))
        .body(png))
}

pub async fn delete_template(
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = id.into_inner();
    let (store, remove_id) = (engine.clone(), id.clone());
    let removed = web::block(move || store.templates().remove(&remove_id))
        .await
        .map_err(|e| ApiError::internal(format!("deleting the template: {e}")))?;
    match removed {
        Ok(true) => Ok(HttpResponse::NoContent().finish()),
        Ok(false) => Err(ApiError::not_found(format!("unknown template `{id}`"))),
        Err(e) => Err(ApiError::internal(format!("deleting the template: {e}"))),
    }
}

pub async fn create_edit(
    engine: web::Data<Engine>,
    req: HttpRequest,
    body: web::Json<EditBody>,
) -> Result<HttpResponse> {
    let started = std::time::Instant::now();
    let template = find(&engine, &body.template_id).map_err(|e| refused("edit", e))?;
    let edit = body.to_request().map_err(|e| refused("edit", e))?;
    let mask = body.mask_for(&template).map_err(|e| refused("edit", e))?;
    let cache = match edit.mode {
        EditMode::Cached => Some(
            engine
                .templates()
                .lease(&body.template_id)
                .map_err(|e| refused("edit", e.into()))?,
        ),
        EditMode::Dense => None,
    };
    let (request_id, result) = engine
        .run(JobSpec::Edit {
            template,
            cache,
            template_id: body.template_id.clone(),
            mask,
            req: edit,
        })
        .await;
    let done = result?;
    let JobOutput::Edited(edited) = &done.output else {
        return Err(unexpected("an edit"));
    };
    let mask_ratio = edited.mask_ratio;
    let png = encode_png(edited.image.clone()).await?;
    if wants_png(&req) {
        return Ok(png_response(request_id, png));
    }
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(HttpResponse::Ok().json(json!({
        "id": request_id,
        "image": base64::engine::general_purpose::STANDARD.encode(&png),
        "mask_ratio": mask_ratio,
        "timings": timings(&done, total_ms),
    })))
}

pub async fn create_generation(
    engine: web::Data<Engine>,
    req: HttpRequest,
    body: web::Json<GenerationBody>,
) -> Result<HttpResponse> {
    let started = std::time::Instant::now();
    let gen_req = body
        .to_request(engine.model().native_size)
        .map_err(|e| refused("generation", e))?;
    let (request_id, result) = engine.run(JobSpec::Generate(gen_req)).await;
    let done = result?;
    let JobOutput::Generated(generated) = &done.output else {
        return Err(unexpected("an image"));
    };
    let png = encode_png(generated.image.clone()).await?;
    if wants_png(&req) {
        return Ok(png_response(request_id, png));
    }
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(HttpResponse::Ok().json(json!({
        "id": request_id,
        "image": base64::engine::general_purpose::STANDARD.encode(&png),
        "timings": timings(&done, total_ms),
    })))
}
