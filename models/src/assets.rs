//! Files compiled into the library, so commands that write them work from any directory.

use std::path::Path;

use crate::{Error, Result};

/// CLIP's BPE tokenizer as Stable Diffusion checkpoints ship it in `tokenizer/` (written by
/// `tools/fixtures/clip_tokenizer.py`). SD 1.x and 2.x share the vocabulary; SD 2.x pads
/// with `!` instead of `<|endoftext|>`.
pub mod clip_tokenizer {
    pub const VOCAB_JSON: &str = include_str!("../assets/clip-tokenizer/vocab.json");
    pub const MERGES_TXT: &str = include_str!("../assets/clip-tokenizer/merges.txt");
    pub const SD1_TOKENIZER_CONFIG: &str =
        include_str!("../assets/clip-tokenizer/tokenizer_config.json");
    pub const SD1_SPECIAL_TOKENS_MAP: &str =
        include_str!("../assets/clip-tokenizer/special_tokens_map.json");
    pub const SD2_TOKENIZER_CONFIG: &str =
        include_str!("../assets/clip-tokenizer/sd2/tokenizer_config.json");
    pub const SD2_SPECIAL_TOKENS_MAP: &str =
        include_str!("../assets/clip-tokenizer/sd2/special_tokens_map.json");
}

/// Which `tokenizer/` folder to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipTokenizerFlavor {
    /// SD 1.x: pads with `<|endoftext|>`.
    Sd1,
    /// SD 2.x: pads with `!`.
    Sd2,
}

impl ClipTokenizerFlavor {
    /// The folder's files: (file name, contents).
    pub fn files(self) -> [(&'static str, &'static str); 4] {
        use clip_tokenizer::*;
        let (config, special) = match self {
            ClipTokenizerFlavor::Sd1 => (SD1_TOKENIZER_CONFIG, SD1_SPECIAL_TOKENS_MAP),
            ClipTokenizerFlavor::Sd2 => (SD2_TOKENIZER_CONFIG, SD2_SPECIAL_TOKENS_MAP),
        };
        [
            ("vocab.json", VOCAB_JSON),
            ("merges.txt", MERGES_TXT),
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", special),
        ]
    }

    /// Writes the tokenizer folder `dir` (created if missing).
    pub fn write(self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for (name, text) in self.files() {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        Ok(())
    }
}
