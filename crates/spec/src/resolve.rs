//! Path resolution for specs read from a file (string manipulation only, no filesystem access).

use std::path::{Component, Path, PathBuf};

use crate::service::ServiceSpec;

/// Makes the spec's paths absolute against `base_dir` (the directory of the flotilla file):
/// a relative `workdir` is joined to it, an absent `workdir` becomes `base_dir`, and a
/// `command` that contains `/` but is relative (`./bin/server`) is joined to it. A plain
/// command name (`python3`) stays as it is, for lookup in `PATH`. `.` components are removed;
/// `..` is kept (it cannot be resolved without looking at the filesystem).
pub fn resolve_paths(spec: &mut ServiceSpec, base_dir: &str) {
    let base = Path::new(base_dir);
    spec.workdir = Some(match spec.workdir.as_deref() {
        None => clean(base),
        Some(w) => clean(&base.join(w)),
    });
    if spec.command.contains('/') && !Path::new(&spec.command).is_absolute() {
        spec.command = clean(&base.join(&spec.command));
    }
}

fn clean(p: &Path) -> String {
    let mut out = PathBuf::new();
    for c in p.components() {
        if c != Component::CurDir {
            out.push(c.as_os_str());
        }
    }
    if out.as_os_str().is_empty() {
        return ".".to_string();
    }
    out.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &str, workdir: Option<&str>) -> ServiceSpec {
        let mut s: ServiceSpec = serde_json::from_str(r#"{"command":"x"}"#).unwrap();
        s.command = command.into();
        s.workdir = workdir.map(Into::into);
        s
    }

    #[test]
    fn resolves() {
        let mut s = spec("./bin/server", None);
        resolve_paths(&mut s, "/srv/app");
        assert_eq!(s.command, "/srv/app/bin/server");
        assert_eq!(s.workdir.as_deref(), Some("/srv/app"));

        let mut s = spec("python3", Some("data"));
        resolve_paths(&mut s, "/srv/app/");
        assert_eq!(s.command, "python3");
        assert_eq!(s.workdir.as_deref(), Some("/srv/app/data"));

        let mut s = spec("/usr/bin/env", Some("/var/lib/x"));
        resolve_paths(&mut s, "/srv/app");
        assert_eq!(s.command, "/usr/bin/env");
        assert_eq!(s.workdir.as_deref(), Some("/var/lib/x"));

        let mut s = spec("../tools/run", Some("./a/./b"));
        resolve_paths(&mut s, "/srv/app");
        assert_eq!(s.command, "/srv/app/../tools/run");
        assert_eq!(s.workdir.as_deref(), Some("/srv/app/a/b"));
    }

    #[test]
    fn idempotent() {
        let mut s = spec("./bin/server", Some("w"));
        resolve_paths(&mut s, "/base");
        let once = s.clone();
        resolve_paths(&mut s, "/other");
        assert_eq!(s, once);
    }
}
