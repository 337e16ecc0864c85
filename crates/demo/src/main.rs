//! `flotilla-demo`: a tiny HTTP service for flotilla's quickstart, docs and tests.
//!
//! It answers who it is, has a health endpoint, and has switches that make it misbehave on
//! purpose (fail readiness, hang, crash, allocate memory, answer slowly, ignore SIGTERM) so the
//! agent's probes, restarts, limits and the gateway's draining can be shown and tested.
//!
//! Endpoints:
//!
//! | request                | effect                                                        |
//! |------------------------|---------------------------------------------------------------|
//! | `GET /`                | `hello from <instance> (pid N)` (`GREETING` replaces `hello`) |
//! | `POST /`               | the same, then `: received N bytes` (the body, read to its end) |
//! | `GET /health`          | `ok`; 503 when readiness fails; never answers in hang mode    |
//! | `GET /pid`             | the process id                                                |
//! | `GET /slow?ms=N`       | answers after N milliseconds                                  |
//! | `POST /fail-readiness` | `/health` answers 503 from now on                             |
//! | `POST /recover`        | undo `/fail-readiness` and `/hang`                            |
//! | `POST /hang`           | `/health` never answers (until shutdown)                      |
//! | `POST /crash`          | exit with code 1                                              |
//! | `POST /alloc?mb=N`     | allocate N MiB, touch every page, keep it                     |

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Longest delay `/slow` accepts, so a typo cannot pin a connection for days.
const MAX_SLOW_MS: u64 = 10 * 60 * 1000;
/// Largest single allocation `/alloc` and `--alloc-mb` accept (64 GiB).
const MAX_ALLOC_MB: u64 = 64 * 1024;
/// Largest body `POST /` reads.
const MAX_POST_BYTES: usize = 1 << 20;

/// A tiny HTTP service with switches that make it misbehave on purpose.
#[derive(Debug, Parser)]
#[command(name = "flotilla-demo", version)]
struct Args {
    /// Port to listen on at 127.0.0.1 (0 picks a free one; the chosen address is logged).
    #[arg(long, env = "PORT")]
    port: Option<u16>,
    /// Full address to listen on; overrides --port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Start with readiness failing (`/health` answers 503).
    #[arg(long)]
    fail_readiness: bool,
    /// Exit with code 1 this long after the process starts (`500ms`, `3s`, `1m`), also during
    /// `--start-delay`: with a longer delay the process crashes before it ever listens.
    #[arg(long, value_parser = humantime::parse_duration)]
    crash_after: Option<Duration>,
    /// Allocate this many MiB at start-up, touch every page and keep it.
    #[arg(long)]
    alloc_mb: Option<u64>,
    /// Log SIGTERM and keep running (to test SIGKILL after the grace period).
    #[arg(long)]
    ignore_sigterm: bool,
    /// Wait this long before listening, as a slow starter does (`3s`). The stop signal ends the
    /// process at once meanwhile.
    #[arg(long, value_parser = humantime::parse_duration)]
    start_delay: Option<Duration>,
}

struct State {
    /// First word of the greeting (`GREETING`, default `hello`).
    greeting: String,
    /// Who we are: `FLOTILLA_INSTANCE`, else the host name.
    name: String,
    pid: u32,
    not_ready: AtomicBool,
    hang: AtomicBool,
    /// Memory kept alive by `/alloc` and `--alloc-mb`; never held across an await.
    memory: Mutex<Vec<Vec<u8>>>,
    /// Cancelled when shutdown begins: hanging requests give up then.
    shutdown: CancellationToken,
    /// Cancelled by `POST /crash`: the process exits with code 1 at once.
    crash: CancellationToken,
}

type Body = Full<Bytes>;

