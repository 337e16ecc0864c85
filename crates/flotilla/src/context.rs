//! Where things live on disk, and how the CLI finds a local `flotilla up`.
//!
//! - Data directory (store, logs, admin token): `--data-dir`, `FLOTILLA_DATA_DIR`, the file's
//!   `[up] data_dir`, else `$XDG_STATE_HOME/flotilla` or `~/.local/state/flotilla`.
//! - Context file, written by `up` and read by every other command:
//!   `$FLOTILLA_CONFIG_DIR/context.json`, else `$XDG_CONFIG_HOME/flotilla/context.json` or
//!   `~/.config/flotilla/context.json`. It holds the API address and the token file's path.
//! - `--api`/`FLOTILLA_API` and `--token`/`FLOTILLA_TOKEN` override the context file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
}

pub fn write_context(ctx: &ContextFile) -> Result<PathBuf> {
    let dir = config_dir()?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("context.json");
    let tmp = dir.join(format!("context.json.{}", std::process::id()));
    let text = serde_json::to_vec_pretty(ctx)?;
    {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&text)?;
    }
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub fn read_context() -> Result<Option<(PathBuf, ContextFile)>> {
    let path = config_dir()?.join("context.json");
    match fs::read(&path) {
        Ok(bytes) => {
            let ctx = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a valid context file", path.display()))?;
            Ok(Some((path, ctx)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads the admin token, or creates one readable only by its owner.
pub fn ensure_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(TOKEN_FILE);
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
    // Written to a private temporary file and renamed into place, so the token is never
    // readable by others, whatever mode an old file had.
    let token = random_token();
    let tmp = data_dir.join(format!("{TOKEN_FILE}.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    Ok(token)
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

/// `host:port` or a URL → a base URL.
pub fn api_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
}
