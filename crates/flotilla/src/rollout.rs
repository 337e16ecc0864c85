//! `flotilla rollout …` and `flotilla restart`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use flotilla_spec::{Revision, RolloutPhase, Service};
use hyper::Method;
use serde::Deserialize;

use crate::RolloutCommand;
use crate::client::{Client, ensure_name};
use crate::output;

/// `rollout status` exit codes beyond 0 (complete) and 1 (failed, rolled back, or an error);
/// 2 is a usage error, as for every command. The README lists them all.
const EXIT_IN_PROGRESS: u8 = 3;
const EXIT_PAUSED: u8 = 4;
const EXIT_TIMEOUT: u8 = 5;

#[derive(Deserialize)]
struct List<T> {
    items: Vec<T>,
}

pub async fn run(client: &Client, cmd: RolloutCommand) -> Result<ExitCode> {
    match cmd {
        RolloutCommand::Status {
            service,
            no_watch,
            timeout,
        } => status(client, &service, !no_watch, timeout.into()).await,
        RolloutCommand::History { service, output } => history(client, &service, output).await,
        RolloutCommand::Undo {
            service,
            to_revision,
        } => {
            ensure_name("service", &service)?;
            let body = serde_json::json!({ "toRevision": to_revision });
            let (_, bytes) = client
                .call(
                    Method::POST,
                    &format!("/api/v1/services/{service}/rollback"),
                    Some(serde_json::to_vec(&body)?),
                )
                .await?;
            let s: Service = serde_json::from_slice(&bytes)?;
            let cause = s
                .metadata
                .annotations
                .get(flotilla_spec::annotations::CHANGE_CAUSE)
                .cloned()
                .unwrap_or_default();
            println!("service/{service} rolling back ({cause})");
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Pause { service } => post(client, &service, "pause", "paused").await,
        RolloutCommand::Resume { service } => post(client, &service, "resume", "resumed").await,
    }
}

pub async fn restart(client: &Client, service: &str) -> Result<ExitCode> {
    post(client, service, "restart", "restarting").await
}

async fn post(client: &Client, service: &str, verb: &str, done: &str) -> Result<ExitCode> {
    ensure_name("service", service)?;
    client
        .call(
            Method::POST,
            &format!("/api/v1/services/{service}/{verb}"),
            None,
        )
        .await?;
    println!("service/{service} {done}");
    Ok(ExitCode::SUCCESS)
}

async fn history(client: &Client, service: &str, out: crate::Output) -> Result<ExitCode> {
    ensure_name("service", service)?;
    let s: Service = client.get(&format!("/api/v1/services/{service}")).await?;
    let l: List<Revision> = client
        .get(&format!("/api/v1/services/{service}/revisions"))
        .await?;
    match out {
        crate::Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "items": l.items }))?
        ),
        crate::Output::Table | crate::Output::Wide => print!(
            "{}",
            output::revisions_table(&l.items, s.status.revision, out == crate::Output::Wide)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// One line describing where the rollout is.
fn line(s: &Service) -> (String, Option<RolloutPhase>) {
    let st = &s.status;
    let want = s.spec.replicas;
    let Some(r) = &st.rollout else {
        return (
            format!(
                "waiting for the controller to see service {}",
                s.metadata.name
            ),
            None,
        );
    };
    let bar = progress_bar(st.available_replicas, want);
    let text = match r.phase {
        RolloutPhase::Progressing => format!(
            "revision {} {bar} {}/{want} updated, {}/{want} available — {}",
            st.revision, st.updated_replicas, st.available_replicas, r.message
        ),
        _ => format!(
            "revision {} {}: {}",
            st.revision,
            r.phase.as_str(),
            r.message
        ),
    };
    (text, Some(r.phase))
}

fn progress_bar(done: u32, total: u32) -> String {
    const WIDTH: u32 = 20;
    let filled = (done.min(total) * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    format!(
        "[{}{}]",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize)
    )
}

async fn status(
    client: &Client,
    service: &str,
    watch: bool,
    timeout: Duration,
) -> Result<ExitCode> {
    ensure_name("service", service)?;
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let s: Service = client.get(&format!("/api/v1/services/{service}")).await?;
        // Only judge (or show) a status that has seen the latest spec and restart token: right
        // after an apply or a restart, the stored status is still about the previous one.
        let current = s.status.observed_generation >= s.metadata.generation
            && s.status.spec_hash == flotilla_spec::target_hash(&s);
        let paused = s
            .metadata
            .annotations
            .get(flotilla_spec::annotations::PAUSED)
            .is_some_and(|v| v == "true");
        let (text, phase) = if paused {
            // The annotation is the truth; the controller's status may not have caught up.
            (
                format!(
                    "revision {} Paused: nothing is started or stopped until `flotilla rollout resume {}`",
                    s.status.revision, s.metadata.name
                ),
                Some(RolloutPhase::Paused),
            )
        } else if current
            && s.status.rollout.as_ref().map(|r| r.phase) != Some(RolloutPhase::Paused)
        {
            line(&s)
        } else {
            (
                format!(
                    "waiting for the controller to start the rollout of service {}",
                    s.metadata.name
                ),
                None,
            )
        };
        if text != last {
            let mut out = std::io::stdout().lock();
            if tty {
                write!(out, "\r\x1b[K{text}")?;
            } else {
                writeln!(out, "{text}")?;
            }
            out.flush()?;
            last = text;
        }
        let verdict = match (current, phase) {
            (true, Some(RolloutPhase::Complete)) => Some(ExitCode::SUCCESS),
            (true, Some(RolloutPhase::Failed | RolloutPhase::RolledBack)) => {
                Some(ExitCode::from(1))
            }
            // Nothing happens until `rollout resume`: waiting would only run out the timeout.
            (_, Some(RolloutPhase::Paused)) => Some(ExitCode::from(EXIT_PAUSED)),
            _ => None,
        };
        if let Some(code) = verdict {
            if tty {
                println!();
            }
            return Ok(code);
        }
        if !watch {
            if tty {
                println!();
            }
            return Ok(ExitCode::from(EXIT_IN_PROGRESS));
        }
        if started.elapsed() >= timeout {
            if tty {
                println!();
            }
            eprintln!(
                "error: rollout of {service} did not finish within {}",
                humantime::format_duration(timeout)
            );
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
