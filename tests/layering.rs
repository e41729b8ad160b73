//! The layering of ARCHITECTURE.md, enforced: every `crate::` path in
//! `src/` (outside comments) names a module at or below the file's own
//! layer, and no sink reaches into another sink. Needs no services.

use std::path::Path;

/// The layers, bottom first; a module may use those before it.
const LAYERS: &[&[&str]] = &[
    &["config"],
    &["observe"],
    &["retry"],
    &["source"],
    &["log"],
    &["enrich"],
    &["sinks"],
    &["pipeline"],
    &["commands"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `src/sinks/redis/mod.rs` → (`sinks`, Some(`redis`)); None for the crate
/// root and the binary.
fn module_of(path: &str) -> Option<(String, Option<String>)> {
    let rel = path.strip_prefix("src/")?;
    let parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    match parts.as_slice() {
        ["lib"] | ["main"] => None,
        [top] => Some((top.to_string(), None)),
        [top, sub, ..] => {
            let sub = (*sub != "mod").then(|| sub.to_string());
            Some((top.to_string(), sub))
        }
        [] => None,
    }
}

/// The upward (or sideways, between sinks) imports of one file.
fn violations(path: &str, text: &str) -> Vec<String> {
    let Some((top, sub)) = module_of(path) else { return Vec::new() };
    let Some(own) = layer(&top) else { return vec![format!("{path}: module {top} is in no layer of LAYERS")] };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let second: String = after[name.len()..]
                .strip_prefix("::")
                .map(|s| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
                .unwrap_or_default();
            rest = &after[name.len()..];
            match layer(&name) {
                None => out.push(format!("{path}:{}: crate::{name} is in no layer", n + 1)),
                Some(l) if l > own => {
                    out.push(format!("{path}:{}: {top} (layer {own}) imports crate::{name} (layer {l})", n + 1))
                }
                Some(_) if name == "sinks" && top == "sinks" => {
                    if let Some(own_sink) = &sub {
                        if !second.is_empty() && second != *own_sink && is_sink_folder(&second) {
                            out.push(format!("{path}:{}: sink {own_sink} imports sink {second}", n + 1));
                        }
                    }
                }
                Some(_) => {}
            }
        }
        if let Some(own_sink) = &sub {
            if top == "sinks" {
                for other in ["clickhouse", "redis", "http", "file"] {
                    if other != own_sink && code.contains(&format!("super::{other}::")) {
                        out.push(format!("{path}:{}: sink {own_sink} imports sink {other}", n + 1));
                    }
                }
            }
        }
    }
    out
}

fn is_sink_folder(name: &str) -> bool {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sinks").join(name).is_dir()
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            sources(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p.strip_prefix(root).expect("under root").to_string_lossy().replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&p).expect("read source")));
        }
    }
}

#[test]
fn every_import_points_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), root, &mut files);
    assert!(files.len() > 30, "found only {} source files", files.len());
    let bad: Vec<String> = files.iter().flat_map(|(p, t)| violations(p, t)).collect();
    assert!(bad.is_empty(), "imports against the layering (ARCHITECTURE.md):\n{}", bad.join("\n"));
    // Every top-level module is in a layer.
    for (p, _) in &files {
        if let Some((top, _)) = module_of(p) {
            assert!(layer(&top).is_some(), "{p}: add module {top} to LAYERS and ARCHITECTURE.md");
        }
    }
}

#[test]
fn an_upward_or_sideways_import_is_caught() {
    let up = violations("src/source/scan.rs", "use crate::pipeline::{DeliverOptions, Delivery};\n");
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(up[0].contains("source (layer 3) imports crate::pipeline (layer 7)"), "{up:?}");
    let inline = violations("src/log/producer.rs", "    let id = crate::sinks::change_id(c);\n");
    assert_eq!(inline.len(), 1, "{inline:?}");
    let sideways = violations("src/sinks/redis/mod.rs", "use crate::sinks::http::Replay;\n");
    assert_eq!(sideways.len(), 1, "{sideways:?}");
    let sideways_super = violations("src/sinks/file/mod.rs", "use super::clickhouse::classify;\n");
    assert_eq!(sideways_super.len(), 1, "{sideways_super:?}");
    // Down the layers, inside one module, and comments are fine.
    assert!(violations("src/pipeline/mod.rs", "use crate::sinks::{Boundary, Sink};\nuse crate::config::Config;\n")
        .is_empty());
    assert!(violations("src/sinks/redis/mod.rs", "use crate::sinks::park;\n/// see crate::pipeline::run\n").is_empty());
    assert!(violations("src/commands/status.rs", "use crate::pipeline::topics;\n").is_empty());
}
