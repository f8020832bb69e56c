//! The architecture's boundaries, checked: the pure modules (formats, decoders, protocol cores,
//! models) do no I/O, read no clock and import no runtime, so a simulator can drive them and a
//! fuzzer can feed them. A change that breaks one fails here, naming the file and the line.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// Files and directories (every `.rs` under them) that must stay pure.
const PURE: &[&str] = &[
    "wire/src",
    "dataplane/src/repl/core",
    "dataplane/src/replica/core.rs",
    "dataplane/src/replica/state.rs",
    "dataplane/src/replica/frame.rs",
    "controlapi/src/replica.rs",
    "dataplane/src/wal/format.rs",
    "dataplane/src/wal/recovery.rs",
    "dataplane/src/store/engine/codec.rs",
    "controlapi/src/glts",
    "controlapi/src/meta.rs",
    "wan/src/link.rs",
    "client/src/archive/format.rs",
];

/// What a pure module must not name: runtimes and transports, clocks, the file system and the
/// network.
const FORBIDDEN: &[&str] =
    &["glommio", "tokio", "quinn", "Instant::now", "SystemTime", "std::fs", "std::net", "std::thread", "libc::"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|extension| extension == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The code of a line, without its comment (doc comments may name what the module avoids).
fn code(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return "";
    }
    line.split(" //").next().unwrap_or(line)
}

#[test]
fn pure_modules_import_no_runtime_clock_or_io() {
    let root = workspace();
    let mut files = Vec::new();
    for pure in PURE {
        let path = root.join(pure);
        assert!(path.exists(), "{pure} is listed as pure but does not exist: update the list");
        rust_files(&path, &mut files);
    }
    assert!(files.len() > 10, "found only {} pure files", files.len());
    let mut violations = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Unit tests at the end of a module may use what they like.
        let body = text.split("#[cfg(test)]").next().unwrap_or(&text);
        for (number, line) in body.lines().enumerate() {
            for word in FORBIDDEN {
                if code(line).contains(word) {
                    let shown = file.strip_prefix(&root).unwrap_or(file).display();
                    violations.push(format!("{shown}:{}: `{word}` in a pure module: {}", number + 1, line.trim()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "pure modules must stay pure:\n{}", violations.join("\n"));
}

/// The check itself catches what it is meant to.
#[test]
fn the_purity_check_sees_a_runtime_import_and_ignores_comments() {
    assert_eq!(code("use tokio::sync::mpsc;"), "use tokio::sync::mpsc;");
    assert_eq!(code("    // no tokio here"), "");
    assert_eq!(code("let x = 1; // tokio"), "let x = 1;");
    assert!(FORBIDDEN.iter().any(|word| code("    let now = std::time::Instant::now();").contains(word)));
}

/// The crates' dependencies as `cargo metadata` resolves them: package name -> the names of
/// its normal (not dev, not build) dependencies.
fn normal_dependencies() -> std::collections::HashMap<String, Vec<String>> {
    let output = std::process::Command::new(env!("CARGO"))
        // This host's platform only: the others' dependencies need not be fetched.
        .args(["metadata", "--format-version", "1", "--filter-platform"])
        .arg(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let name_of = |id: &str| {
        metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|package| package["id"] == id)
            .map(|package| package["name"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let mut graph = std::collections::HashMap::new();
    for node in metadata["resolve"]["nodes"].as_array().unwrap() {
        let normal: Vec<String> = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|dep| dep["dep_kinds"].as_array().unwrap().iter().any(|kind| kind["kind"].is_null()))
            .map(|dep| name_of(dep["pkg"].as_str().unwrap()))
            .collect();
        graph.insert(name_of(node["id"].as_str().unwrap()), normal);
    }
    graph
}

/// Every crate `root` links (its normal dependencies, transitively).
fn linked(graph: &std::collections::HashMap<String, Vec<String>>, root: &str) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(next) = stack.pop() {
        for dep in graph.get(&next).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                stack.push(dep.clone());
            }
        }
    }
    seen
}

/// **Architecture Invariant:** the data node and the client never link openraft (the control
/// plane's Raft stays in `controlplane`); the platform stands below every other crate; the
/// test kit is never linked into a product.
#[test]
fn crates_keep_to_their_roles() {
    let graph = normal_dependencies();
    let rules: &[(&str, &[&str])] = &[
        ("dataplane", &["openraft", "controlplane", "testkit", "bench"]),
        ("client", &["openraft", "controlplane", "dataplane", "testkit", "bench"]),
        ("controlapi", &["openraft", "controlplane", "dataplane", "client", "testkit"]),
        ("platform", &["openraft", "controlplane", "controlapi", "dataplane", "client", "wire", "testkit"]),
        ("controlplane", &["dataplane", "testkit", "bench"]),
        ("wire", &["platform", "controlapi", "controlplane", "dataplane", "client", "tokio", "quinn", "glommio"]),
    ];
    let mut violations = Vec::new();
    for (krate, forbidden) in rules {
        assert!(graph.contains_key(*krate), "no crate {krate} in the workspace");
        let links = linked(&graph, krate);
        for name in forbidden.iter().filter(|name| links.contains(**name)) {
            violations.push(format!("{krate} links {name}"));
        }
    }
    assert!(violations.is_empty(), "crate boundaries broken:\n{}", violations.join("\n"));
    // The check sees what it is meant to: the control plane does link openraft.
    assert!(linked(&graph, "controlplane").contains("openraft"));
}
