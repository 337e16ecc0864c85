//! The etcd backend: the [`Store`] trait on an etcd cluster, for servers that share their state.
//!
//! etcd already has the store's semantics, so each operation is one etcd request: the global
//! revision is etcd's, compare-and-swap is a transaction comparing `mod_revision` (or
//! `create_revision = 0` for "absent"), lists are range reads at one revision (paged, so a large
//! list never meets gRPC's message limit) and watches start at a revision and answer
//! `Compacted` when etcd compacted it. Every key lives under a namespace (`/flotilla/` by
//! default), so one etcd cluster can hold other data too.
//!
//! Revisions are etcd's minus one: a fresh etcd is at revision 1 before its first write, the
//! embedded store at 0, so both number their writes 1, 2, 3, … and callers see the same
//! numbers from either backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::embedded::offer;
use crate::{KeyValue, ListResult, Precondition, Revision, Store, StoreError, Watch, WatchEvent};

/// Keys one page of a list reads (well below gRPC's 4 MiB message limit for typical objects).
const LIST_PAGE: i64 = 500;

/// Tuning of an [`EtcdStore`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Prefix of every key in etcd (default `/flotilla/`).
    pub namespace: String,
    /// Events a watcher may have queued before it is dropped with `Compacted` (default 1,024).
    pub watch_buffer: usize,
    /// How long a connection attempt to a member may take (default 2 s).
    pub connect_timeout: Duration,
    /// How long one request may take before it fails (default 5 s).
    pub request_timeout: Duration,
    /// TLS to `https://` members: the CA that signed them, and this client's certificate when
    /// etcd asks for one (`--client-cert-auth`).
    pub tls: Option<EtcdTls>,
}

/// PEM texts for TLS to etcd.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    /// Certificate and private key of this client.
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdTls {
    // The private key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            namespace: "/flotilla/".to_string(),
            watch_buffer: 1_024,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// A [`Store`] on an etcd cluster. Cheap to share: the client multiplexes one connection.
pub struct EtcdStore {
    client: Client,
    namespace: String,
    /// Highest revision (ours, etcd's − 1) seen in any answer.
    revision: Arc<AtomicU64>,
    watch_buffer: usize,
    request_timeout: Duration,
    endpoints: String,
    closed: CancellationToken,
}

fn etcd_error(context: String) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |e| {
        let unreachable = match &e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            // A connection that broke under a request comes back as `Unknown`, "transport
            // error" (with the broken pipe as its source).
            etcd_client::Error::GRpcStatus(status) => {
                matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) || (status.code() == tonic::Code::Unknown
                    && status.message() == "transport error")
            }
            _ => false,
        };
        if unreachable {
            StoreError::Unavailable {
                store: "etcd",
                context,
                source: e.into(),
            }
        } else {
            StoreError::backend(context, e)
        }
    }
}

/// Whether a request never reached a member (its connection was refused or failed): safe to
/// send again, through another member.
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect error")
        }
        _ => false,
    }
}

