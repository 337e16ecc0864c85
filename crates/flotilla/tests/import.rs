//! `flotilla import`: Kubernetes manifests in the style of real ones (tests/k8s/shop) become a
//! flotilla file that `up` runs; what cannot be honoured (tests/k8s/refused) is refused with
//! file, line, column and YAML path.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/k8s")
}

fn import(args: &[&str]) -> Output {
    Command::new(flotilla_bin())
        .arg("import")
        .args(args)
        .current_dir(corpus())
        .output()
        .unwrap()
}

#[test]
fn refusals_name_the_file_line_column_and_path() {
    for (file, expected) in [
        (
            "refused/volumes.yaml",
            vec![
                "refused/volumes.yaml:16:11: spec.template.spec.volumes[0]: volumes: not supported yet",
            ],
        ),
        (
            "refused/sidecar.yaml",
            vec![
                "refused/sidecar.yaml:13:11: spec.template.spec.containers[0].stdin: not supported (supported: name, image, command,",
                "refused/sidecar.yaml:14:11: spec.template.spec.containers[1]: a second container: not supported",
            ],
        ),
        (
            "refused/kinds.yaml",
            vec![
                "refused/kinds.yaml:2:7: kind: StatefulSet: not supported yet",
                "refused/kinds.yaml:7:7: kind: \"Frobnicator\": not supported (supported: Deployment, Pod, Service, Ingress, ConfigMap, Secret, List)",
                "refused/kinds.yaml:15:14: metadata.namespace: \"kube-system\": only the `default` namespace is supported",
                "refused/kinds.yaml:19:14: spec.containers[0].image: \"busybox:1.36\": no command to run it; map the image with --image-map FILE",
            ],
        ),
        (
            "refused/ingress.yaml",
            vec![
                "refused/ingress.yaml:6:3: spec.tls: not supported (supported: rules, ingressClassName, defaultBackend)",
                "refused/ingress.yaml:14:23: spec.rules[0].http.paths[0].pathType: \"Exact\": not supported (supported: Prefix, ImplementationSpecific",
            ],
        ),
        (
            "refused/broken.yaml",
            vec!["refused/broken.yaml:6:1: not YAML: while parsing a flow sequence"],
        ),
    ] {
        let out = import(&["-f", file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{file}: wrote {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        for line in &expected {
            assert!(stderr.contains(line), "{file}: no {line:?} in:\n{stderr}");
        }
        let errors = stderr.lines().filter(|l| l.starts_with("refused/")).count();
        assert_eq!(errors, expected.len().max(1), "{file}: {stderr}");
        assert!(stderr.contains("nothing written"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // One refused workload is one error: the Service and the Ingress that lead to it are not
    // refused again.
    let out = import(&["-f", "shop"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("shop/web.yaml:27:18: spec.template.spec.containers[0].image: \"registry.example.com/shop/web:1.4.2\": no command to run it"),
        "{stderr}"
    );
    assert!(
        stderr.contains("flotilla import: 1 error; nothing written"),
        "{stderr}"
    );
    // A whole directory at once: every file's refusals, none hidden behind the first.
    let out = import(&["-f", "refused"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    for file in ["broken", "ingress", "kinds", "sidecar", "volumes"] {
        assert!(
            stderr.contains(&format!("refused/{file}.yaml:")),
            "{file}: {stderr}"
        );
    }
}

#[test]
fn the_shop_imports_and_runs_behind_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("flotilla.toml");
    let out = import(&[
        "-f",
        "shop",
        "--image-map",
        "images.toml",
        "-o",
        out_file.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Warnings a user must read: secrets in plain text, ports, a request become a limit.
    for w in [
        "warning: shop/web.yaml:",
        "API_KEY come from Secrets",
        "DB_PASSWORD come from Secrets",
        "the process must listen there, not on 8080",
        "shop/api.yaml:37:27: items[0].spec.template.spec.containers[0].resources.requests.memory: a request without a limit",
    ] {
        assert!(stderr.contains(w), "no {w:?} in:\n{stderr}");
    }
    assert!(
        !stderr.contains("s3cr3t") && !stderr.contains("hunter2"),
        "{stderr}"
    );
    // Values of Secrets are in it: readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let text = std::fs::read_to_string(&out_file).unwrap();
    let file: toml::Table = text.parse().unwrap();
    let web = &file["service"]["web"];
    assert_eq!(web["command"].as_str(), Some("flotilla-demo"));
    assert_eq!(web["replicas"].as_integer(), Some(2));
    assert_eq!(web["env"]["GREETING"].as_str(), Some("howdy"));
    assert_eq!(web["env"]["LOG_LEVEL"].as_str(), Some("info"));
    assert_eq!(web["env"]["API_KEY"].as_str(), Some("s3cr3t-key"));
    assert_eq!(
        web["env"]["POD_NAME"].as_str(),
        Some("${FLOTILLA_INSTANCE}")
    );
    assert_eq!(web["resources"]["memory"].as_str(), Some("128Mi"));
    assert_eq!(web["stop"]["grace_period"].as_str(), Some("20s"));
    assert_eq!(web["deploy"]["pre_stop_delay"].as_str(), Some("1s"));
    assert_eq!(web["deploy"]["max_unavailable"].as_integer(), Some(0));
    assert_eq!(
        web["probes"]["liveness"]["http"]["port"].as_str(),
        Some("http")
    );
    let api = &file["service"]["api"];
    assert_eq!(api["args"][1].as_str(), Some("${PORT}"));
    assert_eq!(api["ports"][0].as_str(), Some("p9000"));
    let routes = |svc: &toml::Value| -> Vec<(String, String)> {
        svc["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get("host")
                        .and_then(|h| h.as_str())
                        .unwrap_or("*")
                        .to_string(),
                    r["path"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        routes(web),
        [("shop.example.com".to_string(), "/".to_string())]
    );
    assert_eq!(
        routes(api),
        [
            ("shop.example.com".to_string(), "/api".to_string()),
            ("api.example.com".to_string(), "/".to_string())
        ]
    );

    // And it runs: `up` on the imported file, requests through the gateway by host.
    let services = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let up = Up::start(&services);
    up.wait_ready("web", 2);
    up.wait_ready("api", 1);
    let body = wait_for(
        "the shop through the gateway",
        Duration::from_secs(30),
        || {
            up.through_gateway("shop.example.com", "/")
                .filter(|r| r.status == 200)
                .map(|r| r.body)
        },
    );
    assert!(body.starts_with("howdy from web-"), "{body}");
    let body = wait_for(
        "the api through the gateway",
        Duration::from_secs(30),
        || {
            up.through_gateway("api.example.com", "/")
                .filter(|r| r.status == 200)
                .map(|r| r.body)
        },
    );
    assert!(body.starts_with("api says from api-"), "{body}");

    // And back: `flotilla export` of the stored services is YAML the real kubectl reads as
    // typed objects, and importing it gives the services that are stored.
    let home = tempfile::tempdir().unwrap();
    let mut exported = Vec::new();
    for name in ["web", "api"] {
        let path = dir.path().join(format!("{name}.k8s.yaml"));
        let out = up.cli(&["export", "service", name, "-o", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "export {name}: {stderr}");
        assert!(
            stderr.contains(&format!("warning: {name}: image:")),
            "{stderr}"
        );
        let kubectl = Command::new("kubectl")
            .args(["set", "image", "--local", "-o", "name", "-f"])
            .arg(&path)
            .arg("*=registry.example.com/shop/x:1")
            .arg("--cache-dir")
            .arg(home.path().join("cache"))
            .env("HOME", home.path())
            .env("KUBECONFIG", home.path().join("none"))
            .output()
            .expect("kubectl (on the PATH of every machine of this project)");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&kubectl.stdout),
            String::from_utf8_lossy(&kubectl.stderr),
        );
        assert!(
            stdout.contains(&format!("deployment.apps/{name}")),
            "kubectl: {stdout}{stderr}"
        );
        // The Service and the Ingress decode too (a Service has no pod template to set).
        assert!(
            !stderr.contains("unable to decode") && !stderr.contains("cannot unmarshal"),
            "kubectl: {stderr}"
        );
        assert!(
            stderr.contains("*v1.Service") && stderr.contains("*v1.Ingress"),
            "{stderr}"
        );
        exported.push(path);
    }
    let mut args = Vec::new();
    for p in &exported {
        args.push("-f");
        args.push(p.to_str().unwrap());
    }
    let again = import(&args);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let again = flotilla_spec::parse_file(&String::from_utf8_lossy(&again.stdout), "again")
        .unwrap()
        .service;
    for name in ["web", "api"] {
        let stored = up.api_get(&format!("/api/v1/services/{name}"))["spec"].clone();
        assert_eq!(
            serde_json::to_value(&again[name]).unwrap(),
            stored,
            "{name}"
        );
    }
}
