//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` runs it for diffusers.
//!
//! Loads a `tokenizer/` folder as Stable Diffusion checkpoints ship it: `vocab.json` +
//! `merges.txt` (or a `tokenizer.json`), with `tokenizer_config.json` and
//! `special_tokens_map.json` naming the special tokens and the context length. The pipeline is
//! transformers': NFC, runs of whitespace to one space, lower case; CLIP's split regex; the
//! byte-to-character map; BPE with `</w>` closing each word. `encode` then adds BOS/EOS,
//! truncates to the context length and pads, as `padding="max_length", truncation=True` does.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::weights::read_json;
use crate::{Error, Result};

/// CLIP's pre-tokenization: the special tokens, English contractions, letter runs, single
/// digits, and runs of other non-space characters; whitespace between them is dropped.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's context length, used when `tokenizer_config.json` does not give one.
pub const CLIP_MAX_LEN: usize = 77;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// A loaded CLIP tokenizer. `encode` is thread-safe.
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_len: usize,
    bos: u32,
    eos: u32,
    pad: u32,
}

/// One special token as the config files give it: a string, or an `AddedToken` object.
#[derive(Clone, Debug)]
struct Special {
    content: String,
    /// Matched in the normalized (lower-cased) text rather than the raw one.
    normalized: bool,
}

/// The special tokens in transformers' order of attributes (bos, eos, unk, pad).
struct Specials {
    bos: Special,
    eos: Special,
    unk: Special,
    pad: Special,
    max_len: usize,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder (see the module documentation).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<ClipTokenizer> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::config(dir, "not a directory"));
        }
        let specials = Specials::read(dir)?;
        let (vocab, merges, source) = read_vocab_and_merges(dir)?;
        let id = |token: &Special| {
            vocab.get(&token.content).copied().ok_or_else(|| {
                Error::config(
                    &source,
                    format!("special token `{}` is not in the vocabulary", token.content),
                )
            })
        };
        let (bos, eos, pad) = (id(&specials.bos)?, id(&specials.eos)?, id(&specials.pad)?);
        id(&specials.unk)?;

        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(specials.unk.content.clone())
            .fuse_unk(false)
            .build()
            .map_err(|e| Error::config(&source, format!("invalid BPE model: {e}")))?;
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(normalizer()))
            .with_pre_tokenizer(Some(pre_tokenizer()));
        inner.add_special_tokens(&specials.added_tokens());
        Ok(ClipTokenizer {
            inner,
            max_len: specials.max_len,
            bos,
            eos,
            pad,
        })
    }

    /// The ids of `text`: BOS, at most `max_len - 2` tokens, EOS, then padding to `max_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Invalid(format!("cannot tokenize {text:?}: {e}")))?;
        let body = encoding.get_ids();
        let body = &body[..body.len().min(self.max_len - 2)];
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    /// `encode` for each text, row after row: `[texts.len() * max_len]` ids.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(texts.len() * self.max_len);
        for text in texts {
            ids.extend(self.encode(text)?);
        }
        Ok(ids)
    }

    /// The context length every encoding is padded or truncated to (77 for CLIP).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// `<|endoftext|>` for SD 1.x, `!` (id 0) for SD 2.x.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
}

fn normalizer() -> Normalizers {
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .expect("the whitespace pattern is a valid regex");
    Normalizers::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])
}

fn pre_tokenizer() -> PreTokenizers {
    // `invert`: the regex matches the pieces to keep, not the separators.
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .expect("CLIP's split pattern is a valid regex");
    // transformers keeps ByteLevel's own GPT-2 split too; on CLIP's pieces it changes nothing
    // in practice, but keeping it keeps the pipelines identical.
    let bytes = ByteLevel::new(false, true, true);
    PreTokenizers::new(vec![split.into(), bytes.into()])
}

/// The BPE vocabulary and merges, from `tokenizer.json` when present (as transformers prefers),
/// else from `vocab.json` + `merges.txt`; with the path to name in errors.
fn read_vocab_and_merges(dir: &Path) -> Result<(Vocab, Merges, std::path::PathBuf)> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        let (vocab, merges) = read_tokenizer_json(&json)?;
        return Ok((vocab, merges, json));
    }
    let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for path in [&vocab_path, &merges_path] {
        if !path.is_file() {
            return Err(Error::config(
                path,
                "missing (a CLIP tokenizer needs tokenizer.json or vocab.json + merges.txt)",
            ));
        }
    }
    let (vocab, merges) = BPE::read_file(&path_str(&vocab_path)?, &path_str(&merges_path)?)
        .map_err(|e| Error::config(dir, format!("cannot read vocab.json / merges.txt: {e}")))?;
    Ok((vocab, merges, vocab_path))
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::config(path, "path is not valid UTF-8"))
}

