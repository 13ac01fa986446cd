//! The library's layers (docs/ARCHITECTURE.md) depend only downward: each top-level module of
//! `src/` may use only modules of a lower layer, so there is no cycle between them. Read from
//! the source's `crate::` paths, the unit-test modules (`#[cfg(test)] mod tests`, at the end of
//! their files) left out: a test may build the whole service.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Each top-level module and its layer; a module may depend on lower layers only.
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("store", 1),
    ("metrics", 1),
    ("pem", 1),
    ("settings", 1),
    ("telemetry", 1),
    ("auth", 2),
    ("admin", 3),
    ("grpc", 4),
    ("cli", 5),
    ("app", 5),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, layer)| *layer)
        .unwrap_or_else(|| {
            panic!("src/{module} is in no layer: add it to LAYERS and ARCHITECTURE.md")
        })
}

/// The top-level modules that `source` names through `crate::`.
fn used_modules(source: &str) -> BTreeSet<String> {
    let code = match source.find("#[cfg(test)]\nmod tests") {
        Some(tests) => &source[..tests],
        None => source,
    };
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::…, b, c::{…}}`: the names at the group's top level.
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        used.insert(first_name(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        used.insert(first_name(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            used.insert(first_name(rest));
        }
    }
    used.remove("");
    used
}

fn first_name(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn sources(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn modules_depend_only_on_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        let used = used_modules(&source);
        graph.entry(top.clone()).or_default().extend(
            used.into_iter()
                .filter(|module| *module != top)
                .map(|module| format!("{module} (in {})", relative.display())),
        );
    }
    let mut upward = Vec::new();
    for (module, uses) in &graph {
        for used in uses {
            let name = used.split(' ').next().unwrap();
            if layer(name) >= layer(module) {
                upward.push(format!("{module} uses {used}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "dependencies that do not go down a layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reader_sees_grouped_and_plain_paths() {
    let source = "use crate::{auth::{a, b}, domain::x, store};\nfn f() { crate::metrics::m(); }\n\
                  // crate::app::not_code\n#[cfg(test)]\nmod tests { use crate::app::Services; }\n";
    let used: Vec<_> = used_modules(source).into_iter().collect();
    assert_eq!(used, ["auth", "domain", "metrics", "store"]);
}
