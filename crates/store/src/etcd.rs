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
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::embedded::offer;
use crate::{
    KeyValue, ListResult, Precondition, Put, Revision, Store, StoreError, Watch, WatchEvent,
};

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
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    namespace: String,
    /// Highest revision (ours, etcd's − 1) seen in any answer.
    revision: Arc<AtomicU64>,
    watch_buffer: usize,
    request_timeout: Duration,
    endpoints: String,
    closed: CancellationToken,
    /// Set on a leader's view ([`EtcdStore::fenced`]): every write also compares the leader
    /// key's `create_revision` (its term), so a deposed leader writes nothing.
    fence: Option<Fence>,
    /// What connected this store, to reach each member on its own ([`EtcdStore::members`]).
    tls: Option<EtcdTls>,
    connect_timeout: Duration,
    /// Until when reads are serializable (answered by any live member from what it has,
    /// without a quorum): set when a linearizable read found etcd unavailable.
    degraded_until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How long reads stay serializable after a linearizable one found no quorum; then one read
/// tries for a quorum again.
const DEGRADED_READS: Duration = Duration::from_secs(10);

/// The leader key and the `create_revision` (etcd's) it had when this process took it.
#[derive(Debug, Clone)]
struct Fence {
    key: String,
    term: i64,
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

/// `connect` with `tls`'s CA (and client certificate), if any.
fn with_tls(connect: ConnectOptions, tls: Option<&EtcdTls>) -> ConnectOptions {
    let Some(tls) = tls else { return connect };
    let mut config = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(etcd_client::Identity::from_pem(cert, key));
    }
    connect.with_tls(config)
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
        let connect = with_tls(
            ConnectOptions::new()
                .with_connect_timeout(options.connect_timeout)
                .with_timeout(options.request_timeout)
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3)),
            options.tls.as_ref(),
        );
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
            fence: None,
            tls: options.tls,
            connect_timeout: options.connect_timeout,
            degraded_until: Arc::default(),
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
    /// With a `guard` (prefix, revision), a failed transaction whose precondition held failed
    /// on the guard: `Changed`.
    async fn write(
        &self,
        txn: Txn,
        key: &str,
        checks: &[(&str, Precondition)],
        guard: Option<(&str, Revision)>,
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
            if let Some(fence) = &self.fence
                && lookup(&responses, &fence.key).map(|kv| kv.create_revision()) != Some(fence.term)
            {
                return Err(StoreError::Fenced {
                    key: fence.key.clone(),
                });
            }
            for &(key, pre) in checks {
                let actual = lookup(&responses, &self.full(key)).map(|kv| ours(kv.mod_revision()));
                let held = match pre {
                    Precondition::None => true,
                    Precondition::Absent => actual.is_none(),
                    Precondition::ModRevision(r) => actual == Some(r),
                };
                if !held {
                    return Err(StoreError::Conflict {
                        key: key.to_string(),
                        expected: pre,
                        actual,
                    });
                }
            }
            if let Some((prefix, since)) = guard {
                let newest = newest_under(&responses, &self.full(prefix));
                return Err(StoreError::Changed {
                    prefix: prefix.to_string(),
                    since,
                    revision: newest,
                });
            }
            return Err(StoreError::backend(
                format!("{doing} {key} in etcd"),
                "the transaction failed with every precondition holding",
            ));
        }
        Ok((revision, responses))
    }

    /// The transaction writing `full` with `op` when `compare` (the precondition, if any) and
    /// the fence (if any) hold; otherwise it reads the key and the leader key, for the error.
    fn guarded(&self, full: &str, compare: Option<Compare>, op: TxnOp) -> Txn {
        let reads = vec![TxnOp::get(full, None)];
        self.guarded_txn(compare.into_iter().collect(), reads, vec![op])
    }

    /// `then` when every compare in `when` and the fence (if any) hold; otherwise `reads`
    /// (and the leader key's), for the error.
    fn guarded_txn(&self, mut when: Vec<Compare>, mut reads: Vec<TxnOp>, then: Vec<TxnOp>) -> Txn {
        if let Some(fence) = &self.fence {
            when.push(Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.term,
            ));
            reads.push(TxnOp::get(fence.key.clone(), None));
        }
        if when.is_empty() {
            return Txn::new().and_then(then);
        }
        Txn::new().when(when).and_then(then).or_else(reads)
    }

    /// A list in pages at the first page's revision; `serializable`: answered by any member
    /// from what it has (no quorum needed).
    async fn list_pages(&self, prefix: &str, serializable: bool) -> Result<ListResult, StoreError> {
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
            if serializable {
                options = options.with_serializable();
            }
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

    /// A read (`read(serializable)`): linearizable, unless etcd lately had no quorum; one that
    /// finds no quorum makes reads serializable for [`DEGRADED_READS`] and is read so at once.
    /// A fenced store's reads stay linearizable.
    async fn read_degrading<T, Fut>(&self, read: impl Fn(bool) -> Fut) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        // A leader's loops decide on what they read (instances to create, nodes lost): they
        // read linearizably or not at all, never from a member that may lag.
        if self.fence.is_some() {
            return read(false).await;
        }
        if self.degraded() {
            return read(true).await;
        }
        match read(false).await {
            Err(e) if e.is_unavailable() => {
                self.degrade(&e);
                read(true).await
            }
            other => other,
        }
    }

    /// Whether reads are serializable for now (etcd lately had no quorum).
    fn degraded(&self) -> bool {
        let mut until = crate::lock(&self.degraded_until);
        match *until {
            Some(t) if std::time::Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    /// A linearizable read found no quorum: serve reads from what members have for a while.
    fn degrade(&self, error: &StoreError) {
        let mut until = crate::lock(&self.degraded_until);
        if until.is_none() {
            tracing::warn!(
                error = %crate::error_chain(error),
                "etcd has no quorum: reads are served from what its members have (they may be stale) until it is back"
            );
        }
        *until = Some(std::time::Instant::now() + DEGRADED_READS);
    }

    /// A read of `key`; `recent`: serializable (see [`Store::get_recent`]).
    async fn get_as(&self, key: &str, recent: bool) -> Result<Option<KeyValue>, StoreError> {
        self.open()?;
        let kv = self.client.kv_client();
        let answer = self
            .read_degrading(|serializable| {
                let kv = kv.clone();
                async move {
                    self.again(read_again, move || {
                        let (mut kv, full) = (kv.clone(), self.full(key));
                        let options =
                            (serializable || recent).then(|| GetOptions::new().with_serializable());
                        async move { kv.get(full, options).await }
                    })
                    .await
                    .map_err(etcd_error(format!("reading {key} from etcd")))
                }
            })
            .await?;
        self.saw(answer.header().map_or(0, |h| h.revision()));
        answer.kvs().first().map(|kv| self.convert(kv)).transpose()
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

/// The newest `mod_revision` (ours) an `else` branch's reads found under `full_prefix`.
fn newest_under(responses: &[TxnOpResponse], full_prefix: &str) -> Revision {
    responses
        .iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get.kvs()),
            _ => None,
        })
        .flatten()
        .filter(|kv| kv.key().starts_with(full_prefix.as_bytes()))
        .map(|kv| ours(kv.mod_revision()))
        .max()
        .unwrap_or(0)
}

