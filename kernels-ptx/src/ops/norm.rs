use crate::cpu::norm::{self, GroupStats};
use crate::error::{invalid, shape_err};
use crate::{DType, Result, Tensor};

fn check_affine(op: &'static str, channels: usize, gamma: &Tensor, beta: &Tensor) -> Result<()> {
    if gamma.shape() != [channels] || beta.shape() != [channels] {
        return shape_err(
            op,
            format!(
                "weight {:?} and bias {:?} must both be [{channels}]",
                gamma.shape(),
                beta.shape()
            ),
        );
    }
    Ok(())
}

/// One statistic per (sample, group).
fn check_stats(op: &'static str, stats: &[GroupStats], batch: usize, groups: usize) -> Result<()> {
    if stats.len() != batch * groups {
        return invalid(
            op,
            format!(
                "{} statistics given for {batch} samples of {groups} groups",
                stats.len()
            ),
        );
    }
    Ok(())
}

/// One segment of [`Tensor::blended_group_stats_ragged`]: its template's statistics
/// (`groups`), its template's per-position moments `[positions, groups * 2]` and the active
/// positions its fresh rows hold.
#[derive(Clone, Copy)]
pub struct BlendedSegment<'a> {
    pub template: &'a [GroupStats],
    pub moments: &'a Tensor,
    pub active: &'a [u32],
}

impl BlendedSegment<'_> {
    /// The statistics of this segment's blended map, its fresh rows `fresh = [active,
    /// channels]`.
    fn stats(
        &self,
        op: &'static str,
        fresh: &[f32],
        channels: usize,
        eps: f32,
    ) -> Result<Vec<GroupStats>> {
        let groups = self.template.len();
        Tensor::check_groups(op, channels, groups)?;
        let moments_shape = self.moments.shape();
        if moments_shape.len() != 2 || moments_shape[1] != groups * 2 {
            return shape_err(
                op,
                format!(
                    "moments {moments_shape:?} must be [positions, {}]",
                    groups * 2
                ),
            );
        }
        if let Some(&p) = self
            .active
            .iter()
            .find(|&&p| p as usize >= moments_shape[0])
        {
            return invalid(
                op,
                format!(
                    "active position {p} outside a map of {} positions",
                    moments_shape[0]
                ),
            );
        }
        let (template, active) = (self.template, self.active);
        Ok(match self.moments.dtype() {
            DType::F32 => {
                let m = self.moments.as_slice::<f32>()?;
                norm::blended_group_stats(fresh, channels, template, m, active, eps)
            }
            DType::F16 => {
                let m = self.moments.as_slice::<half::f16>()?;
                norm::blended_group_stats(fresh, channels, template, m, active, eps)
            }
            DType::BF16 => {
                let m = self.moments.as_slice::<half::bf16>()?;
                norm::blended_group_stats(fresh, channels, template, m, active, eps)
            }
            other => return invalid(op, format!("moments of {other:?}")),
        })
    }
}

impl Tensor {
    /// (batch, channels) of a channels-last tensor `[batch, ..., channels]` of rank >= 2.
    fn batch_and_channels(&self, op: &'static str) -> Result<(usize, usize)> {
        if self.rank() < 2 {
            return shape_err(
                op,
                format!("expected [batch, ..., channels], got {:?}", self.shape()),
            );
        }
        Ok((self.shape()[0], self.dim(-1)?))
    }

