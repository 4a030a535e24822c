//! The import rules ARCHITECTURE.md states, checked on the source: data flows one way, and no
//! module below the doors reaches back up into one. A test rather than a lint so it names
//! the file and the line that breaks a rule.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every source file under `src/`: its path relative to `src/` and its text.
fn source_texts() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files
        .into_iter()
        .map(|file| {
            let rel = file
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(&file).unwrap())
        })
        .collect()
}

/// Lines of code (not comments) under `src/` outside `allowed` that name `module`.
fn reaches(module: &str, allowed: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (rel, text) in source_texts() {
        if allowed
            .iter()
            .any(|a| rel == *a || rel.starts_with(&format!("{a}/")))
        {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if code.contains(&format!("crate::{module}")) {
                found.push(format!("src/{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

/// Architecture Invariant: nothing below the gRPC door imports it; protobuf conversions
/// live in `wire/`, start-up in `serve/`.
#[test]
fn nothing_below_the_grpc_door_imports_it() {
    let found = reaches("grpc", &["grpc", "serve", "cli"]);
    assert!(
        found.is_empty(),
        "imports of grpc/ from below it:\n{}",
        found.join("\n")
    );
}

/// Architecture Invariant: nothing below the console (a door, like gRPC) imports it; only
/// start-up wires it to the node.
#[test]
fn nothing_below_the_console_imports_it() {
    let found = reaches("console", &["console", "serve", "cli"]);
    assert!(
        found.is_empty(),
        "imports of console/ from below it:\n{}",
        found.join("\n")
    );
}

/// Architecture Invariant: the wire layer (protobuf <-> domain) knows no door.
#[test]
fn the_wire_layer_knows_no_door() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/wire");
    let mut files = Vec::new();
    sources(&root, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for door in [
            "crate::grpc",
            "crate::stream",
            "crate::kafka",
            "crate::cluster",
            "crate::alerts",
            "crate::console",
        ] {
            assert!(!text.contains(door), "{} imports {door}", file.display());
        }
    }
}

/// Architecture Invariant: the engine and everything it is made of (state, features,
/// models, policy, the analysts' rules) know no door and no transport.
#[test]
fn the_core_knows_no_door() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for core in [
        "engine.rs",
        "features.rs",
        "policy.rs",
        "domain.rs",
        "state",
        "model",
        "rules",
    ] {
        let mut files = Vec::new();
        let path = root.join(core);
        if path.is_dir() {
            sources(&path, &mut files);
        } else {
            files.push(path);
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for door in [
                    "crate::grpc",
                    "crate::stream",
                    "crate::kafka",
                    "crate::cluster",
                    "crate::wire",
                    "tonic::",
                    "rdkafka::",
                ] {
                    assert!(
                        !line.contains(door),
                        "{} names {door}: {line}",
                        file.display()
                    );
                }
            }
        }
    }
}

/// The crate's top-level modules and, for each, the top-level modules its code names
/// (`crate::x`, comments left out): the module graph, from the source.
fn module_graph() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut graph: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for (rel, text) in source_texts() {
        let module = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "main" || module == "lib" {
            continue;
        }
        let edges = graph.entry(module.clone()).or_default();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module && name != "proto" {
                    edges.insert(name);
                }
            }
        }
    }
    graph
}

/// Architecture Invariant: `serve` (start-up) is imported by the command line alone, and the
/// command line by nothing: the top of the library stays the top.
#[test]
fn only_the_command_line_starts_the_server() {
    let serve = reaches("serve", &["serve", "cli"]);
    let cli = reaches("cli", &["cli"]);
    assert!(
        serve.is_empty() && cli.is_empty(),
        "imports of serve/ or cli/ from below them:\n{}",
        [serve, cli].concat().join("\n")
    );
}

/// Architecture Invariant: the stream door never names the cluster (a cluster node hands it
/// a `stream::Record`), and the NATS layer names no door at all.
#[test]
fn the_nats_layers_know_what_is_above_them_only_through_handlers() {
    let stream = reaches("cluster", &["cluster", "serve", "cli", "grpc"]);
    let nats: Vec<_> = ["stream", "cluster", "grpc", "serve", "alerts"]
        .iter()
        .flat_map(|door| reaches(door, &[door, "stream", "cluster", "grpc", "serve", "cli"]))
        .filter(|line| line.starts_with("src/nats.rs"))
        .collect();
    assert!(
        stream.is_empty() && nats.is_empty(),
        "the stream door or the NATS layer reaching up:\n{}",
        [stream, nats].concat().join("\n")
    );
}

/// A circle of imports through `from`, if any: the modules along it, `from` first and last.
fn circle_through(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    from: &str,
) -> Option<Vec<String>> {
    // Depth-first, remembering the path: a step back onto `from` closes a circle.
    fn walk(
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        from: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut std::collections::BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == from {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, from, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_owned()];
    let mut seen = std::collections::BTreeSet::new();
    walk(graph, from, from, &mut path, &mut seen).then_some(path)
}

/// Architecture Invariant: no circle of imports between the crate's modules, of any length
/// (no two modules import each other, and no three import round in a ring).
#[test]
fn no_modules_import_each_other_even_round_a_circle() {
    let graph = module_graph();
    let circles: Vec<String> = graph
        .keys()
        .filter_map(|m| circle_through(&graph, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(
        circles.is_empty(),
        "circles of imports:\n{}",
        circles.join("\n")
    );
    if std::env::var_os("FRAUDGATE_PRINT_GRAPH").is_some() {
        for (a, edges) in &graph {
            println!(
                "{a} -> {}",
                edges.iter().cloned().collect::<Vec<_>>().join(" ")
            );
        }
    }
}

/// The circle finder finds a ring of three and passes a chain: the rule above can fail.
#[test]
fn the_circle_finder_sees_a_ring_of_three() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        for (a, b) in edges {
            g.entry((*a).to_owned())
                .or_default()
                .insert((*b).to_owned());
        }
        g
    };
    let ring = graph(&[("alerts", "wire"), ("wire", "node"), ("node", "alerts")]);
    assert_eq!(
        circle_through(&ring, "alerts").unwrap(),
        ["alerts", "wire", "node", "alerts"]
    );
    let chain = graph(&[("alerts", "wire"), ("wire", "domain"), ("node", "alerts")]);
    assert!(chain.keys().all(|m| circle_through(&chain, m).is_none()));
}
