//! Bodies: the client's request body shared between upstream attempts (with the body size
//! limit), and the gateway's response body type. (The upstream response body that gives its
//! connection back to the pool is [`crate::upstream::tracked`].)

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_store::lock;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the gateway answers with: a streamed upstream body or a short local one.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The request body was longer than the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The client's request body, handed from one upstream attempt to the next until an attempt
/// starts reading it. After a failed attempt, [`Replay::unsent`] tells whether the body is
/// still whole (never polled), i.e. whether the request can go to another endpoint without
/// buffering anything. Reading more than `limit` bytes fails the attempt and sets
/// [`Replay::too_large`].
#[derive(Debug, Clone)]
pub struct Replay {
    /// `None` for a request without a body (most of them): nothing to hand over, nothing
    /// allocated.
    shared: Option<Arc<Shared>>,
    hint: SizeHint,
}

#[derive(Debug)]
struct Shared {
    slot: Mutex<Option<Incoming>>,
    limit: u64,
    read: AtomicU64,
    too_large: AtomicBool,
}

impl Replay {
    pub fn new(body: Incoming, limit: u64) -> Self {
        let hint = body.size_hint();
        if body.is_end_stream() {
            return Self { shared: None, hint };
        }
        Self {
            hint,
            shared: Some(Arc::new(Shared {
                slot: Mutex::new(Some(body)),
                limit,
                read: AtomicU64::new(0),
                too_large: AtomicBool::new(false),
            })),
        }
    }

    /// A body for one attempt.
    pub fn attempt(&self) -> AttemptBody {
        AttemptBody {
            replay: self.clone(),
            body: None,
        }
    }

    /// True while no attempt has read any of the body (always, without a body).
    pub fn unsent(&self) -> bool {
        self.shared.as_ref().is_none_or(|s| lock(&s.slot).is_some())
    }

    /// True once more than the limit was read.
    pub fn too_large(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.too_large.load(Ordering::Relaxed))
    }
}

/// The request body of one upstream attempt: takes the client's body on its first poll.
#[derive(Debug)]
pub struct AttemptBody {
    replay: Replay,
    body: Option<Incoming>,
}

impl AttemptBody {
    /// An empty body (upgrade requests, local tests).
    pub fn empty() -> Self {
        Self {
            replay: Replay {
                shared: None,
                hint: SizeHint::with_exact(0),
            },
            body: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was already sent to another upstream")]
struct BodyTaken;

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.body.is_none() {
            let Some(shared) = &this.replay.shared else {
                return Poll::Ready(None);
            };
            match lock(&shared.slot).take() {
                Some(body) => this.body = Some(body),
                // Only reachable if a caller retried after a read began: fail loudly rather than
                // send a truncated body.
                None => return Poll::Ready(Some(Err(BodyTaken.into()))),
            }
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(shared) = &this.replay.shared
        {
            let read =
                shared.read.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
            if read > shared.limit {
                shared.too_large.store(true, Ordering::Relaxed);
                this.body = None;
                return Poll::Ready(Some(Err(BodyTooLarge {
                    limit: shared.limit,
                }
                .into())));
            }
        }
        polled.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(body) => body.is_end_stream(),
            None => self.replay.shared.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => self.replay.hint,
        }
    }
}
