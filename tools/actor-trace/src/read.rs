//! Reading a trace file. A server killed mid-write leaves a cut last line: that one is
//! skipped (and reported), any other bad line is an error naming its line number.

use std::path::Path;

use crate::record::Record;

#[derive(Debug, Default)]
pub struct Trace {
    pub records: Vec<Record>,
    /// The last line was cut off and skipped.
    pub truncated: bool,
}

pub fn read(path: &Path) -> Result<Trace, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse(text: &str) -> Result<Trace, String> {
    let mut trace = Trace::default();
    let lines: Vec<&str> = text.split('\n').collect();
    let last = lines.len() - 1;
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) if r.end_us < r.start_us => {
                return Err(format!("line {}: end_us is before start_us", i + 1));
            }
            Ok(r) => trace.records.push(r),
            // No newline after it: the writer stopped mid-line.
            Err(_) if i == last => trace.truncated = true,
            Err(e) => return Err(format!("line {}: {e}", i + 1)),
        }
    }
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"actor":"worker-0","kind":"step","start_us":5,"end_us":9}"#;

    #[test]
    fn reads_records_and_skips_blank_lines() {
        let t = parse(&format!("{LINE}\n\n{LINE}\n")).unwrap();
        assert_eq!(t.records.len(), 2);
        assert!(!t.truncated);
        assert_eq!(t.records[0].duration_us(), 4);
    }

    #[test]
    fn a_cut_last_line_is_skipped_and_reported() {
        let t = parse(&format!("{LINE}\n{}", &LINE[..20])).unwrap();
        assert_eq!(t.records.len(), 1);
        assert!(t.truncated);
    }

    #[test]
    fn a_bad_line_inside_names_its_number() {
        let err = parse(&format!("{LINE}\n{{\"actor\":1}}\n{LINE}\n")).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = parse(r#"{"actor":"a","kind":"k","start_us":9,"end_us":5}"#).unwrap_err();
        assert!(err.contains("line 1") && err.contains("before"), "{err}");
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let err = read(Path::new("/no/such/trace.jsonl")).unwrap_err();
        assert!(err.contains("/no/such/trace.jsonl"), "{err}");
    }
}
