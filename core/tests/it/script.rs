//! What the golden scripts share: reading a script, running its inputs through a harness, and
//! comparing (or, with `TALLY_GOLDEN_UPDATE=1`, rewriting) the files of a folder.
//!
//! A script is lines of input; a line that starts with `#` is a comment, and `#` ends an input
//! early. Under each input come the commands the harness gave back, each prefixed with `> `;
//! running a script drops those lines and writes what the engine answers now.

use std::fmt::Write as _;
use std::path::Path;

/// The number given as `name=N` among `words`, if any.
pub fn field(words: &[&str], name: &str) -> Option<u64> {
    let prefix = format!("{name}=");
    words
        .iter()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
}

/// Runs one script: `input` gets every input line (comments stripped) and returns the lines to
/// print under it (each already prefixed with `> ` and ending in a newline).
pub fn run(script: &str, mut input: impl FnMut(&str) -> String) -> String {
    let mut text = String::new();
    for line in script.lines() {
        if line.starts_with("> ") {
            continue;
        }
        let _ = writeln!(text, "{line}");
        let words = line.split('#').next().unwrap_or("").trim();
        if words.is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        text.push_str(&input(words));
    }
    text
}

/// Runs every `*.txt` script of `dir` (a path under the crate) through `run` and fails on any
/// difference, or rewrites the files when `TALLY_GOLDEN_UPDATE` is set.
pub fn check_dir(dir: &str, run: impl Fn(&str) -> String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let update = std::env::var_os("TALLY_GOLDEN_UPDATE").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden scripts in {}", dir.display());
    let mut differ = Vec::new();
    for path in files {
        let script = std::fs::read_to_string(&path).expect("read script");
        let actual = run(&script);
        if actual != script {
            if update {
                std::fs::write(&path, &actual).expect("write script");
            } else {
                differ.push(format!("--- {}\n{actual}", path.display()));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "the engine answers differently (TALLY_GOLDEN_UPDATE=1 to accept):\n{}",
        differ.join("\n")
    );
}
