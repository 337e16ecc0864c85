//! Bodies: the client's request body shared between upstream attempts, and the gateway's
//! response body type.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
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

pub fn stream(body: Incoming) -> GatewayBody {
    body.map_err(BoxError::from).boxed_unsync()
}

/// The client's request body, handed from one upstream attempt to the next until an attempt
/// starts reading it. After a failed attempt, [`Replay::unsent`] tells whether the body is
/// still whole (never polled), i.e. whether the request can go to another endpoint without
/// buffering anything.
#[derive(Debug, Clone)]
pub struct Replay {
    slot: Arc<Mutex<Option<Incoming>>>,
    hint: SizeHint,
    end: bool,
}

impl Replay {
    pub fn new(body: Incoming) -> Self {
        Self {
            hint: body.size_hint(),
            end: body.is_end_stream(),
            slot: Arc::new(Mutex::new(Some(body))),
        }
    }

    /// A body for one attempt.
    pub fn attempt(&self) -> AttemptBody {
        AttemptBody {
            replay: self.clone(),
            body: None,
        }
    }

    /// True while no attempt has read any of the body.
    pub fn unsent(&self) -> bool {
        lock(&self.slot).is_some()
    }
}

fn lock(slot: &Mutex<Option<Incoming>>) -> MutexGuard<'_, Option<Incoming>> {
    // Only `Option::take` and `is_some` run under the lock; a poisoned slot is still consistent.
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The request body of one upstream attempt: takes the client's body on its first poll.
#[derive(Debug)]
pub struct AttemptBody {
    replay: Replay,
    body: Option<Incoming>,
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
            match lock(&this.replay.slot).take() {
                Some(body) => this.body = Some(body),
                // Only reachable if a caller retried after a read began: fail loudly rather than
                // send a truncated body.
                None => return Poll::Ready(Some(Err(BodyTaken.into()))),
            }
        }
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(body) => body.is_end_stream(),
            None => self.replay.end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => self.replay.hint,
        }
    }
}
