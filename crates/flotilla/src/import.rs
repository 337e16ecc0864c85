//! `flotilla import`: Kubernetes manifests → a flotilla file (see `flotilla_kube::import`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use flotilla_kube::{ImageMap, Input};

/// Reads the manifests, prints every refusal (and exits 1, writing nothing) or the file.
pub fn run(files: &[PathBuf], output: Option<&Path>, image_map: Option<&Path>) -> Result<ExitCode> {
    let images = match image_map {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            ImageMap::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => ImageMap::default(),
    };
    let inputs = read_inputs(files)?;
    let imported = match flotilla_kube::import(&inputs, &images) {
        Ok(i) => i,
        Err(errors) => {
            let mut err = std::io::stderr().lock();
            for e in &errors {
                let _ = writeln!(err, "{e}");
            }
            let _ = writeln!(
                err,
                "flotilla import: {} error{}; nothing written",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    for w in &imported.warnings {
        eprintln!("warning: {w}");
    }
    if imported.services.is_empty() {
        bail!(
            "no Deployment or Pod in {}: nothing to import",
            shown(files)
        );
    }
    let map = image_map.map_or_else(String::new, |p| format!(" --image-map {}", p.display()));
    let text = format!(
        "# flotilla import -f {}{map}\n\n{}",
        shown(files),
        imported.to_toml()
    );
    // What flotilla itself would refuse (a name it does not take, say) is said now, not at
    // `apply`.
    let name = output.map_or_else(|| "(output)".to_string(), |p| p.display().to_string());
    if let Err(errors) = flotilla_spec::parse_file(&text, &name) {
        eprint!("{errors}");
        eprintln!(
            "flotilla import: the services imported are not valid flotilla services; nothing written"
        );
        return Ok(ExitCode::FAILURE);
    }
    match output {
        Some(path) => write_output(path, &text, imported.secrets)
            .with_context(|| format!("writing {}", path.display()))?,
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("writing stdout")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A file holding values of Secrets is readable by its owner only (0600), as a new file and
/// as one written over.
fn write_output(path: &Path, text: &str, secrets: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secrets {
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    if secrets {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(text.as_bytes())
}

fn shown(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" -f ")
}

/// The files named, a directory's `.yaml`, `.yml` and `.json` files (sorted, not recursive,
/// as `kubectl apply -f DIR`), and stdin for `-`.
fn read_inputs(files: &[PathBuf]) -> Result<Vec<Input>> {
    let mut inputs = Vec::new();
    for path in files {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            inputs.push(Input {
                file: "(stdin)".into(),
                text,
            });
            continue;
        }
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let mut found = Vec::new();
        if meta.is_dir() {
            for entry in
                std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
            {
                let p = entry
                    .with_context(|| format!("reading {}", path.display()))?
                    .path();
                let manifest = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
                if manifest && p.is_file() {
                    found.push(p);
                }
            }
            found.sort();
            if found.is_empty() {
                bail!("{} holds no .yaml, .yml or .json file", path.display());
            }
        } else {
            found.push(path.clone());
        }
        for p in found {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            inputs.push(Input {
                file: p.display().to_string(),
                text,
            });
        }
    }
    Ok(inputs)
}
