//! The module layering, read from the source: no import cycle between
//! top-level modules, and each rule of the architecture holds. A `use` (or
//! a path) naming `crate::X` from module `Y` is an import of X by Y; test
//! modules (`#[cfg(test)]` and `tests.rs`) are left out, since tests may
//! reach across layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules it imports.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("tests.rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "main" || top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Everything from the first test module on is test code.
            let code = text.split("#[cfg(test)]").next().unwrap();
            let deps = graph.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

fn imports_of(graph: &BTreeMap<String, BTreeSet<String>>, module: &str) -> BTreeSet<String> {
    graph.get(module).cloned().unwrap_or_default()
}

#[test]
fn no_top_level_module_imports_one_that_imports_it() {
    let graph = imports();
    // Depth-first search for a path back to the start.
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, path)) = stack.pop() {
            for next in imports_of(&graph, &at) {
                if next == *start {
                    panic!("import cycle: {} -> {start}", path.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next, p));
                }
            }
        }
    }
}

#[test]
fn each_layer_imports_only_those_below_it() {
    let graph = imports();
    let rules: &[(&str, &[&str], &str)] = &[
        (
            "engine",
            &["store", "host", "telemetry", "cmd", "app", "ui"],
            "the engine never imports the store, the host or telemetry",
        ),
        (
            "store",
            &["engine", "cli", "host", "cmd"],
            "the store never imports the engine or the command line",
        ),
        ("app", &["ui", "host", "cmd"], "app never imports ui"),
        (
            "agent",
            &["cli", "host", "cmd", "app", "ui"],
            "agents never import the command line or the host",
        ),
        (
            "telemetry",
            &["app", "ui", "host", "cmd", "agent"],
            "telemetry never imports app",
        ),
        ("host", &["cmd"], "the host never imports the commands"),
        (
            "serve",
            &["host", "cmd", "app", "ui", "agent"],
            "the API server is below the host, beside the agents",
        ),
        (
            "layout",
            &["app", "ui", "host", "cmd"],
            "layout is below app and ui",
        ),
    ];
    for facts in [
        "budget", "gguf", "layers", "machines", "models", "window", "chat",
    ] {
        let deps = imports_of(&graph, facts);
        for upper in ["engine", "agent", "app", "ui", "host", "cmd"] {
            assert!(
                !deps.contains(upper),
                "facts never import the engine or anything above: {facts} imports {upper}"
            );
        }
    }
    for (module, forbidden, rule) in rules {
        assert!(graph.contains_key(*module), "no module {module}");
        let deps = imports_of(&graph, module);
        for f in *forbidden {
            assert!(!deps.contains(*f), "{rule}: {module} imports {f}");
        }
    }
}
