//! import → export → import gives the same services, on the shop manifests of the CLI's tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use flotilla_kube::{ImageMap, Input, export, import};

fn inputs(dir: &Path) -> Vec<Input> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| Input {
            file: p.display().to_string(),
            text: std::fs::read_to_string(&p).unwrap(),
        })
        .collect()
}

fn services(
    imported: &flotilla_kube::Imported,
) -> std::collections::BTreeMap<String, flotilla_spec::ServiceSpec> {
    flotilla_spec::parse_file(&imported.to_toml(), "imported")
        .unwrap_or_else(|e| panic!("{e}\n{}", imported.to_toml()))
        .service
}

#[test]
fn import_export_import_gives_the_same_services() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flotilla/tests/k8s");
    let images =
        ImageMap::parse(&std::fs::read_to_string(corpus.join("images.toml")).unwrap()).unwrap();
    let first = import(&inputs(&corpus.join("shop")), &images).unwrap_or_else(|e| panic!("{e:?}"));
    let first = services(&first);
    assert_eq!(first.len(), 2);
    let exported: Vec<Input> = first
        .iter()
        .map(|(name, spec)| {
            let out = export(name, spec);
            // Only the image is said: everything else of these services has a Kubernetes field.
            assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
            Input {
                file: format!("{name}.yaml"),
                text: out.yaml,
            }
        })
        .collect();
    let second = import(&exported, &ImageMap::default()).unwrap_or_else(|e| {
        let texts: Vec<&str> = exported.iter().map(|i| i.text.as_str()).collect();
        panic!("{e:#?}\n{}", texts.join("\n---\n"))
    });
    let second = services(&second);
    for (name, spec) in &first {
        assert_eq!(Some(spec), second.get(name), "{name}");
    }
    assert_eq!(first.len(), second.len());
}
