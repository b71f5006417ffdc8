//! What one denoising step of a request costs before its job exists: latent tokens through
//! the UNet (active positions, or all of them when dense, times the guidance branches). A
//! serving runtime limits its batches by this; it equals [`DenoiseJob::step_tokens`] of the
//! job the request becomes.
//!
//! [`DenoiseJob::step_tokens`]: super::DenoiseJob::step_tokens

use retouch_kernels::TokenSet;

use super::{
    EditMode, EditRequest, GenerateRequest, Mask, Pipeline, Template, TemplateSpec, cfg_branches,
};
use crate::unet::token_levels;
use crate::{Error, Result};

impl Pipeline {
    /// Tokens per step of a text-to-image request.
    pub fn generate_step_tokens(&self, req: &GenerateRequest) -> Result<usize> {
        let [_, h, w, _] = self.latent_shape(req.width, req.height)?;
        Ok(h * w * cfg_branches(req.guidance))
    }

    /// Tokens per step of a template registration.
    pub fn template_step_tokens(&self, spec: &TemplateSpec) -> Result<usize> {
        let [_, h, w, _] = self.latent_shape(spec.width, spec.height)?;
        Ok(h * w * cfg_branches(spec.guidance))
    }

    /// Tokens per step of an edit: in cached mode the mask's latent positions dilated by the
    /// halo. Fails where building the edit's job would (mask and template disagree).
    pub fn edit_step_tokens(
        &self,
        template: &Template,
        mask: &Mask,
        req: &EditRequest,
    ) -> Result<usize> {
        // The cache may live outside the template (a runtime's tiers): not needed to count.
        check_edit(self, template, mask, req, false)?;
        let spec = &template.spec;
        let shape = self.latent_shape(spec.width, spec.height)?;
        let branches = cfg_branches(req.guidance.unwrap_or(spec.guidance));
        let positions = match req.mode {
            EditMode::Dense => shape[1] * shape[2],
            EditMode::Cached => {
                let latent = mask.to_latent(self.vae.factor());
                edit_levels(self, &latent, shape, req.halo)?[0].len()
            }
        };
        Ok(positions * branches)
    }
}

/// The checks an edit passes before its job is built: the mask matches the template and
/// is not empty, and cached mode has a cache to read.
pub(super) fn check_edit(
    pipe: &Pipeline,
    template: &Template,
    mask: &Mask,
    req: &EditRequest,
    own_cache: bool,
) -> Result<()> {
    let spec = &template.spec;
    if (mask.width, mask.height) != (spec.width, spec.height)
        || mask.values.len() != mask.width * mask.height
    {
        return Err(Error::Invalid(format!(
            "mask is {}x{}, the template is {}x{}",
            mask.width, mask.height, spec.width, spec.height
        )));
    }
    // The latent mask is built from pixels, so the size must be a latent grid.
    pipe.latent_shape(spec.width, spec.height)?;
    if mask.values.iter().all(|&v| v == 0.0) {
        return Err(Error::Invalid("the mask is empty: nothing to edit".into()));
    }
    if own_cache && req.mode == EditMode::Cached && template.cache.len() != spec.steps {
        return Err(Error::Invalid(
            "cached-mode edits need the template's activation cache; this template was \
             registered without one (use dense mode, or register it again with a cache)"
                .into(),
        ));
    }
    Ok(())
}

/// A cached-mode edit's token sets per UNet resolution (the latent mask dilated by `halo`).
pub(super) fn edit_levels(
    pipe: &Pipeline,
    latent_mask: &[f32],
    shape: [usize; 4],
    halo: usize,
) -> Result<Vec<TokenSet>> {
    let active: Vec<bool> = latent_mask.iter().map(|&m| m > 0.0).collect();
    let blocks = pipe.unet.config().block_out_channels.len();
    token_levels(&active, shape[1], shape[2], blocks, halo)
}
