//! `flotilla store migrate`: a stopped server's embedded store, copied into an empty etcd.
//!
//! Every key is copied with its value as it is (objects keep their uid, names, specs, service
//! revisions, instances' desired state and events); etcd numbers the writes itself, so
//! `resourceVersion`s are new. Nothing is copied into an etcd namespace that holds anything,
//! and the copy is read back and compared before the command says it is done.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use flotilla_store::{EmbeddedStore, EtcdOptions, EtcdStore, Precondition, Store, error_chain};

/// What the store's keys hold, by their first segment (`services`, `instances`, …).
fn kinds<'a>(keys: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for key in keys {
        let path = key.trim_start_matches('/');
        let path = path.strip_prefix("registry/").unwrap_or(path);
        let kind = path.split('/').next().unwrap_or("");
        *counts.entry(kind).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn store_error(e: flotilla_store::StoreError) -> anyhow::Error {
    anyhow!("{}", error_chain(&e))
}

pub async fn run(from: &str, to: &str, tls: &crate::EtcdTlsArgs) -> Result<ExitCode> {
    let Some(path) = from.strip_prefix("redb:") else {
        bail!(
            "invalid --from {from:?}: expected redb:PATH, the embedded store (store.redb in the server's data directory)"
        );
    };
    let Some(urls) = to.strip_prefix("etcd:") else {
        bail!("invalid --to {to:?}: expected etcd:URL[,URL…], such as etcd:http://etcd-1:2379");
    };
    let endpoints: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        bail!("invalid --to {to:?}: no etcd address after etcd:");
    }
    let path = Path::new(path);
    if !path.is_file() {
        bail!("no embedded store at {}", path.display());
    }
    let source = EmbeddedStore::open(path)
        .map_err(store_error)
        .with_context(|| {
            format!(
                "opening {} (stop the server or `up` that uses it first)",
                path.display()
            )
        })?;
    let options = EtcdOptions {
        tls: crate::fleet::etcd_tls(&endpoints, tls)?,
        ..EtcdOptions::default()
    };
    let target = EtcdStore::connect(&endpoints, options)
        .await
        .map_err(store_error)
        .with_context(|| format!("opening the store on etcd at {urls}"))?;
    let there = target.list("").await.map_err(store_error)?;
    if !there.items.is_empty() {
        bail!(
            "the etcd at {urls} already holds {} keys under /flotilla/ ({}): migrate into an empty one (and stop any server on it)",
            there.items.len(),
            kinds(there.items.iter().map(|kv| kv.key.as_str()))
        );
    }
    let items = source.list("").await.map_err(store_error)?.items;
    for kv in &items {
        target
            .put(&kv.key, kv.value.clone(), Precondition::Absent)
            .await
            .map_err(store_error)
            .with_context(|| format!("copying {}", kv.key))?;
    }
    // Read back: the same keys with the same values, nothing else.
    let copied = target.list("").await.map_err(store_error)?.items;
    let same = copied.len() == items.len()
        && copied
            .iter()
            .zip(&items)
            .all(|(a, b)| a.key == b.key && a.value == b.value);
    if !same {
        bail!(
            "the copy in etcd differs from {} ({} keys there, {} here): something wrote to it meanwhile; clear /flotilla/ in etcd and migrate again",
            path.display(),
            copied.len(),
            items.len()
        );
    }
    source.close();
    println!(
        "copied {} keys ({}) from {} to etcd at {urls}, and read them back",
        items.len(),
        kinds(items.iter().map(|kv| kv.key.as_str())),
        path.display()
    );
    println!("next: flotilla server --etcd {urls} (the embedded store is left as it was)");
    Ok(ExitCode::SUCCESS)
}
