use crate::cpu::gather;
use crate::error::{invalid, shape_err};
use crate::{Result, Tensor};

impl Tensor {
    fn rows_and_cols(&self, op: &'static str) -> Result<(usize, usize)> {
        if self.rank() != 2 {
            return shape_err(op, format!("expected [rows, cols], got {:?}", self.shape()));
        }
        Ok((self.shape()[0], self.shape()[1]))
    }

    /// Rows `index[i]` of a `[rows, cols]` tensor, in order: `[index.len(), cols]`.
    pub fn gather_rows(&self, index: &[u32]) -> Result<Tensor> {
        const OP: &str = "gather_rows";
        let (rows, cols) = self.rows_and_cols(OP)?;
        if let Some(&bad) = index.iter().find(|&&i| i as usize >= rows) {
            return invalid(OP, format!("row {bad} out of range for {rows} rows"));
        }
        let mut out = vec![0.0f32; index.len() * cols];
        gather::gather_rows(self.f32s(OP)?, cols, index, &mut out);
        Ok(Tensor::from_f32_unchecked(out, &[index.len(), cols]))
    }

    /// Writes `rows[i]` to row `index[i]`, in place. Indices must be in range and unique.
    pub fn scatter_rows(&mut self, index: &[u32], rows: &Tensor) -> Result<()> {
        const OP: &str = "scatter_rows";
        let (n, cols) = self.rows_and_cols(OP)?;
        if rows.shape() != [index.len(), cols] {
            return shape_err(
                OP,
                format!(
                    "{} indices need rows [{}, {cols}], got {:?}",
                    index.len(),
                    index.len(),
                    rows.shape()
                ),
            );
        }
        let mut seen = vec![false; n];
        for &i in index {
            let i = i as usize;
            if i >= n {
                return invalid(OP, format!("row {i} out of range for {n} rows"));
            }
            if std::mem::replace(&mut seen[i], true) {
                return invalid(OP, format!("row {i} written twice"));
            }
        }
        let src = rows.f32s(OP)?;
        gather::scatter_rows(self.f32s_mut(OP)?, cols, index, src);
        Ok(())
    }
}
