//! An actix-web app that mounts Retouch's routes beside its own.
//!
//! `cargo run -p retouch-runtime --example embed -- MODEL_DIR [PORT]`

use actix_web::{App, HttpResponse, HttpServer, web};
use retouch_runtime::{Engine, EngineConfig};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "models/tiny".into());
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let engine = Engine::start(EngineConfig::new(model)).map_err(std::io::Error::other)?;
    let app_engine = engine.clone();
    HttpServer::new(move || {
        App::new()
            // The app's own route, next to Retouch's.
            .route(
                "/",
                web::get().to(|| async { HttpResponse::Ok().body("my app") }),
            )
            .configure(|cfg| app_engine.configure(cfg))
    })
    .bind(("127.0.0.1", port))?
    .run()
    .await?;
    engine.shutdown();
    Ok(())
}
