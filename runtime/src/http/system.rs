//! Health, metrics, progress and fallbacks.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde_json::json;

use super::error::ApiError;
use crate::engine::Engine;

pub async fn healthz(engine: web::Data<Engine>) -> HttpResponse {
    let workers: Vec<_> = engine
        .loads()
        .into_iter()
        .enumerate()
        .map(|(i, (queued, running))| json!({ "worker": i, "queued": queued, "running": running }))
        .collect();
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "workers": workers,
        "templates": engine.templates().len(),
    }))
}

pub async fn metrics(engine: web::Data<Engine>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(engine.render_metrics())
}

pub async fn request_progress(
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let progress = id
        .parse()
        .ok()
        .and_then(|n| engine.progress(n))
        .ok_or_else(|| ApiError::not_found(format!("unknown request `{id}`")))?;
    Ok(HttpResponse::Ok().json(progress))
}

/// The JSON 404 for unknown routes; an app mounting the API may use it as its default
/// service.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("no such route"))
}

pub async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    ))
}
