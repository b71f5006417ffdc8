//! `retouch tokenize`: the padded CLIP token ids of a text, as a JSON list.

use std::path::PathBuf;

use clap::Args;
use retouch_models::tokenizer::ClipTokenizer;

#[derive(Args)]
pub struct TokenizeArgs {
    /// A tokenizer folder, or a pipeline folder with a `tokenizer/` inside.
    #[arg(long)]
    model: PathBuf,
    text: String,
}

pub fn run(args: TokenizeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let nested = args.model.join("tokenizer");
    let dir = if nested.is_dir() { nested } else { args.model };
    let ids = ClipTokenizer::from_dir(&dir)?.encode(&args.text)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
