//! Where things live on disk, and how the CLI finds a local `flotilla up`.
//!
//! - Data directory (store, logs, admin token): `--data-dir`, `FLOTILLA_DATA_DIR`, the file's
//!   `[up] data_dir`, else `$XDG_STATE_HOME/flotilla` or `~/.local/state/flotilla`.
//! - Context files, one per data directory, written by `up` (and removed when it exits) and
//!   read by every other command: `$FLOTILLA_CONFIG_DIR/contexts/`, else
//!   `$XDG_CONFIG_HOME/flotilla/contexts/` or `~/.config/flotilla/contexts/`. Each holds the API
//!   address, the token file's path, the data directory and the writer's pid. The CLI uses the
//!   one of `--data-dir` when given, else the only running one, else asks which.
//! - `--api`/`FLOTILLA_API` and `--token`/`FLOTILLA_TOKEN` override the context file.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_API: &str = "127.0.0.1:7070";
pub const DEFAULT_GATEWAY: &str = "127.0.0.1:8080";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";
pub const TOKEN_FILE: &str = "admin.token";

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return Ok(PathBuf::from(dir).join("flotilla"));
    }
    match home() {
        Some(h) => Ok(h.join(".local/state/flotilla")),
        None => bail!("cannot choose a data directory: set --data-dir or FLOTILLA_DATA_DIR"),
    }
}

pub fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FLOTILLA_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(dir).join("flotilla"));
    }
    match home() {
        Some(h) => Ok(h.join(".config/flotilla")),
        None => {
            bail!("cannot find the context file: set FLOTILLA_CONFIG_DIR, or --api and --token")
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextFile {
    /// Base URL of the API, e.g. `http://127.0.0.1:7070`.
    pub api: String,
    pub token_file: PathBuf,
    pub gateway: String,
    pub metrics: String,
    pub pid: u32,
    /// The data directory of the `up` that wrote it (canonical).
    #[serde(default)]
    pub data_dir: PathBuf,
    /// The cluster CA of an `https://` API (`flotilla server`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// Where the context files live: one per data directory, so that two `up`s (each with its
/// own data directory) never overwrite each other's.
pub fn contexts_dir() -> Result<PathBuf> {
    Ok(config_dir()?.join("contexts"))
}

/// `<last component>-<16 hex digits of the canonical path>.json`.
fn context_file_name(data_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let base: String = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .trim_start_matches('.')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let digest = flotilla_spec::content_digest(data_dir.as_os_str().as_bytes());
    format!("{base}-{digest}.json")
}

/// `path` made absolute and canonical when it exists (as given otherwise).
pub fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Writes the context file of `ctx.data_dir` (atomically, readable only by its owner).
pub fn write_context(ctx: &ContextFile) -> Result<PathBuf> {
    let dir = contexts_dir()?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(context_file_name(&ctx.data_dir));
    let mut text = serde_json::to_vec_pretty(ctx)?;
    text.push(b'\n');
    write_private(&path, &text)?;
    Ok(path)
}

/// Removes the context file at `path` if this process wrote it (never another's).
pub fn remove_own_context(path: &Path) {
    let ours = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ContextFile>(&b).ok())
        .is_some_and(|c| c.pid == std::process::id());
    if ours {
        let _ = fs::remove_file(path);
    }
}

/// Whether process `pid` is alive (it may belong to another user).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

/// The context files of running `up`s, by path. Files whose writer is gone (killed before it
/// could remove its file) are skipped; unreadable ones are skipped with a warning.
pub fn live_contexts() -> Result<Vec<(PathBuf, ContextFile)>> {
    let dir = contexts_dir()?;
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let parsed = fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice::<ContextFile>(&b).map_err(Into::into));
        match parsed {
            Ok(ctx) if alive(ctx.pid) => found.push((path, ctx)),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable context file")
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// The running `up` the CLI talks to: the one of `data_dir` when given, else the only one
/// running. `None` when none runs (the caller falls back to the defaults); an error naming
/// every candidate when several run and nothing says which.
pub fn find_context(data_dir: Option<&Path>) -> Result<Option<ContextFile>> {
    let mut live = live_contexts()?;
    if let Some(dir) = data_dir {
        let dir = canonical(dir);
        return Ok(live
            .into_iter()
            .map(|(_, c)| c)
            .find(|c| canonical(&c.data_dir) == dir));
    }
    match live.len() {
        0 => Ok(None),
        1 => Ok(live.pop().map(|(_, c)| c)),
        n => {
            let list: Vec<String> = live
                .iter()
                .map(|(_, c)| {
                    format!(
                        "  --data-dir {}   ({}, pid {})",
                        c.data_dir.display(),
                        c.api,
                        c.pid
                    )
                })
                .collect();
            bail!(
                "{n} flotilla processes are running; choose one with --data-dir (or FLOTILLA_DATA_DIR), or pass --api and --token:\n{}",
                list.join("\n")
            )
        }
    }
}

/// Reads the admin token, or creates one readable only by its owner.
pub fn ensure_token(data_dir: &Path) -> Result<String> {
    ensure_secret(data_dir, TOKEN_FILE)
}

/// The file holding the key that signs join, node and gateway tokens.
pub const SIGNING_KEY_FILE: &str = "signing.key";

/// The control plane's token signer, its key created on first start.
pub fn signer(data_dir: &Path) -> Result<flotilla_server::auth::Signer> {
    let key = ensure_secret(data_dir, SIGNING_KEY_FILE)?;
    Ok(flotilla_server::auth::Signer::new(key.as_bytes()))
}

/// Writes `bytes` to `path` through a temporary file renamed into place, readable only by
/// its owner whatever mode an old file had ([`flotilla_pki::write_private`]).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(flotilla_pki::write_private(path, bytes)?)
}

/// Reads a secret of the data directory, or creates a random one readable only by its owner.
fn ensure_secret(data_dir: &Path, file: &str) -> Result<String> {
    let path = data_dir.join(file);
    match fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            let mode = fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "token file is readable by others; tightening to 0600");
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            }
            return Ok(t.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    // Written to a private temporary file and renamed into place, so the secret is never
    // readable by others, whatever mode an old file had.
    let secret = random_token();
    write_private(&path, format!("{secret}\n").as_bytes())?;
    Ok(secret)
}

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn read_token(path: &Path) -> Result<String> {
    let t = fs::read_to_string(path)
        .with_context(|| format!("reading the token from {}", path.display()))?;
    Ok(t.trim().to_string())
}

/// `host:port` or a URL → a base URL (`http://` for a bare address).
pub fn api_url(addr: &str) -> String {
    api_url_tls(addr, false)
}

/// The same, `https://` for a bare address when `tls` (a fleet's server, or a CA given). A
/// list of servers (`server-1:7443,server-2:7443`) gives a list of URLs, comma-separated.
pub fn api_url_tls(addr: &str, tls: bool) -> String {
    let one = |addr: &str| {
        if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else if tls {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    };
    let urls: Vec<String> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(one)
        .collect();
    if urls.is_empty() {
        return one(addr.trim());
    }
    urls.join(",")
}
