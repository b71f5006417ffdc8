use retouch_kernels::Tensor;

use crate::Result;
use crate::weights::Weights;

/// A position in a component's weight tree (`down_blocks.1.attentions.0`), so layers load
/// their tensors by local names.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    weights: &'a Weights,
    prefix: &'a str,
}

/// An owned child scope: `Scope` borrows its prefix, so nested names are built here.
pub struct ScopeBuf<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> ScopeBuf<'a> {
    pub fn scope(&self) -> Scope<'_> {
        Scope {
            weights: self.weights,
            prefix: &self.prefix,
        }
    }
}

impl<'a> Scope<'a> {
    pub fn root(weights: &'a Weights) -> Scope<'a> {
        Scope {
            weights,
            prefix: "",
        }
    }

    fn name(&self, local: &str) -> String {
        if self.prefix.is_empty() {
            local.to_string()
        } else {
            format!("{}.{local}", self.prefix)
        }
    }

    /// The child scope `prefix.local`.
    pub fn at(&self, local: impl std::fmt::Display) -> ScopeBuf<'a> {
        ScopeBuf {
            weights: self.weights,
            prefix: self.name(&local.to_string()),
        }
    }

    /// `prefix.local` as f32, which must have `shape`.
    pub fn get(&self, local: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(&self.name(local), shape)
    }

    pub fn contains(&self, local: &str) -> bool {
        self.weights.contains(&self.name(local))
    }

    pub fn shape(&self, local: &str) -> Result<Vec<usize>> {
        self.weights.shape(&self.name(local))
    }
}