/// What an `else` branch's reads found of `full`, if it exists.
fn lookup<'a>(responses: &'a [TxnOpResponse], full: &str) -> Option<&'a etcd_client::KeyValue> {
    responses.iter().find_map(|r| match r {
        TxnOpResponse::Get(get) => get.kvs().iter().find(|kv| kv.key() == full.as_bytes()),
        _ => None,
    })
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.get_as(key, false).await
    }

    async fn get_recent(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.get_as(key, true).await
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        self.open()?;
        self.read_degrading(|serializable| self.list_pages(prefix, serializable))
            .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<KeyValue, StoreError> {
        crate::commit_one(self, key, value, pre, None).await
    }

    /// Every put in one transaction, when every precondition, the guard and the fence hold.
    async fn commit(
        &self,
        puts: Vec<Put>,
        guard: Option<(&str, Revision)>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.open()?;
        crate::distinct_keys(&puts)?;
        let Some(first) = puts.first() else {
            return Ok(Vec::new());
        };
        let mut when = Vec::new();
        let mut then = Vec::with_capacity(puts.len());
        let mut reads = Vec::new();
        for put in &puts {
            let full = self.full(&put.key);
            match put.pre {
                Precondition::None => {}
                Precondition::Absent => {
                    when.push(Compare::create_revision(full.clone(), CompareOp::Equal, 0))
                }
                Precondition::ModRevision(r) => when.push(Compare::mod_revision(
                    full.clone(),
                    CompareOp::Equal,
                    theirs(r),
                )),
            }
            if put.pre != Precondition::None {
                reads.push(TxnOp::get(full.clone(), None));
            }
            then.push(TxnOp::put(
                full,
                put.value.clone(),
                Some(PutOptions::new().with_prev_key()),
            ));
        }
        if let Some((prefix, since)) = guard {
            // Every key under the prefix unchanged since `since` (etcd compares each key of
            // the range); the `else` branch reads the newest, for the error.
            let full_prefix = self.full(prefix);
            let end = prefix_end(full_prefix.as_bytes());
            when.push(
                Compare::mod_revision(full_prefix.clone(), CompareOp::Less, theirs(since) + 1)
                    .with_range(end.clone()),
            );
            reads.push(TxnOp::get(
                full_prefix,
                Some(
                    GetOptions::new()
                        .with_range(end)
                        .with_sort(SortTarget::Mod, SortOrder::Descend)
                        .with_limit(1)
                        .with_keys_only(),
                ),
            ));
        }
        let checks: Vec<(&str, Precondition)> =
            puts.iter().map(|p| (p.key.as_str(), p.pre)).collect();
        let txn = self.guarded_txn(when, reads, then);
        let doing = if puts.len() == 1 {
            "writing"
        } else {
            "committing"
        };
        let (revision, responses) = self.write(txn, &first.key, &checks, guard, doing).await?;
        let revision = ours(revision);
        let mut prevs = responses.iter().filter_map(|r| match r {
            TxnOpResponse::Put(p) => Some(p.prev_key().cloned()),
            _ => None,
        });
        let mut written = Vec::with_capacity(puts.len());
        for put in puts {
            let prev = prevs.next().flatten();
            let prev = prev.map(|p| self.convert(&p)).transpose()?;
            written.push(KeyValue {
                key: put.key,
                value: put.value,
                create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                mod_revision: revision,
                version: prev.as_ref().map_or(1, |p| p.version + 1),
            });
        }
        Ok(written)
    }

    async fn delete(&self, key: &str, pre: Precondition) -> Result<Option<KeyValue>, StoreError> {
        self.open()?;
        let full = self.full(key);
        let delete = TxnOp::delete(full.clone(), Some(DeleteOptions::new().with_prev_key()));
        let txn = match pre {
            Precondition::None => self.guarded(&full, None, delete),
            // Deleting what must not exist: nothing to do, unless it exists.
            Precondition::Absent => self.guarded(
                &full,
                Some(Compare::create_revision(full.clone(), CompareOp::Equal, 0)),
                TxnOp::get(full.clone(), Some(GetOptions::new().with_count_only())),
            ),
            Precondition::ModRevision(r) => self.guarded(
                &full,
                Some(Compare::mod_revision(
                    full.clone(),
                    CompareOp::Equal,
                    theirs(r),
                )),
                delete,
            ),
        };
        let (_, responses) = self
            .write(txn, key, &[(key, pre)], None, "deleting")
            .await?;
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
/// [`EtcdStore::hold_exclusive`], [`EtcdStore::campaign`] and [`EtcdStore::hold`]).
pub struct Hold {
    lease: i64,
    /// etcd's `create_revision` of the key when taken: the term a fence compares.
    term: i64,
    key: String,
    client: Client,
    lost: CancellationToken,
    stop: CancellationToken,
    renewal: tokio::task::JoinHandle<()>,
}

/// The former name of [`Hold`].
pub type Exclusive = Hold;

impl Hold {
    /// Cancelled when the lease could not be renewed in time: another holder may have it now.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Our revision of the write that took the key: a leader's term, larger for each new one.
    pub fn term(&self) -> Revision {
        ours(self.term)
    }

    /// Gives the key up at once (revokes the lease), so the next holder need not wait for it
    /// to expire. Does nothing to a key another holder has taken meanwhile.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.renewal.await;
        let mut lease = self.client.lease_client();
        let _ = lease.revoke(self.lease).await;
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("key", &self.key)
            .field("term", &self.term)
            .finish_non_exhaustive()
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
                // Opening the stream renewed the lease once already.
                Ok(opened) => {
                    *stream = Some(opened);
                    return Ok(());
                }
                Err(etcd_client::Error::LeaseKeepAliveError(why)) => return Err(why),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open a lease renewal stream; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
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
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Seconds of an etcd lease lasting at least `ttl` (etcd counts whole seconds).
fn lease_seconds(ttl: Duration) -> i64 {
    let whole = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(whole.max(1)).unwrap_or(i64::MAX)
}

/// Whether a key was taken, or who holds it (and the revision etcd answered at).
enum Taken {
    Yes { term: i64 },
    HeldBy { holder: String, revision: i64 },
}

impl EtcdStore {
    /// This store's view for a leader holding `leadership`: every write it makes also checks,
    /// in the same transaction, that the leader key is still the one taken then; once another
    /// process leads (or the key expired), writes fail with `Fenced` and nothing is written.
    pub fn fenced(&self, leadership: &Hold) -> EtcdStore {
        let mut view = self.clone();
        view.fence = Some(Fence {
            key: leadership.key.clone(),
            term: leadership.term,
        });
        view
    }

    async fn grant(&self, key: &str, ttl: Duration) -> Result<i64, StoreError> {
        let leases = self.client.lease_client();
        // A grant that was not sent (its member is down) goes to another member.
        Ok(self
            .again(not_sent, || {
                let mut leases = leases.clone();
                async move { leases.grant(lease_seconds(ttl), None).await }
            })
            .await
            .map_err(etcd_error(format!("taking a lease for {key} in etcd")))?
            .id())
    }

    /// Writes `value` at `full` under `lease`: only if the key is absent when `exclusive`.
    async fn take(
        &self,
        full: &str,
        value: &str,
        lease: i64,
        exclusive: bool,
    ) -> Result<Taken, StoreError> {
        let put = TxnOp::put(full, value, Some(PutOptions::new().with_lease(lease)));
        let txn = if exclusive {
            Txn::new()
                .when([Compare::create_revision(full, CompareOp::Equal, 0)])
                .and_then([put, TxnOp::get(full, None)])
                .or_else([TxnOp::get(full, None)])
        } else {
            Txn::new().and_then([put, TxnOp::get(full, None)])
        };
        let kv = self.client.kv_client();
        let answer = self
            .again(not_sent, || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(etcd_error(format!("taking {full} in etcd")))?;
        let revision = answer.header().map_or(0, |h| h.revision());
        self.saw(revision);
        let responses = answer.op_responses();
        let current = lookup(&responses, full);
        if answer.succeeded() {
            return Ok(Taken::Yes {
                term: current.map_or(revision, etcd_client::KeyValue::create_revision),
            });
        }
        Ok(Taken::HeldBy {
            holder: current
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .unwrap_or_default(),
            revision,
        })
    }

    /// Keeps `lease` alive for `key` every third of `ttl`, in a task the returned hold owns.
    fn keep(&self, key: &str, lease: i64, term: i64, ttl: Duration) -> Hold {
        let (lost, stop) = (CancellationToken::new(), CancellationToken::new());
        let (lost_task, stop_task) = (lost.clone(), stop.clone());
        let shown = key.to_string();
        let client = self.client.clone();
        // Owned by the `Hold`: ends at `release`, or when the hold is lost.
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
                        tracing::warn!(key = %shown, why, "lost the hold of an etcd key");
                        lost_task.cancel();
                        return;
                    }
                }
            }
        });
        Hold {
            lease,
            term,
            key: self.full(key),
            client: self.client.clone(),
            lost,
            stop,
            renewal,
        }
    }

    /// Creates `key` (under the namespace) naming `holder`, bound to a lease of `ttl` that a
    /// task renews every third of it. `Held` if another holder has it. The hold is lost —
    /// [`Hold::lost`] fires — when a renewal fails or is answered too late, which is
    /// also when another process may take the key.
    pub async fn hold_exclusive(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Hold, StoreError> {
        self.open()?;
        let full = self.full(key);
        let lease = self.grant(key, ttl).await?;
        match self.take(&full, holder, lease, true).await {
            Ok(Taken::Yes { term }) => Ok(self.keep(key, lease, term, ttl)),
            other => {
                let _ = self.client.lease_client().revoke(lease).await;
                match other? {
                    Taken::HeldBy { holder, .. } => Err(StoreError::Held {
                        key: key.to_string(),
                        holder,
                    }),
                    Taken::Yes { .. } => unreachable!("handled above"),
                }
            }
        }
    }

    /// Writes `value` at `key` for as long as this process renews it (a presence record:
    /// it disappears within `ttl` of the process dying). Not exclusive.
    pub async fn hold(&self, key: &str, value: &str, ttl: Duration) -> Result<Hold, StoreError> {
        self.open()?;
        let full = self.full(key);
        let lease = self.grant(key, ttl).await?;
        match self.take(&full, value, lease, false).await {
            Ok(Taken::Yes { term }) => Ok(self.keep(key, lease, term, ttl)),
            Ok(Taken::HeldBy { .. }) => Err(StoreError::backend(
                format!("writing {key} in etcd"),
                "an unconditional write was refused",
            )),
            Err(e) => {
                let _ = self.client.lease_client().revoke(lease).await;
                Err(e)
            }
        }
    }

    /// Takes `key` as soon as nobody holds it (an election: the holder leads): waits, without
    /// polling, for the current holder's key to go (released, or its lease expired), then
    /// races for it. `None` once `stop` is cancelled. Store errors (no quorum) are retried.
    pub async fn campaign(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
        stop: &CancellationToken,
    ) -> Option<Hold> {
        let full = self.full(key);
        let mut told = String::new();
        loop {
            if stop.is_cancelled() || self.open().is_err() {
                return None;
            }
            let attempt = async {
                let lease = self.grant(key, ttl).await?;
                let taken = self.take(&full, holder, lease, true).await;
                if !matches!(taken, Ok(Taken::Yes { .. })) {
                    let _ = self.client.lease_client().revoke(lease).await;
                }
                Ok::<_, StoreError>((lease, taken?))
            };
            let outcome = tokio::select! {
                () = stop.cancelled() => return None,
                outcome = attempt => outcome,
            };
            match outcome {
                Ok((lease, Taken::Yes { term })) => return Some(self.keep(key, lease, term, ttl)),
                Ok((_, Taken::HeldBy { holder, revision })) => {
                    if told != holder {
                        tracing::info!(key, leader = %holder, "following");
                        told = holder;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        () = self.until_gone(key, ours(revision)) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(key, error = %crate::error_chain(&e), "cannot campaign; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
        }
    }

    /// Returns once `key` is deleted after revision `after` (or the watch broke: the caller
    /// looks again).
    async fn until_gone(&self, key: &str, after: Revision) {
        let Ok(mut watch) = self.watch(key, after).await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            return;
        };
        while let Some(event) = watch.next().await {
            match event {
                Ok(WatchEvent::Delete { key: gone, .. }) if gone == key => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// The value of `key` and our revision of its creation (a leader key's term), if present.
    pub async fn holder(&self, key: &str) -> Result<Option<(String, Revision)>, StoreError> {
        Ok(self.get(key).await?.map(|kv| {
            (
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.create_revision,
            )
        }))
    }
}

/// The store key of `node`'s lease, under the namespace.
pub const NODE_LEASES: &str = "leases/";

/// Node leases kept in etcd, so that whichever server an agent reaches, every server knows
/// the node is alive. Each node gets an etcd lease of its own lease's length with one key bound
/// to it (`leases/<node>`); a heartbeat is a keep-alive of that lease, which etcd's leader
/// answers from memory: no write to etcd's log per beat, only on a node's first beat through
/// this server (or after its lease ended). The key's deletion (expiry) tells every server.
pub struct EtcdNodeLeases {
    store: EtcdStore,
    /// This server's name, written in the key for people.
    server: String,
    /// Each node's etcd lease (id, seconds) as granted through this server.
    granted: std::sync::Mutex<std::collections::HashMap<String, (i64, i64)>>,
}

impl EtcdNodeLeases {
    pub fn new(store: &EtcdStore, server: &str) -> Self {
        Self {
            store: store.clone(),
            server: server.to_string(),
            granted: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Keeps `leases` equal to the node leases in etcd until `stop`: a key present is a live
    /// lease, a key deleted one that ended. Relists after a broken watch.
    pub async fn follow(&self, leases: Arc<crate::Leases>, stop: CancellationToken) {
        let mut known: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut first = true;
        while !stop.is_cancelled() {
            let listed = tokio::select! {
                () = stop.cancelled() => return,
                listed = self.store.list(NODE_LEASES) => listed,
            };
            let list = match listed {
                Ok(list) => list,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot list the node leases; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            // Read again after the watch broke (etcd was away): renewals may not have got
            // through meanwhile, so no node is judged on this view for one grace.
            if !first {
                leases.regrace();
            }
            first = false;
            let mut now_known = std::collections::HashSet::new();
            for kv in &list.items {
                if let Some(node) = kv.key.strip_prefix(NODE_LEASES) {
                    leases.hold_shared(node, lease_length(&kv.value));
                    now_known.insert(node.to_string());
                }
            }
            for gone in known.difference(&now_known) {
                leases.end_shared(gone);
            }
            known = now_known;
            let Ok(mut watch) = self.store.watch(NODE_LEASES, list.revision).await else {
                continue;
            };
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    event = watch.next() => event,
                };
                match event {
                    Some(Ok(WatchEvent::Put { kv, .. })) => {
                        if let Some(node) = kv.key.strip_prefix(NODE_LEASES) {
                            leases.hold_shared(node, lease_length(&kv.value));
                            known.insert(node.to_string());
                        }
                    }
                    Some(Ok(WatchEvent::Delete { key, .. })) => {
                        if let Some(node) = key.strip_prefix(NODE_LEASES) {
                            leases.end_shared(node);
                            known.remove(node);
                        }
                    }
                    Some(Err(_)) | None => break,
                }
            }
        }
    }

    async fn grant_for(&self, node: &str, seconds: i64) -> Result<(), StoreError> {
        let key = format!("{NODE_LEASES}{node}");
        let lease = self
            .store
            .grant(&key, Duration::from_secs(seconds.unsigned_abs()))
            .await?;
        let value = serde_json::json!({"server": self.server, "seconds": seconds}).to_string();
        let full = self.store.full(&key);
        let put = TxnOp::put(full, value, Some(PutOptions::new().with_lease(lease)));
        let kv = self.store.client.kv_client();
        let answer = self
            .store
            .again(not_sent, || {
                let (mut kv, put) = (kv.clone(), put.clone());
                async move { kv.txn(Txn::new().and_then([put])).await }
            })
            .await;
        match answer {
            Ok(answer) => {
                self.store.saw(answer.header().map_or(0, |h| h.revision()));
                crate::lock(&self.granted).insert(node.to_string(), (lease, seconds));
                Ok(())
            }
            Err(e) => {
                let _ = self.store.client.lease_client().revoke(lease).await;
                Err(etcd_error(format!(
                    "writing the lease of node {node} in etcd"
                ))(e))
            }
        }
    }
}

/// The lease length written in a node lease's key (`seconds`), or the default.
fn lease_length(value: &[u8]) -> Duration {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v["seconds"].as_u64())
        .map_or(crate::DEFAULT_LEASE, Duration::from_secs)
}

#[async_trait]
impl crate::lease::SharedLeases for EtcdNodeLeases {
    async fn renew(&self, node: &str, duration: Duration) -> Result<(), StoreError> {
        self.store.open()?;
        let seconds = lease_seconds(duration.min(crate::lease::MAX_LEASE));
        let granted = crate::lock(&self.granted).get(node).copied();
        if let Some((lease, had)) = granted
            && had == seconds
        {
            let leases = self.store.client.lease_client();
            match self
                .store
                .again(not_sent, || {
                    let mut leases = leases.clone();
                    async move { leases.keep_alive(lease).await.map(|_| ()) }
                })
                .await
            {
                Ok(()) => return Ok(()),
                // Expired (the node was away, or etcd lost it): a new lease below.
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => {}
                Err(e) => {
                    return Err(etcd_error(format!(
                        "renewing the lease of node {node} in etcd"
                    ))(e));
                }
            }
        }
        self.grant_for(node, seconds).await
    }
}

/// One etcd member, as the server answering reaches it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub name: String,
    pub url: String,
    pub healthy: bool,
    pub leader: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EtcdStore {
    /// Every member of the cluster and whether it answers this server, each asked on its own
    /// (within the connect timeout).
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.open()?;
        let cluster = self.client.cluster_client();
        // Through whichever member answers (the list is each member's own, no quorum needed).
        let list = self
            .again(read_again, || {
                let mut cluster = cluster.clone();
                async move { cluster.member_list().await }
            })
            .await
            .map_err(etcd_error("listing etcd's members".to_string()))?;
        let mut asks = tokio::task::JoinSet::new();
        for m in list.members() {
            let url = m.client_urls().first().cloned().unwrap_or_default();
            let (name, id) = (m.name().to_string(), m.id());
            let connect = with_tls(
                ConnectOptions::new()
                    .with_connect_timeout(self.connect_timeout)
                    .with_timeout(self.connect_timeout),
                self.tls.as_ref(),
            );
            // Owned by this call: each ends within the timeouts above.
            asks.spawn(async move {
                let status = async {
                    let mut client = Client::connect([url.clone()], Some(connect)).await?;
                    client.status().await
                };
                match status.await {
                    Ok(s) => Member {
                        name,
                        url,
                        healthy: true,
                        leader: s.leader() == id,
                        error: None,
                    },
                    Err(e) => Member {
                        name,
                        url,
                        healthy: false,
                        leader: false,
                        error: Some(match &e {
                            etcd_client::Error::GRpcStatus(status) => root_cause(status),
                            other => root_cause(other),
                        }),
                    },
                }
            });
        }
        let mut members = Vec::new();
        while let Some(done) = asks.join_next().await {
            if let Ok(m) = done {
                members.push(m);
            }
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(members)
    }
}

/// The innermost cause of an error, for a table cell ("Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
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