/// `model.vocab` and `model.merges` of a `tokenizer.json`; merges are `"a b"` strings in older
/// files and `["a", "b"]` pairs in newer ones.
fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges)> {
    let json: Value = read_json(path)?;
    let bad = |what: &str| Error::config(path, what.to_string());
    let model = &json["model"];
    if model["type"].as_str().is_some_and(|t| t != "BPE") {
        return Err(bad("model is not BPE"));
    }
    let mut vocab = Vocab::default();
    for (token, id) in model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab"))?
    {
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| bad(&format!("vocabulary id of `{token}` is not a u32")))?;
        vocab.insert(token.clone(), id);
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("no model.merges"))?
        .iter()
        .map(|merge| {
            let pair = match merge {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.into(), b.into())),
                Value::Array(p) => match p.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| bad(&format!("merge {merge} is not a pair")))
        })
        .collect::<Result<Merges>>()?;
    Ok((vocab, merges))
}

impl Specials {
    /// transformers reads `tokenizer_config.json`, then lets `special_tokens_map.json` override
    /// each token it names. Missing tokens take CLIPTokenizer's defaults.
    fn read(dir: &Path) -> Result<Specials> {
        let config = read_optional(&dir.join("tokenizer_config.json"))?;
        let map = read_optional(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str, default: &str| -> Result<Special> {
            for (file, json) in [
                ("special_tokens_map.json", &map),
                ("tokenizer_config.json", &config),
            ] {
                if let Some(value) = json.get(key).filter(|v| !v.is_null()) {
                    return Special::parse(value)
                        .ok_or_else(|| Error::config(dir.join(file), format!("bad `{key}`")));
                }
            }
            Ok(Special {
                content: default.into(),
                normalized: false,
            })
        };
        let max_len = match config.get("model_max_length") {
            None | Some(Value::Null) => CLIP_MAX_LEN,
            // transformers writes a huge sentinel (about 1e30) when it knows no limit.
            Some(v) if v.as_f64().is_some_and(|n| n > f64::from(u32::MAX)) => CLIP_MAX_LEN,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n >= 2)
                .ok_or_else(|| {
                    Error::config(
                        dir.join("tokenizer_config.json"),
                        format!("model_max_length {v} is not an integer >= 2"),
                    )
                })?,
        };
        Ok(Specials {
            bos: token("bos_token", BOS)?,
            eos: token("eos_token", EOS)?,
            unk: token("unk_token", EOS)?,
            pad: token("pad_token", EOS)?,
            max_len,
        })
    }

    /// The tokens the text is first split on. Where several attributes share a token
    /// (eos, unk and pad are all `<|endoftext|>` in SD 1.x) the last one's `normalized` flag
    /// holds, as in transformers: so SD 1.x matches a literal `<|endoftext|>` only in lower
    /// case, while SD 2.x (whose pad is `!`) matches it in any case.
    fn added_tokens(&self) -> Vec<AddedToken> {
        let mut tokens: Vec<&Special> = Vec::new();
        for special in [&self.bos, &self.eos, &self.unk, &self.pad] {
            match tokens.iter_mut().find(|t| t.content == special.content) {
                Some(slot) => *slot = special,
                None => tokens.push(special),
            }
        }
        tokens
            .into_iter()
            .map(|t| AddedToken::from(t.content.clone(), true).normalized(t.normalized))
            .collect()
    }
}

impl Special {
    /// A plain string is a special token matched in the raw text; an `AddedToken` object says
    /// (`normalized`, default false for special tokens).
    fn parse(value: &Value) -> Option<Special> {
        match value {
            Value::String(s) => Some(Special {
                content: s.clone(),
                normalized: false,
            }),
            Value::Object(o) => Some(Special {
                content: o.get("content")?.as_str()?.to_string(),
                normalized: o
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }),
            _ => None,
        }
    }
}

/// A JSON file that may be absent (`Value::Null` then).
fn read_optional(path: &Path) -> Result<Value> {
    if path.is_file() {
        read_json(path)
    } else {
        Ok(Value::Null)
    }
}
