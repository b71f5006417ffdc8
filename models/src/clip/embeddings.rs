//! Token + position embeddings: the encoder's input rows.

use retouch_kernels::Tensor;

use super::Prefixed;
use crate::{Error, Result};

pub struct Embeddings {
    /// `[vocab, hidden]`.
    token: Tensor,
    /// `[max_positions, hidden]`.
    position: Tensor,
}

impl Embeddings {
    pub fn load(
        w: &Prefixed<'_>,
        vocab: usize,
        max_positions: usize,
        hidden: usize,
    ) -> Result<Self> {
        Ok(Embeddings {
            token: w.get("embeddings.token_embedding.weight", &[vocab, hidden])?,
            position: w.get(
                "embeddings.position_embedding.weight",
                &[max_positions, hidden],
            )?,
        })
    }

    /// `ids` holds `batch` sequences of equal length, row after row; returns
    /// `[batch, tokens, hidden]` with position `i` of every sequence offset by row `i`.
    pub fn forward(&self, ids: &[u32], batch: usize) -> Result<Tensor> {
        let (vocab, hidden) = (self.token.shape()[0], self.token.shape()[1]);
        let max_positions = self.position.shape()[0];
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(Error::Invalid(format!(
                "{} token ids do not make {batch} non-empty sequences of equal length",
                ids.len()
            )));
        }
        let tokens = ids.len() / batch;
        if tokens > max_positions {
            return Err(Error::Invalid(format!(
                "sequences of {tokens} tokens exceed the {max_positions} positions of the text encoder"
            )));
        }
        if let Some(bad) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {} (sequence {}, position {}) is outside the vocabulary of {vocab}",
                ids[bad],
                bad / tokens,
                bad % tokens
            )));
        }
        let positions: Vec<u32> = (0..tokens as u32).collect();
        let rows = self
            .token
            .gather_rows(ids)?
            .reshape(&[batch, tokens, hidden])?;
        // [batch, tokens, hidden] + [tokens, hidden] broadcasts over the batch.
        Ok(rows.add(&self.position.gather_rows(&positions)?)?)
    }
}