/// Whether a read may be sent again: not sent, or refused by a member without a leader now.
fn read_again(e: &etcd_client::Error) -> bool {
    not_sent(e)
        || matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

/// Our revision of an etcd revision.
fn ours(etcd: i64) -> Revision {
    u64::try_from(etcd).unwrap_or(0).saturating_sub(1)
}

/// etcd's revision of ours.
fn theirs(ours: Revision) -> i64 {
    i64::try_from(ours)
        .unwrap_or(i64::MAX - 1)
        .saturating_add(1)
}

/// The first key after every key starting with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): to the end of the keyspace.
    vec![0]
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:2379`, …) and reads its revision.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<Self, StoreError> {
        let shown = endpoints.join(",");
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if let Some(tls) = &options.tls {
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(config);
        }
        let client = Client::connect(endpoints, Some(connect))
            .await
            .map_err(etcd_error(format!("connecting to etcd at {shown}")))?;
        let store = Self {
            client,
            namespace: options.namespace,
            revision: Arc::new(AtomicU64::new(0)),
            watch_buffer: options.watch_buffer.max(1),
            request_timeout: options.request_timeout,
            endpoints: shown,
            closed: CancellationToken::new(),
        };
        // Learn the current revision: any read answers it in its header.
        let kv = store.client.kv_client();
        let probe = store
            .again(read_again, || {
                let (mut kv, key) = (kv.clone(), store.full(""));
                async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await
            .map_err(etcd_error(format!(
                "reading from etcd at {}",
                store.endpoints
            )))?;
        store.saw(probe.header().map_or(0, |h| h.revision()));
        Ok(store)
    }

    /// The endpoints this store was given, for messages.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Drops the history before `revision` (ours): watches from before it answer `Compacted`.
    /// etcd keeps every revision until it is compacted; a server compacts as the embedded store
    /// trims its history.
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.open()?;
        let mut kv = self.client.kv_client();
        kv.compact(theirs(revision), None)
            .await
            .map_err(etcd_error(format!(
                "compacting etcd to revision {revision}"
            )))?;
        Ok(())
    }

    /// Ends every watch and refuses what comes after.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Runs `request` until it succeeds, fails in a way `retry` does not accept, or the
    /// request timeout passes: the client may route a request to a member that is down (then
    /// another answers the next attempt) or in the middle of an election.
    async fn again<T, Fut>(
        &self,
        retry: fn(&etcd_client::Error) -> bool,
        mut request: impl FnMut() -> Fut,
    ) -> Result<T, etcd_client::Error>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        loop {
            match request().await {
                Err(e) if retry(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "etcd request not answered; sending it again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    fn open(&self) -> Result<(), StoreError> {
        if self.closed.is_cancelled() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn saw(&self, etcd_revision: i64) {
        self.revision
            .fetch_max(ours(etcd_revision), Ordering::AcqRel);
    }

    /// Runs the write `txn` of `key` under `pre`: etcd's revision after it and the answers of
    /// its operations, or `Conflict` (with what the `else` read found) when `pre` did not hold.
    async fn write(
        &self,
        txn: Txn,
        key: &str,
        pre: Precondition,
        doing: &str,
    ) -> Result<(i64, Vec<TxnOpResponse>), StoreError> {
        let kv = self.client.kv_client();
        let answer = self
            .again(not_sent, || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(etcd_error(format!("{doing} {key} in etcd")))?;
        let revision = answer.header().map_or(0, |h| h.revision());
        self.saw(revision);
        let responses = answer.op_responses();
        if !answer.succeeded() {
            return Err(StoreError::Conflict {
                key: key.to_string(),
                expected: pre,
                actual: found(&responses),
            });
        }
        Ok((revision, responses))
    }

    fn convert(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        convert(&self.namespace, kv)
    }
}

fn convert(namespace: &str, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let full = kv
        .key_str()
        .map_err(|e| StoreError::backend("a key in etcd is not UTF-8".to_string(), e))?;
    let key = full.strip_prefix(namespace).ok_or_else(|| {
        StoreError::backend(
            format!("etcd answered key {full:?}, outside the namespace {namespace:?}"),
            "unexpected key",
        )
    })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: ours(kv.create_revision()),
        mod_revision: ours(kv.mod_revision()),
        version: u64::try_from(kv.version()).unwrap_or(0),
    })
}

/// What an `else` branch's read found: the key's `mod_revision` (ours), if it exists.
fn found(responses: &[TxnOpResponse]) -> Option<Revision> {
    responses.iter().find_map(|r| match r {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| ours(kv.mod_revision())),
        _ => None,
    })
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.open()?;
        let kv = self.client.kv_client();
        let answer = self
            .again(read_again, || {
                let (mut kv, full) = (kv.clone(), self.full(key));
                async move { kv.get(full, None).await }
            })
            .await
            .map_err(etcd_error(format!("reading {key} from etcd")))?;
        self.saw(answer.header().map_or(0, |h| h.revision()));
        answer.kvs().first().map(|kv| self.convert(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        self.open()?;
        let kv = self.client.kv_client();
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        let mut items = Vec::new();
        let mut from = full.into_bytes();
        let mut at = 0i64;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if at > 0 {
                options = options.with_revision(at);
            }
            let page = self
                .again(read_again, || {
                    let (mut kv, from, options) = (kv.clone(), from.clone(), options.clone());
                    async move { kv.get(from, Some(options)).await }
                })
                .await
                .map_err(etcd_error(format!("listing {prefix:?} from etcd")))?;
            if at == 0 {
                at = page.header().map_or(0, |h| h.revision());
                self.saw(at);
            }
            for item in page.kvs() {
                items.push(self.convert(item)?);
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(ListResult {
            items,
            revision: ours(at),
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<KeyValue, StoreError> {
        self.open()?;
        let full = self.full(key);
        let compare = match pre {
            Precondition::None => None,
            Precondition::Absent => {
                Some(Compare::create_revision(full.clone(), CompareOp::Equal, 0))
            }
            Precondition::ModRevision(r) => Some(Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                theirs(r),
            )),
        };
        let put = TxnOp::put(
            full.clone(),
            value.clone(),
            Some(PutOptions::new().with_prev_key()),
        );
        let txn = match compare {
            Some(c) => Txn::new()
                .when([c])
                .and_then([put])
                .or_else([TxnOp::get(full.clone(), None)]),
            None => Txn::new().and_then([put]),
        };
        let (revision, responses) = self.write(txn, key, pre, "writing").await?;
        let prev = responses.iter().find_map(|r| match r {
            TxnOpResponse::Put(p) => p.prev_key().cloned(),
            _ => None,
        });
        let prev = prev.map(|p| self.convert(&p)).transpose()?;
        let revision = ours(revision);
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
        })
    }

    async fn delete(&self, key: &str, pre: Precondition) -> Result<Option<KeyValue>, StoreError> {
        self.open()?;
        let full = self.full(key);
        let delete = TxnOp::delete(full.clone(), Some(DeleteOptions::new().with_prev_key()));
        let txn = match pre {
            Precondition::None => Txn::new().and_then([delete]),
            // Deleting what must not exist: nothing to do, unless it exists.
            Precondition::Absent => Txn::new()
                .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
                .or_else([TxnOp::get(full.clone(), None)]),
            Precondition::ModRevision(r) => Txn::new()
                .when([Compare::mod_revision(
                    full.clone(),
                    CompareOp::Equal,
                    theirs(r),
                )])
                .and_then([delete])
                .or_else([TxnOp::get(full.clone(), None)]),
        };
        let (_, responses) = self.write(txn, key, pre, "deleting").await?;
        let prev = responses.iter().find_map(|r| match r {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
            _ => None,
        });
        prev.map(|p| self.convert(&p)).transpose()
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        self.open()?;
        let full = self.full(prefix);
        let options = WatchOptions::new()
            .with_range(prefix_end(full.as_bytes()))
            .with_start_revision(theirs(after) + 1)
            .with_prev_key();
        // etcd tells a watch it starts in compacted history only after creating it, in a later
        // answer; a read at the start revision says so at once, as the embedded store does.
        let start = theirs(after) + 1;
        let compacted = start <= theirs(self.revision()) && {
            let mut kv = self.client.kv_client();
            let read = kv
                .get(
                    full.clone(),
                    Some(GetOptions::new().with_count_only().with_revision(start)),
                )
                .await;
            match read {
                Ok(_) => false,
                Err(etcd_client::Error::GRpcStatus(status))
                    if status.code() == tonic::Code::OutOfRange
                        && status.message().contains("compacted") =>
                {
                    true
                }
                Err(e) => {
                    return Err(StoreError::backend(
                        format!("watching {prefix:?} in etcd"),
                        e,
                    ));
                }
            }
        };
        let mut client = self.client.watch_client();
        let mut stream = client
            .watch(full, Some(options))
            .await
            .map_err(etcd_error(format!("watching {prefix:?} in etcd")))?;
        // The first answer says whether the watch exists, or why not.
        let first = stream
            .message()
            .await
            .map_err(etcd_error(format!("watching {prefix:?} in etcd")))?;
        let Some(first) = first else {
            return Err(StoreError::backend(
                format!("watching {prefix:?} in etcd"),
                "etcd closed the watch stream at once",
            ));
        };
        if first.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                requested: after,
                // etcd's oldest watchable revision is where a watch may start; ours is the
                // `after` just before it.
                oldest: ours(first.compact_revision()).saturating_sub(1),
            });
        }
        if compacted {
            // The answer that names the oldest revision follows the creation.
            let notice = tokio::time::timeout(self.request_timeout, stream.message()).await;
            let oldest = match notice {
                Ok(Ok(Some(answer))) if answer.compact_revision() > 0 => {
                    ours(answer.compact_revision()).saturating_sub(1)
                }
                _ => after + 1,
            };
            return Err(StoreError::Compacted {
                requested: after,
                oldest,
            });
        }
        if first.canceled() {
            return Err(StoreError::backend(
                format!("watching {prefix:?} in etcd"),
                first.cancel_reason().to_string(),
            ));
        }
        let (tx, rx) = mpsc::channel(self.watch_buffer + 1);
        let namespace = self.namespace.clone();
        let revision = self.revision.clone();
        let closed = self.closed.clone();
        let shown = prefix.to_string();
        let mut pending = vec![first];
        // Owned by the watch: it ends when the receiver is dropped, the store is closed, or
        // etcd ends the stream (the watcher is told why, then relists or resumes).
        tokio::spawn(async move {
            let mut last_sent = after;
            loop {
                for answer in pending.drain(..) {
                    if answer.compact_revision() > 0 {
                        let _ = tx.try_send(Err(StoreError::Compacted {
                            requested: last_sent,
                            oldest: ours(answer.compact_revision()).saturating_sub(1),
                        }));
                        return;
                    }
                    for event in answer.events() {
                        let Some(kv) = event.kv() else { continue };
                        let converted = match event.event_type() {
                            EventType::Put => convert(&namespace, kv).and_then(|kv| {
                                let prev = event
                                    .prev_kv()
                                    .map(|p| convert(&namespace, p))
                                    .transpose()?;
                                Ok(WatchEvent::Put { kv, prev })
                            }),
                            EventType::Delete => convert(&namespace, kv).and_then(|gone| {
                                let prev = event
                                    .prev_kv()
                                    .map(|p| convert(&namespace, p))
                                    .transpose()?;
                                Ok(WatchEvent::Delete {
                                    key: gone.key,
                                    revision: gone.mod_revision,
                                    prev,
                                })
                            }),
                        };
                        let event = match converted {
                            Ok(e) => e,
                            Err(e) => {
                                let _ = tx.try_send(Err(e));
                                return;
                            }
                        };
                        revision.fetch_max(event.revision(), Ordering::AcqRel);
                        if !offer(&tx, &event, last_sent, last_sent) {
                            return;
                        }
                        last_sent = event.revision();
                    }
                    if answer.canceled() {
                        let _ = tx.try_send(Err(StoreError::backend(
                            format!("watching {shown:?} in etcd"),
                            format!("etcd cancelled the watch: {}", answer.cancel_reason()),
                        )));
                        return;
                    }
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = closed.cancelled() => {
                        let _ = tx.try_send(Err(StoreError::Closed));
                        return;
                    }
                    next = stream.message() => match next {
                        Ok(Some(answer)) => pending.push(answer),
                        Ok(None) => {
                            let _ = tx.try_send(Err(StoreError::backend(
                                format!("watching {shown:?} in etcd"),
                                "etcd ended the watch stream",
                            )));
                            return;
                        }
                        Err(e) => {
                            let _ = tx.try_send(Err(StoreError::backend(
                                format!("watching {shown:?} in etcd"),
                                e,
                            )));
                            return;
                        }
                    },
                }
            }
        });
        Ok(Watch { rx })
    }

    fn revision(&self) -> Revision {
        self.revision.load(Ordering::Acquire)
    }
}

/// A key held under an etcd lease for as long as its holder renews it (see
/// [`EtcdStore::hold_exclusive`]).
pub struct Exclusive {
    lease: i64,
    client: Client,
    lost: CancellationToken,
    stop: CancellationToken,
    renewal: tokio::task::JoinHandle<()>,
}

impl Exclusive {
    /// Cancelled when the lease could not be renewed in time: another holder may have it now.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Gives the key up at once (revokes the lease), so the next holder need not wait for it
    /// to expire.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.renewal.await;
        let mut lease = self.client.lease_client();
        let _ = lease.revoke(self.lease).await;
    }
}

type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Renews `lease` once, over `stream` (opened again, through another member if need be, when
/// it broke); retries until it gets an answer. `Err` only when etcd says the lease is gone.
async fn renew_lease(
    client: &Client,
    lease: i64,
    stream: &mut Option<KeepAlive>,
) -> Result<(), String> {
    loop {
        if stream.is_none() {
            match client.lease_client().keep_alive(lease).await {
                Ok(opened) => *stream = Some(opened),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open a lease renewal stream; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some((keeper, answers)) = stream.as_mut() else {
            continue;
        };
        let answer = match keeper.keep_alive().await {
            Ok(()) => answers.message().await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Some(a)) if a.ttl() > 0 => return Ok(()),
            Ok(Some(_)) => return Err("etcd says the lease expired".to_string()),
            Ok(None) | Err(_) => {
                *stream = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

impl EtcdStore {
    /// Creates `key` (under the namespace) naming `holder`, bound to a lease of `ttl` that a
    /// task renews every third of it. `Held` if another holder has it. The hold is lost —
    /// [`Exclusive::lost`] fires — when a renewal fails or is answered too late, which is
    /// also when another process may take the key.
    pub async fn hold_exclusive(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Exclusive, StoreError> {
        self.open()?;
        let full = self.full(key);
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut leases = self.client.lease_client();
        let lease = leases
            .grant(seconds, None)
            .await
            .map_err(etcd_error(format!("taking a lease for {key} in etcd")))?
            .id();
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                full.clone(),
                holder,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(full.clone(), None)]);
        let mut kv = self.client.kv_client();
        let answer = kv
            .txn(txn)
            .await
            .map_err(etcd_error(format!("taking {key} in etcd")))?;
        self.saw(answer.header().map_or(0, |h| h.revision()));
        if !answer.succeeded() {
            let _ = leases.revoke(lease).await;
            let other = answer
                .op_responses()
                .iter()
                .find_map(|r| match r {
                    TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    _ => None,
                })
                .unwrap_or_default();
            return Err(StoreError::Held {
                key: key.to_string(),
                holder: other,
            });
        }
        let (lost, stop) = (CancellationToken::new(), CancellationToken::new());
        let (lost_task, stop_task) = (lost.clone(), stop.clone());
        let shown = key.to_string();
        let client = self.client.clone();
        // Owned by the `Exclusive`: ends at `release`, or when the hold is lost.
        let renewal = tokio::spawn(async move {
            let period = ttl / 3;
            let mut renewed = tokio::time::Instant::now();
            let mut stream = None;
            loop {
                tokio::select! {
                    () = stop_task.cancelled() => return,
                    () = tokio::time::sleep(period) => {}
                }
                let renew = renew_lease(&client, lease, &mut stream);
                match tokio::time::timeout_at(renewed + ttl, renew).await {
                    Ok(Ok(())) => renewed = tokio::time::Instant::now(),
                    outcome => {
                        let why = match outcome {
                            Ok(Err(why)) => why,
                            _ => "no renewal got through within the lease".to_string(),
                        };
                        tracing::error!(key = %shown, why, "lost the hold of an etcd key");
                        lost_task.cancel();
                        return;
                    }
                }
            }
        });
        Ok(Exclusive {
            lease,
            client: self.client.clone(),
            lost,
            stop,
            renewal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_and_prefix_ends() {
        assert_eq!(ours(1), 0);
        assert_eq!(ours(0), 0);
        assert_eq!(ours(11), 10);
        assert_eq!(theirs(10), 11);
        assert_eq!(prefix_end(b"/flotilla/a"), b"/flotilla/b".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
