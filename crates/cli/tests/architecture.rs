//! ARCHITECTURE.md's invariant "no module cycles": within each crate of the workspace, the
//! graph of `crate::module` references between top-level modules has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The top-level module a source file belongs to (`direct/avx512.rs` → `direct`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("a file under src");
    let first = rel.components().next().expect("a path");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("a source folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::NAME` in the code (comments left out) where NAME is one of `modules`.
fn references(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) {
                found.insert(name);
            }
        }
    }
    found
}

/// A cycle of `graph`, if it has one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(src, f))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = fs::read_to_string(file).expect("a readable source file");
        let mut targets = references(&text, &modules);
        targets.remove(&module);
        graph.entry(module).or_default().extend(targets);
    }
    graph
}

#[test]
fn no_crate_has_a_module_cycle() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for entry in fs::read_dir(&crates).expect("the crates folder").flatten() {
        let src = entry.path().join("src");
        if !src.is_dir() {
            continue;
        }
        let graph = module_graph(&src);
        assert!(
            find_cycle(&graph).is_none(),
            "{}: module cycle {}",
            src.display(),
            find_cycle(&graph).unwrap_or_default().join(" → ")
        );
        checked += 1;
    }
    assert!(checked >= 7, "found only {checked} crates");
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let edges = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a.to_string()).or_default().insert(b.to_string());
        }
        g
    };
    let cyclic = edges(&[("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]);
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        find_cycle(&edges(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    let modules: BTreeSet<String> = ["fused".to_string(), "target".to_string()].into();
    let text =
        "use crate::target::one_hot; // crate::fused in a comment\nlet x = crate::fused::reduce;";
    assert_eq!(references(text, &modules), modules);
}

/// Every `.rs` file under `crates/*/{src,tests,examples,benches}`, relative to `crates/`.
fn workspace_sources() -> Vec<(String, String)> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for entry in fs::read_dir(&crates).expect("the crates folder").flatten() {
        for part in ["src", "tests", "examples", "benches"] {
            let dir = entry.path().join(part);
            if dir.is_dir() {
                rust_files(&dir, &mut files);
            }
        }
    }
    files
        .into_iter()
        .map(|f| {
            let name = f
                .strip_prefix(&crates)
                .expect("under crates")
                .to_string_lossy()
                .into_owned();
            (name, fs::read_to_string(&f).expect("a source file"))
        })
        .collect()
}

/// The code of `text` without `//` comments (string contents are kept: good enough for
/// keywords that do not appear in strings here).
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
}

/// ARCHITECTURE.md's invariant: `unsafe` only in the files it lists (the kernels of
/// `cwseg-ops`, the CUDA launches, `mallopt`, device queries, the emulation harness and the
/// counting allocator of one test).
#[test]
fn unsafe_code_lives_only_where_the_architecture_allows() {
    const ALLOWED: &[&str] = &[
        "ops/src/direct.rs",
        "ops/src/direct/slab.rs",
        "ops/src/direct/avx512.rs",
        "ops/src/direct/avx2.rs",
        "ops/src/direct/amx.rs",
        "ops/src/direct/channels_last.rs",
        "ops/src/patches.rs",
        "ops/src/vol2col.rs",
        "ops/src/tiles.rs",
        "ops/src/alloc.rs",
        "ops/src/cudnn.rs",
        "ops/src/cudnn_pool.rs",
        "ops/src/cuda_layers.rs",
        "ops/examples/fma_peak.rs",
        "ops/tests/cuda_kernels_emulated.rs",
        "ops/src/loss_sums_cuda.rs",
        "ops/src/loss_sums_emulated.rs",
        "train/src/device.rs",
        "models/tests/activation_memory.rs",
        "cuda-emulate/src/lib.rs",
    ];
    let keyword = |line: &str| {
        ["unsafe {", "unsafe fn", "unsafe impl", "unsafe extern"]
            .iter()
            .any(|k| line.contains(k))
    };
    let mut found = BTreeSet::new();
    for (name, text) in workspace_sources() {
        // this file names the keywords it looks for
        if name != "cli/tests/architecture.rs" && code_lines(&text).any(keyword) {
            found.insert(name);
        }
    }
    let outside: Vec<&String> = found
        .iter()
        .filter(|f| !ALLOWED.contains(&f.as_str()))
        .collect();
    assert!(
        outside.is_empty(),
        "unsafe outside the allowed files: {outside:?}"
    );
    assert!(
        !found
            .iter()
            .any(|f| f.starts_with("models/src") || f.starts_with("losses/src")),
        "cwseg-models' and cwseg-losses' sources hold no unsafe code"
    );
    assert!(found.len() >= 10, "the scan found only {found:?}");
}

/// ARCHITECTURE.md's invariant: library crates do not print (their tests may); `cwseg-nvcc`
/// prints cargo's directives from build scripts, which is its job.
#[test]
fn libraries_do_not_print() {
    const LIBRARIES: &[&str] = &[
        "morphology/src",
        "metrics/src",
        "data/src",
        "losses/src",
        "ops/src",
        "models/src",
        "train/src",
    ];
    const TEST_ONLY: &[&str] = &["ops/src/loss_sums_emulated.rs"];
    let mut printing = Vec::new();
    for (name, text) in workspace_sources() {
        if !LIBRARIES.iter().any(|l| name.starts_with(l)) || TEST_ONLY.contains(&name.as_str()) {
            continue;
        }
        // a file's unit tests come after its `#[cfg(test)]` line
        let before_tests = text.split("#[cfg(test)]").next().unwrap_or_default();
        let prints = code_lines(before_tests).any(|line| {
            ["println!", "print!(", "eprintln!", "eprint!("]
                .iter()
                .any(|m| line.contains(m))
        });
        if prints {
            printing.push(name);
        }
    }
    assert!(
        printing.is_empty(),
        "library sources that print: {printing:?}"
    );
}

/// ARCHITECTURE.md's invariant: dependencies point down the crate map (morphology, metrics,
/// data, ops, losses, models, train, cli); `nvcc` and `cuda-emulate` are only build- and
/// dev-dependencies; nothing depends on the CLI.
#[test]
fn dependencies_point_down_the_crate_map() {
    const ORDER: &[&str] = &[
        "morphology",
        "metrics",
        "data",
        "ops",
        "losses",
        "models",
        "train",
        "cli",
    ];
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for (rank, name) in ORDER.iter().enumerate() {
        let manifest = fs::read_to_string(crates.join(name).join("Cargo.toml")).expect("manifest");
        let mut section = String::new();
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            let Some(dependency) = line.strip_prefix("cwseg-") else {
                continue;
            };
            let dependency: String = dependency
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let normal = section == "[dependencies]" || section.ends_with(".dependencies]");
            if ["nvcc", "cuda-emulate"].contains(&dependency.as_str()) {
                assert!(
                    !normal,
                    "{name} depends on cwseg-{dependency} beyond build or tests"
                );
                continue;
            }
            let Some(target) = ORDER.iter().position(|o| *o == dependency) else {
                panic!("{name}: cwseg-{dependency} is not in the crate map");
            };
            if normal {
                assert!(
                    target < rank,
                    "{name} depends on cwseg-{dependency}, which the map puts above it"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "found only {checked} dependencies");
}
