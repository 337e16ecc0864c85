//! The upstream HTTP/1.1 pool against real servers on loopback: connections are reused only
//! when a response was read to its end, a connection the endpoint closed is never used again,
//! idle connections are closed after the idle timeout, and a refused connection is a connect
//! error (so it may be retried elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::AttemptBody;
use flotilla_gateway::balance::EndpointState;
use flotilla_gateway::upstream::Http1Pool;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(10);

/// A keep-alive HTTP/1.1 server answering `hello` (or `close` with `Connection: close` on
/// `/close`), counting the connections it accepted and reporting each one's end.
struct Server {
    authority: String,
    accepted: Arc<AtomicU64>,
    closed: mpsc::Receiver<()>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicU64::new(0));
        let (closed_tx, closed) = mpsc::channel(64);
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let closed_tx = closed_tx.clone();
                connections.spawn(async move {
                    let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
                        if req.uri().path() == "/close" {
                            response
                                .headers_mut()
                                .insert("connection", "close".parse().unwrap());
                        }
                        Ok::<_, Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    let _ = closed_tx.send(()).await;
                });
            }
        });
        Server {
            authority,
            accepted,
            closed,
            task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until the server has seen one more connection end.
    async fn connection_closed(&mut self) {
        tokio::time::timeout(DEADLINE, self.closed.recv())
            .await
            .expect("the connection was not closed in time")
            .expect("server gone");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn get(path: &str) -> Request<AttemptBody> {
    Request::builder()
        .uri(path)
        .header("host", "backend")
        .body(AttemptBody::empty())
        .unwrap()
}

/// Sends GET `path`, reads the body to its end, gives the connection back (as the gateway's
/// response body does at its end) and returns the body.
async fn fetch(pool: &Arc<Http1Pool>, endpoint: &Arc<EndpointState>, path: &str) -> String {
    let (response, reuse) = pool.send(endpoint, get(path)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    reuse.release();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn a_connection_is_reused_once_its_response_was_read_to_the_end() {
    let server = Server::start().await;
    let pool = Arc::new(Http1Pool::new(Duration::from_secs(3)));
    let endpoint = Arc::new(EndpointState::detached("backend-0", &server.authority));
    for _ in 0..50 {
        assert_eq!(fetch(&pool, &endpoint, "/").await, "hello");
    }
    assert_eq!(
        server.accepted(),
        1,
        "50 sequential requests, one connection"
    );
    assert_eq!(pool.idle(&server.authority), 1);
}

#[tokio::test]
async fn a_connection_the_endpoint_closed_is_never_used_again() {
    let mut server = Server::start().await;
    let pool = Arc::new(Http1Pool::new(Duration::from_secs(3)));
    let endpoint = Arc::new(EndpointState::detached("backend-0", &server.authority));
    // The server closes after answering: the connection may still be handed back, but it must
    // be seen as closed, and the next request must succeed on a new one.
    assert_eq!(fetch(&pool, &endpoint, "/close").await, "hello");
    server.connection_closed().await;
    let deadline = Instant::now() + DEADLINE;
    while pool.sweep() > 0 {
        assert!(Instant::now() < deadline, "closed connection still pooled");
        tokio::task::yield_now().await;
    }
    for _ in 0..5 {
        assert_eq!(fetch(&pool, &endpoint, "/").await, "hello");
    }
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let mut server = Server::start().await;
    let pool = Arc::new(
        Http1Pool::new(Duration::from_secs(3)).with_idle_timeout(Duration::from_millis(50)),
    );
    let endpoint = Arc::new(EndpointState::detached("backend-0", &server.authority));
    assert_eq!(fetch(&pool, &endpoint, "/").await, "hello");
    assert_eq!(pool.idle(&server.authority), 1);
    let deadline = Instant::now() + DEADLINE;
    while pool.sweep() > 0 {
        assert!(Instant::now() < deadline, "idle connection never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Dropping it from the pool ends the connection: the server sees it close.
    server.connection_closed().await;
    assert_eq!(fetch(&pool, &endpoint, "/").await, "hello");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    // A port nobody listens on: bind one, note it, close it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string();
    drop(listener);
    let pool = Arc::new(Http1Pool::new(Duration::from_secs(3)));
    let endpoint = Arc::new(EndpointState::detached("gone-0", &authority));
    let err = pool.send(&endpoint, get("/")).await.unwrap_err();
    assert!(err.is_connect(), "{err}");
    assert!(err.to_string().contains(&authority), "{err}");
}
