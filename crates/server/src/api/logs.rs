//! `/api/v1/services/{name}/logs`.

use std::collections::{HashMap, HashSet};

use tokio::task::JoinSet;

use super::*;

/// `GET /api/v1/services/{name}/logs?instance=&tail=&follow=`. Without `instance`, the logs
/// of every instance of the service, each line prefixed with `[instance]` (when there are
/// several, or when following: then instances that appear or go are followed too, see
/// [`follow_service`]). `tail` counts lines per instance. `known=a,b` resumes a lost follow
/// (see [`Start::known`]).
pub(super) async fn service_logs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Response> {
    let follow = flag(&query, "follow")?;
    let tail: Option<usize> = number(&query, "tail")?;
    let (instances, _) = typed::list::<Instance>(&*state.store).await?;
    let mut targets: Vec<String> = instances
        .iter()
        .filter(|i| i.spec.service == name)
        .map(|i| i.metadata.name.clone())
        .collect();
    if let Some(wanted) = query.get("instance") {
        if !targets.contains(wanted) {
            let error = operations::OpError::NotFound {
                kind: "instance",
                name: format!("{wanted} of service {name}"),
                known: targets,
            };
            return Err(ApiError::from(error).with_field("query.instance"));
        }
        targets = vec![wanted.clone()];
    } else if targets.is_empty() {
        operations::get_service(&*state.store, &name).await?;
    }
    let prefixed = targets.len() > 1;

    if !follow {
        let mut out = Vec::new();
        for instance in &targets {
            let bytes = state.logs.read(instance, tail).await.map_err(|e| {
                tracing::warn!(instance, error = %e, "reading logs failed");
                ApiError::internal()
            })?;
            append_lines(&mut out, instance, &bytes, prefixed);
        }
        let mut response = Body::from(out).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(response);
    }

    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    let stop = state.shutdown.child_token();
    let mut followers = Followers {
        logs: state.logs.clone(),
        tx: tx.clone(),
        stop: stop.clone(),
        running: HashMap::new(),
        tasks: JoinSet::new(),
    };
    if query.contains_key("instance") {
        // One instance: its lines as they are, until the client goes.
        for instance in targets {
            followers.start(&instance, tail, Mode::Plain);
        }
        tokio::spawn(followers.wait());
    } else {
        // The service: its instances as they come and go (see `follow_service`).
        let known = query.get("known").map(|k| {
            k.split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect()
        });
        let start = Start { tail, known };
        tokio::spawn(follow_service(state.store.clone(), name, start, followers));
    }
    drop(tx);
    Ok(stream_response(rx, "text/plain; charset=utf-8"))
}

/// Where the instances there when the follow starts begin.
struct Start {
    /// Lines back (per instance); all of them when `None`.
    tail: Option<usize>,
    /// A client resuming a follow it lost: the instances it already followed begin at their
    /// end, the others (started meanwhile) from their first line, after a "joined" line.
    known: Option<HashSet<String>>,
}

/// How an instance's lines are written into a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As they are (one instance asked for).
    Plain,
    /// Prefixed with `[instance]`; "left" is said once the instance is gone.
    Service,
    /// As `Service`, and "joined" is said first (an instance that appeared while following).
    Joined,
}

/// The per-instance log followers of one response.
struct Followers {
    logs: Arc<dyn LogSource>,
    tx: mpsc::Sender<Bytes>,
    /// The response's end: the client went, or the server shuts down.
    stop: CancellationToken,
    /// Instance → what makes its follower finish (send what was written, then stop).
    running: HashMap<String, CancellationToken>,
    tasks: JoinSet<()>,
}

impl Followers {
    fn start(&mut self, instance: &str, tail: Option<usize>, mode: Mode) {
        let finish = self.stop.child_token();
        let source = self.logs.follow(instance, tail, finish.clone());
        self.running.insert(instance.to_string(), finish.clone());
        self.tasks.spawn(forward(
            source,
            instance.to_string(),
            mode,
            self.tx.clone(),
            finish,
            self.stop.clone(),
        ));
    }

