//! What the store's test files share: a real etcd, and bounded waits on a store.
#![allow(dead_code, clippy::expect_used)] // tests: a panic is a failed test

pub mod etcd;

use std::time::Duration;

use flotilla_store::{KeyValue, Precondition, Store, StoreError, Watch, WatchEvent};
use tokio::time::timeout;

/// The longest any single store step may take in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Writes `value` at `key` under `pre`, which must succeed in time.
pub async fn put(store: &dyn Store, key: &str, value: &str, pre: Precondition) -> KeyValue {
    timeout(WAIT, store.put(key, value.as_bytes().to_vec(), pre))
        .await
        .expect("put timed out")
        .expect("put")
}

/// The next item of `watch`, which must come in time.
pub async fn next_event(watch: &mut Watch) -> Result<WatchEvent, StoreError> {
    timeout(WAIT, watch.next())
        .await
        .expect("no watch event in time")
        .expect("watch ended")
}