    fn check_groups(op: &'static str, channels: usize, groups: usize) -> Result<()> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return invalid(
                op,
                format!("{channels} channels do not split into {groups} groups"),
            );
        }
        Ok(())
    }

    /// Group norm of a channels-last tensor `[batch, ..., channels]` (statistics per sample
    /// and group over every position), optionally followed by SiLU.
    pub fn group_norm(
        &self,
        groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor> {
        let stats = self.group_norm_stats(groups, eps)?;
        self.group_norm_with_stats(&stats, groups, gamma, beta, silu)
    }

    /// The per-(sample, group) statistics group norm would use.
    pub fn group_norm_stats(&self, groups: usize, eps: f32) -> Result<Vec<GroupStats>> {
        const OP: &str = "group_norm";
        let (batch, channels) = self.batch_and_channels(OP)?;
        Self::check_groups(OP, channels, groups)?;
        Ok(norm::group_norm_stats(
            self.f32s(OP)?,
            batch,
            channels,
            groups,
            eps,
        ))
    }

    /// Group norm with given statistics (`batch * groups` of them): masked execution
    /// normalises the active rows of an edited map with the template's statistics.
    pub fn group_norm_with_stats(
        &self,
        stats: &[GroupStats],
        groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        const OP: &str = "group_norm";
        let (batch, channels) = self.batch_and_channels(OP)?;
        Self::check_groups(OP, channels, groups)?;
        check_affine(OP, channels, gamma, beta)?;
        check_stats(OP, stats, batch, groups)?;
        let x = self.f32s(OP)?;
        let mut out = vec![0.0f32; x.len()];
        norm::group_norm_apply(
            x,
            &mut out,
            batch,
            channels,
            groups,
            stats,
            gamma.f32s(OP)?,
            beta.f32s(OP)?,
            silu,
        );
        Ok(Tensor::from_f32_unchecked(out, self.shape()))
    }

    /// Group norm with given statistics over samples of different lengths: `self` is their
    /// rows stacked, `[rows, channels]` (any rank ending in channels), `sample_rows[i]` of
    /// them belong to sample i, whose statistics are `stats[i * groups..(i + 1) * groups]`.
    /// A ragged masked batch normalises each request's active rows with its template's
    /// statistics this way.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_with_stats_ragged(
        &self,
        sample_rows: &[usize],
        stats: &[GroupStats],
        groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        const OP: &str = "group_norm";
        let channels = self.dim(-1)?;
        Self::check_groups(OP, channels, groups)?;
        check_affine(OP, channels, gamma, beta)?;
        let rows = self.elem_count() / channels.max(1);
        if sample_rows.iter().sum::<usize>() != rows {
            return shape_err(
                OP,
                format!(
                    "samples of {sample_rows:?} rows do not stack to the {rows} rows of {:?}",
                    self.shape()
                ),
            );
        }
        if stats.len() != sample_rows.len() * groups {
            return invalid(
                OP,
                format!(
                    "{} statistics given for {} samples of {groups} groups",
                    stats.len(),
                    sample_rows.len()
                ),
            );
        }
        let x = self.f32s(OP)?;
        let mut out = vec![0.0f32; x.len()];
        norm::group_norm_apply_ragged(
            x,
            &mut out,
            sample_rows,
            channels,
            groups,
            stats,
            gamma.f32s(OP)?,
            beta.f32s(OP)?,
            silu,
        );
        Ok(Tensor::from_f32_unchecked(out, self.shape()))
    }

    /// Each sample's per-position group moments in units of its statistics `stats` (`batch *
    /// groups`, as [`Tensor::group_norm_stats`] gives them): for `self = [batch, ...,
    /// channels]`, `[batch, positions, groups * 2]` holding `sum z` and `sum z^2` per group
    /// with `z = (x - mean) * rstd`. A template records them so that an edit's masked norm
    /// can compute the statistics of its blended map ([`Tensor::blended_group_stats`]).
    pub fn group_position_moments(&self, groups: usize, stats: &[GroupStats]) -> Result<Tensor> {
        const OP: &str = "group_position_moments";
        let (batch, channels) = self.batch_and_channels(OP)?;
        Self::check_groups(OP, channels, groups)?;
        check_stats(OP, stats, batch, groups)?;
        let x = self.f32s(OP)?;
        let per_sample = x.len() / batch.max(1);
        let mut out = Vec::with_capacity(x.len() / (channels / groups).max(1) * 2);
        for (b, sample) in x.chunks(per_sample.max(1)).take(batch).enumerate() {
            out.extend(norm::group_position_moments(
                sample,
                channels,
                groups,
                &stats[b * groups..(b + 1) * groups],
            ));
        }
        let positions = per_sample / channels.max(1);
        Ok(Tensor::from_f32_unchecked(
            out,
            &[batch, positions, groups * 2],
        ))
    }

    /// The group statistics of a map whose positions `active` (sorted or not) hold the rows
    /// of `self = [active, channels]` and whose other positions hold a template's values:
    /// `template` are the template map's statistics (`groups` of them) and `template_moments
    /// = [positions, groups * 2]` its [`Tensor::group_position_moments`], in any float type.
    /// A masked edit normalises its fresh rows with these, so that its norms see the map it
    /// computes on (fresh rows in the mask, the template around it) rather than the template
    /// alone.
    pub fn blended_group_stats(
        &self,
        template: &[GroupStats],
        template_moments: &Tensor,
        active: &[u32],
        eps: f32,
    ) -> Result<Vec<GroupStats>> {
        let segment = BlendedSegment {
            template,
            moments: template_moments,
            active,
        };
        self.blended_group_stats_ragged(&[segment], eps)
    }

    /// [`Tensor::blended_group_stats`] of several segments whose fresh rows `self` stacks in
    /// segment order (`segments[i].active.len()` rows each, read in place): every segment's
    /// statistics, `groups` each, in order.
    pub fn blended_group_stats_ragged(
        &self,
        segments: &[BlendedSegment<'_>],
        eps: f32,
    ) -> Result<Vec<GroupStats>> {
        const OP: &str = "blended_group_stats";
        let channels = self.dim(-1)?;
        let rows = self.elem_count() / channels.max(1);
        let stacked: usize = segments.iter().map(|s| s.active.len()).sum();
        if rows != stacked {
            return shape_err(OP, format!("{rows} rows for {stacked} active positions"));
        }
        let fresh = self.f32s(OP)?;
        let mut all = Vec::with_capacity(segments.iter().map(|s| s.template.len()).sum());
        let mut offset = 0;
        for s in segments {
            let rows = &fresh[offset * channels..(offset + s.active.len()) * channels];
            offset += s.active.len();
            all.extend(s.stats(OP, rows, channels, eps)?);
        }
        Ok(all)
    }

    /// Layer norm over the last dimension.
    pub fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "layer_norm";
        let channels = self.dim(-1)?;
        check_affine(OP, channels, gamma, beta)?;
        let x = self.f32s(OP)?;
        let mut out = vec![0.0f32; x.len()];
        norm::layer_norm(x, &mut out, gamma.f32s(OP)?, beta.f32s(OP)?, eps);
        Ok(Tensor::from_f32_unchecked(out, self.shape()))
    }
}