    /// The instance is gone: its follower sends what is left of its log, then says so.
    fn leave(&mut self, instance: &str) {
        if let Some(finish) = self.running.remove(instance) {
            finish.cancel();
        }
    }

    /// Until the client goes (or the server stops) and every follower ended.
    async fn wait(mut self) {
        loop {
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = self.tx.closed() => break,
                done = self.tasks.join_next() => if done.is_none() { break },
            }
        }
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Follows the logs of every instance of `service`: the ones there now from `tail` lines back;
/// an instance that appears later from its first line, after a "joined" line; an instance
/// that is gone (deleted from the store) is read to its end, then a "left" line. The
/// instances are followed through a reflector, which relists when its watch cannot go on.
async fn follow_service(
    store: Arc<dyn Store>,
    service: String,
    start: Start,
    mut followers: Followers,
) {
    let stop = followers.stop.clone();
    let reflector = match typed::Reflector::<Instance>::start(store, &stop).await {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(%service, %error, "cannot follow the instances for their logs");
            stop.cancel();
            return;
        }
    };
    let mut rx = reflector.subscribe();
    let mut first = true;
    loop {
        {
            let map = rx.borrow_and_update();
            let now: Vec<&String> = map
                .iter()
                .filter(|(_, i)| i.spec.service == service)
                .map(|(n, _)| n)
                .collect();
            for name in &now {
                if !followers.running.contains_key(*name) {
                    match (&start.known, first) {
                        (None, true) => followers.start(name, start.tail, Mode::Service),
                        (Some(known), true) if known.contains(*name) => {
                            followers.start(name, Some(0), Mode::Service)
                        }
                        _ => followers.start(name, None, Mode::Joined),
                    }
                }
            }
            let gone: Vec<String> = followers
                .running
                .keys()
                .filter(|n| !now.contains(n))
                .cloned()
                .collect();
            for name in gone {
                followers.leave(&name);
            }
        }
        first = false;
        tokio::select! {
            () = stop.cancelled() => break,
            () = followers.tx.closed() => break,
            changed = rx.changed() => if changed.is_err() { break },
            Some(_) = followers.tasks.join_next(), if !followers.tasks.is_empty() => {}
        }
    }
    stop.cancel();
    if let Err(error) = reflector.stop().await {
        tracing::debug!(%service, %error, "log follower's reflector ended with an error");
    }
    followers.wait().await;
}

/// Forwards one instance's log into the response until it ends (after `finish`: the
/// instance is gone) or `stop`.
async fn forward(
    mut source: mpsc::Receiver<Result<Bytes, String>>,
    instance: String,
    mode: Mode,
    tx: mpsc::Sender<Bytes>,
    finish: CancellationToken,
    stop: CancellationToken,
) {
    let prefixed = mode != Mode::Plain;
    if mode == Mode::Joined
        && !send_chunk(&tx, Bytes::from(format!("--- {instance} joined\n")), &stop).await
    {
        return;
    }
    loop {
        let chunk = tokio::select! {
            () = stop.cancelled() => return,
            c = source.recv() => c,
        };
        match chunk {
            Some(Ok(bytes)) => {
                let mut out = Vec::with_capacity(bytes.len());
                append_lines(&mut out, &instance, &bytes, prefixed);
                if !send_chunk(&tx, Bytes::from(out), &stop).await {
                    return;
                }
            }
            Some(Err(error)) => {
                tracing::debug!(instance, %error, "log follow ended");
                return;
            }
            None => break,
        }
    }
    if prefixed && finish.is_cancelled() && !stop.is_cancelled() {
        send_chunk(&tx, Bytes::from(format!("--- {instance} left\n")), &stop).await;
    }
}

pub(super) fn append_lines(out: &mut Vec<u8>, instance: &str, bytes: &[u8], prefixed: bool) {
    if !prefixed {
        out.extend_from_slice(bytes);
        return;
    }
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(format!("[{instance}] ").as_bytes());
        out.extend_from_slice(line);
    }
}
