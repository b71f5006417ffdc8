use crate::Result;
use crate::error::invalid;

/// Marks a grid position with no fresh row in [`TokenSet::row_of`].
pub const NOT_ACTIVE: u32 = u32::MAX;

/// The active tokens of one request at one resolution: sorted grid positions plus the inverse
/// map (position -> row among the active rows). Built once per request and resolution and
/// shared by every sparse op at that resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSet {
    height: usize,
    width: usize,
    positions: Vec<u32>,
    row_of: Vec<u32>,
}

impl TokenSet {
    /// From sorted, unique positions `y * width + x`.
    pub fn from_positions(height: usize, width: usize, positions: Vec<u32>) -> Result<TokenSet> {
        let len = height * width;
        if len > NOT_ACTIVE as usize {
            return invalid("token_set", format!("a {height}x{width} grid is too large"));
        }
        let mut row_of = vec![NOT_ACTIVE; len];
        let mut previous: Option<u32> = None;
        for (row, &p) in positions.iter().enumerate() {
            if p as usize >= len {
                return invalid(
                    "token_set",
                    format!("position {p} outside a {height}x{width} grid"),
                );
            }
            if previous.is_some_and(|q| q >= p) {
                return invalid("token_set", "positions must be sorted and unique");
            }
            previous = Some(p);
            row_of[p as usize] = row as u32;
        }
        Ok(TokenSet {
            height,
            width,
            positions,
            row_of,
        })
    }

    /// From a row-major mask of the grid (true = active).
    pub fn from_mask(height: usize, width: usize, mask: &[bool]) -> Result<TokenSet> {
        if mask.len() != height * width {
            return invalid(
                "token_set",
                format!("mask has {} entries, grid {height}x{width}", mask.len()),
            );
        }
        let positions = (0..mask.len() as u32)
            .filter(|&p| mask[p as usize])
            .collect();
        TokenSet::from_positions(height, width, positions)
    }

    /// Every position active.
    pub fn full(height: usize, width: usize) -> TokenSet {
        let n = (height * width) as u32;
        TokenSet {
            height,
            width,
            positions: (0..n).collect(),
            row_of: (0..n).collect(),
        }
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn grid_len(&self) -> usize {
        self.height * self.width
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Active fraction of the grid.
    pub fn ratio(&self) -> f64 {
        self.len() as f64 / self.grid_len().max(1) as f64
    }

    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// For each grid position, its row among the active rows, or `u32::MAX` when inactive.
    pub fn row_of(&self) -> &[u32] {
        &self.row_of
    }

    pub fn is_active(&self, position: usize) -> bool {
        self.row_of[position] != NOT_ACTIVE
    }
}
