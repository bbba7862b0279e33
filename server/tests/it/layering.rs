//! The server's modules form no import cycle: each names (`crate::module`) only modules that do
//! not name it back, directly or through others. Read from the sources, test code excluded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of `server/src` and the modules it names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            for sub in std::fs::read_dir(&path).unwrap() {
                files.push((path.clone(), sub.unwrap().path()));
            }
        } else {
            files.push((path.clone(), path));
        }
    }
    for (module_path, file) in files {
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let module = module_path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        if module == "lib" || module == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let names = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                names.insert(name);
            }
        }
    }
    graph
}

#[test]
fn server_modules_import_no_cycle() {
    let graph = module_graph();
    assert!(
        graph.len() > 10 && graph.contains_key("pipeline"),
        "{graph:?}"
    );
    // Depth-first search for a path from each module back to itself.
    for start in graph.keys() {
        let mut stack: Vec<Vec<&String>> = vec![vec![start]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = *path.last().unwrap();
            for next in graph.get(last).into_iter().flatten() {
                assert!(next != start, "import cycle: {path:?} -> {next}");
                if graph.contains_key(next) && seen.insert(next) {
                    let mut longer = path.clone();
                    longer.push(next);
                    stack.push(longer);
                }
            }
        }
    }
}