fn main() -> ExitCode {
    let args = Args::parse();
    // Plain lines on stderr: the agent captures them, and tests look for their messages.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .finish()
        .with(
            std::env::var("RUST_LOG")
                .ok()
                .and_then(|text| text.parse::<Targets>().ok())
                .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO)),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // A crash must not wait for in-flight work (a long allocation, hung requests).
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let crash_at = args
        .crash_after
        .map(|after| (tokio::time::Instant::now() + after, after));
    let crash_message = |after: Duration| {
        format!(
            "crashing as asked (--crash-after {})",
            humantime::format_duration(after)
        )
    };
    let addr = args
        .listen
        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, args.port.unwrap_or(8080))));
    let state = Arc::new(State {
        greeting: std::env::var("GREETING")
            .ok()
            .filter(|g| !g.trim().is_empty())
            .unwrap_or_else(|| "hello".to_string()),
        name: instance_name(),
        pid: std::process::id(),
        not_ready: AtomicBool::new(args.fail_readiness),
        hang: AtomicBool::new(false),
        memory: Mutex::new(Vec::new()),
        shutdown: CancellationToken::new(),
        crash: CancellationToken::new(),
    });

    if let Some(delay) = args.start_delay {
        // Before the signal handlers: a stop signal meanwhile ends the process (its default).
        tracing::info!(
            "starting slowly: listening in {}",
            humantime::format_duration(delay)
        );
        match crash_at {
            Some((at, after)) if at < tokio::time::Instant::now() + delay => {
                tokio::time::sleep_until(at).await;
                return Err(crash_message(after));
            }
            _ => tokio::time::sleep(delay).await,
        }
    }

    if let Some(mb) = args.alloc_mb {
        let block = allocate(mb)?;
        keep(&state, block);
        tracing::info!("allocated {mb} MiB at start-up");
    }

    // Install the handlers before announcing the address, so a signal sent right after the
    // announcement is never lost.
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;

    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    tracing::info!(
        "flotilla-demo listening on http://{local} (pid {}, instance {})",
        state.pid,
        state.name
    );

    let crash_after = async {
        match crash_at {
            Some((at, after)) => {
                tokio::time::sleep_until(at).await;
                crash_message(after)
            }
            None => std::future::pending().await,
        }
    };
    let crash_asked = async {
        state.crash.cancelled().await;
        "crashing as asked (POST /crash)".to_string()
    };

    let ignore_sigterm = args.ignore_sigterm;
    let shutdown = state.shutdown.clone();
    // Owned by this function: it ends at the first honoured signal.
    let signals = async move {
        loop {
            tokio::select! {
                _ = sigterm.recv() => {
                    if ignore_sigterm {
                        tracing::warn!("received SIGTERM, ignoring it (--ignore-sigterm)");
                        continue;
                    }
                    tracing::info!("received SIGTERM, shutting down");
                    break;
                }
                _ = sigint.recv() => {
                    tracing::info!("received SIGINT, shutting down");
                    break;
                }
            }
        }
        shutdown.cancel();
    };

    // A crash ends everything at once: no draining, exit code 1.
    tokio::select! {
        () = serve(listener, state.clone(), signals) => {}
        reason = crash_after => return Err(reason),
        reason = crash_asked => return Err(reason),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Accepts connections until `stop` completes, then stops accepting and waits for every
/// in-flight request to finish (idle keep-alive connections are closed).
async fn serve(listener: TcpListener, state: Arc<State>, stop: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let http = http1::Builder::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(e) => {
                        // Usually EMFILE: back off briefly instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let state = state.clone();
                let service = service_fn(move |req| handle(req, state.clone()));
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                // Owned by `graceful`: shutdown below waits for it.
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut stop => break,
        }
    }
    drop(listener);
    state.shutdown.cancel();
    graceful.shutdown().await;
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::POST && req.uri().path() == "/" {
        return Ok(echo(req, &state).await);
    }
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let response = match (req.method(), path) {
        (&Method::GET, "/") => text(
            StatusCode::OK,
            format!(
                "{} from {} (pid {})\n",
                state.greeting, state.name, state.pid
            ),
        ),
        (&Method::GET, "/health") => health(&state).await,
        (&Method::GET, "/pid") => text(StatusCode::OK, format!("{}\n", state.pid)),
        (&Method::GET, "/slow") => match query_u64(query, "ms") {
            Some(ms) if ms <= MAX_SLOW_MS => {
                tracing::info!("slow request: answering in {ms} ms");
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("slow response after {ms} ms\n"))
            }
            _ => text(
                StatusCode::BAD_REQUEST,
                format!("want /slow?ms=N with N <= {MAX_SLOW_MS}\n"),
            ),
        },
        (&Method::POST, "/fail-readiness") => {
            state.not_ready.store(true, Ordering::SeqCst);
            tracing::info!("readiness now failing");
            text(StatusCode::OK, "readiness now failing\n")
        }
        (&Method::POST, "/recover") => {
            state.not_ready.store(false, Ordering::SeqCst);
            state.hang.store(false, Ordering::SeqCst);
            tracing::info!("recovered");
            text(StatusCode::OK, "recovered\n")
        }
        (&Method::POST, "/hang") => {
            state.hang.store(true, Ordering::SeqCst);
            tracing::info!("health checks now hang");
            text(StatusCode::OK, "health checks now hang\n")
        }
        (&Method::POST, "/crash") => {
            // Crash right after the answer has had a moment to leave.
            let crash = state.crash.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                crash.cancel();
            });
            text(StatusCode::OK, "crashing\n")
        }
        (&Method::POST, "/alloc") => match query_u64(query, "mb") {
            Some(mb) => alloc(&state, mb).await,
            None => text(StatusCode::BAD_REQUEST, "want /alloc?mb=N\n"),
        },
        (_, "/") => text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n"),
        (_, "/health" | "/pid" | "/slow") => text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (_, "/fail-readiness" | "/recover" | "/hang" | "/crash" | "/alloc") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

