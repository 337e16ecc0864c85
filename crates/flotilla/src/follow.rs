//! Following a stream of the API (`events -f`, `logs -f`) through a restart of the server or a
//! broken connection: when the stream ends, the CLI finds the API again (re-reading the context
//! file, since a restarted `up` may listen elsewhere) and resumes where it was, with backoff.
//! It gives up — with an error and exit 1 — only after `reconnect_for` without an answer, or at
//! once on an answer that will not change (a 4xx: bad token, no such service).

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use http_body_util::BodyExt;

use crate::client::{ApiFailure, Client};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Streams `path()` into `chunk` until the user stops it; `path` is asked again for each
/// connection (it carries where to resume). The first connection's failure is returned at
/// once: it is the user's to see. `connect` finds the API again after a loss.
pub async fn follow(
    first: Client,
    connect: &dyn Fn() -> Result<Client>,
    mut path: impl FnMut() -> String,
    mut chunk: impl FnMut(&[u8]) -> Result<()>,
    reconnect_for: Duration,
) -> Result<()> {
    let mut client = first;
    let mut body = client.open_stream(&path()).await?;
    loop {
        let cause = loop {
            match body.frame().await {
                None => break anyhow!("the API ended the stream"),
                Some(Err(e)) => break anyhow!("the stream broke ({e})"),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        chunk(data)?;
                    }
                }
            }
        };
        eprintln!(
            "flotilla: lost the API at {}: {cause:#}; reconnecting (for up to {})",
            client.base(),
            humantime::format_duration(reconnect_for)
        );
        let lost = Instant::now();
        let mut delay = BACKOFF_MIN;
        body = loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF_MAX);
            let attempt = match connect() {
                Ok(c) => {
                    client = c;
                    client.open_stream(&path()).await
                }
                Err(e) => Err(e),
            };
            match attempt {
                Ok(body) => {
                    eprintln!("flotilla: reconnected to {}", client.base());
                    break body;
                }
                Err(e) if permanent(&e) => return Err(e),
                Err(e) if lost.elapsed() >= reconnect_for => {
                    return Err(e.context(format!(
                        "the API did not come back within {}",
                        humantime::format_duration(reconnect_for)
                    )));
                }
                Err(_) => {}
            }
        };
    }
}

/// An answer that another attempt would only repeat.
fn permanent(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiFailure>()
        .is_some_and(|f| f.status.is_client_error())
}
