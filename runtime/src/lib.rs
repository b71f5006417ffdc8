//! `retouch_runtime`: Retouch's serving engine (actix actors) and its HTTP API, as a library
//! an actix-web app embeds:
//!
//! ```no_run
//! use actix_web::{App, HttpServer};
//! use retouch_runtime::{Engine, EngineConfig};
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let engine = Engine::start(EngineConfig::new("models/tiny")).map_err(std::io::Error::other)?;
//!     let app_engine = engine.clone();
//!     HttpServer::new(move || App::new().configure(|cfg| app_engine.configure(cfg)))
//!         .bind(("127.0.0.1", 8080))?
//!         .run()
//!         .await?;
//!     engine.shutdown();
//!     Ok(())
//! }
//! ```

pub mod engine;
pub mod http;
pub mod masks;
pub mod replay;

pub use engine::{BatchPolicy, Engine, EngineConfig, EngineError, Routing};