/// `POST /`: reads the body to its end and answers who we are and how many bytes arrived, so a
/// client can tell that its request reached a process and was read whole.
async fn echo(req: Request<Incoming>, state: &State) -> Response<Body> {
    match Limited::new(req.into_body(), MAX_POST_BYTES)
        .collect()
        .await
    {
        Ok(body) => text(
            StatusCode::OK,
            format!(
                "{} from {} (pid {}): received {} bytes\n",
                state.greeting,
                state.name,
                state.pid,
                body.to_bytes().len()
            ),
        ),
        Err(e) if e.is::<LengthLimitError>() => text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {MAX_POST_BYTES} bytes\n"),
        ),
        Err(e) => text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}\n"),
        ),
    }
}

async fn health(state: &State) -> Response<Body> {
    if state.hang.load(Ordering::SeqCst) {
        // Never answer, so a probe with a timeout fails; give up only when shutting down.
        state.shutdown.cancelled().await;
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if state.not_ready.load(Ordering::SeqCst) {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    } else {
        text(StatusCode::OK, "ok")
    }
}

async fn alloc(state: &Arc<State>, mb: u64) -> Response<Body> {
    // Touching every page of a large block takes a while: keep it off the event loop.
    let block = match tokio::task::spawn_blocking(move || allocate(mb)).await {
        Ok(Ok(block)) => block,
        Ok(Err(message)) => return text(StatusCode::INSUFFICIENT_STORAGE, format!("{message}\n")),
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("allocation failed: {e}\n"),
            );
        }
    };
    let total = keep(state, block);
    tracing::info!("allocated {mb} MiB (holding {total} MiB)");
    text(
        StatusCode::OK,
        format!("allocated {mb} MiB, holding {total} MiB\n"),
    )
}

/// Allocates `mb` MiB and writes to every page so it is really resident.
fn allocate(mb: u64) -> Result<Vec<u8>, String> {
    if mb > MAX_ALLOC_MB {
        return Err(format!(
            "refusing to allocate {mb} MiB (max {MAX_ALLOC_MB})"
        ));
    }
    let bytes = usize::try_from(mb)
        .ok()
        .and_then(|mb| mb.checked_mul(1 << 20))
        .ok_or_else(|| format!("{mb} MiB does not fit in memory"))?;
    let mut block = Vec::new();
    block
        .try_reserve_exact(bytes)
        .map_err(|e| format!("cannot allocate {mb} MiB: {e}"))?;
    // A non-zero fill writes every page (zeroed memory could stay unbacked).
    block.resize(bytes, 0xa5);
    Ok(block)
}

/// Keeps `block` alive; returns the total MiB held.
fn keep(state: &State, block: Vec<u8>) -> usize {
    let mut memory = match state.memory.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    memory.push(block);
    memory.iter().map(Vec::len).sum::<usize>() >> 20
}

fn instance_name() -> String {
    if let Ok(name) = std::env::var("FLOTILLA_INSTANCE")
        && !name.trim().is_empty()
    {
        return name;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The value of `key` in a query string, as a number.
fn query_u64(query: &str, key: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(query_u64("ms=250", "ms"), Some(250));
        assert_eq!(query_u64("a=1&mb=64", "mb"), Some(64));
        assert_eq!(query_u64("mb=x", "mb"), None);
        assert_eq!(query_u64("", "mb"), None);
        assert_eq!(query_u64("mbb=3", "mb"), None);
    }

    #[test]
    fn allocation_is_sized_and_bounded() {
        let block = allocate(2).unwrap();
        assert_eq!(block.len(), 2 << 20);
        assert!(block.iter().step_by(4096).all(|b| *b == 0xa5));
        assert!(allocate(MAX_ALLOC_MB + 1).is_err());
    }
}
