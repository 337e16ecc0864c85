//! `/api/v1/services/{name}/logs`.

use super::*;

/// `GET /api/v1/services/{name}/logs?instance=&tail=&follow=`. Without `instance`, the logs
/// of every instance of the service, each line prefixed with `[instance]`.
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
    let shutdown = state.shutdown.child_token();
    for instance in targets {
        let mut source = state.logs.follow(&instance, tail, shutdown.clone());
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let chunk = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => { shutdown.cancel(); return }
                    c = source.recv() => c,
                };
                match chunk {
                    Some(Ok(bytes)) => {
                        let mut out = Vec::with_capacity(bytes.len());
                        append_lines(&mut out, &instance, &bytes, prefixed);
                        if !send_chunk(&tx, Bytes::from(out), &shutdown).await {
                            shutdown.cancel();
                            return;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::debug!(instance, %error, "log follow ended");
                        return;
                    }
                    None => return,
                }
            }
        });
    }
    drop(tx);
    Ok(stream_response(rx, "text/plain; charset=utf-8"))
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
