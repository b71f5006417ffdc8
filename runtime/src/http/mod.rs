//! The HTTP API (actix-web, JSON in and out). [`Engine::configure`] mounts it in any App.

mod bodies;
mod error;
mod handlers;
mod system;

use actix_web::web;

pub use bodies::{EditBody, GenerationBody, MAX_GUIDANCE, MAX_SIDE, MAX_STEPS};
pub use error::ApiError;
pub use system::not_found;

use crate::engine::Engine;

impl Engine {
    /// Mounts the routes (and this engine as their app data) in an actix-web app:
    /// `App::new().configure(|cfg| engine.configure(cfg))`.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        let json = web::JsonConfig::default()
            .limit(self.config().max_body_bytes)
            .error_handler(|err, _| error::json_error(err).into());
        let not_allowed = || web::to(system::method_not_allowed);
        cfg.app_data(web::Data::new(self.clone()))
            .service(
                web::resource("/healthz")
                    .get(system::healthz)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/metrics")
                    .get(system::metrics)
                    .default_service(not_allowed()),
            )
            .service(
                web::scope("/v1")
                    .app_data(json)
                    .service(
                        web::resource("/templates")
                            .post(handlers::create_template)
                            .get(handlers::list_templates)
                            .default_service(not_allowed()),
                    )
                    .service(
                        web::resource("/templates/{id}")
                            .get(handlers::get_template)
                            .delete(handlers::delete_template)
                            .default_service(not_allowed()),
                    )
                    .service(
                        web::resource("/templates/{id}/image")
                            .get(handlers::template_image)
                            .default_service(not_allowed()),
                    )
                    .service(
                        web::resource("/edits")
                            .post(handlers::create_edit)
                            .default_service(not_allowed()),
                    )
                    .service(
                        web::resource("/images/generations")
                            .post(handlers::create_generation)
                            .default_service(not_allowed()),
                    )
                    .service(
                        web::resource("/requests/{id}")
                            .get(system::request_progress)
                            .default_service(not_allowed()),
                    ),
            );
    }
}
