//! `/api/v1/services`: apply, get, list, delete; revisions, rollback, pause, resume, restart.

use super::*;

#[derive(Debug, Serialize)]
pub(super) struct ApplyResponse {
    result: ApplyResult,
    service: Service,
}

/// Parses an apply body (a `Service` object); every error names the field path and the
/// line:col in the body.
pub(super) fn parse_apply(body: &[u8]) -> ApiResult<Service> {
    flotilla_spec::parse_service_object_json(body).map_err(|errors| {
        let problems: Vec<FieldProblem> = errors
            .0
            .iter()
            .map(|e| FieldProblem {
                field: if e.path.is_empty() {
                    "body".to_string()
                } else {
                    e.path.clone()
                },
                message: format!("line {} column {}: {}", e.line, e.col, e.message),
            })
            .collect();
        if errors.0.iter().all(|e| e.path.is_empty()) {
            let mut error = ApiError::bad_request(format!(
                "malformed request body: {}",
                problems
                    .iter()
                    .map(|p| p.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
            error.details = problems;
            error
        } else {
            validation_error(problems)
        }
    })
}

pub(super) fn validation_error(problems: Vec<FieldProblem>) -> ApiError {
    operations::OpError::Invalid { problems }.into()
}

/// Create or update a service from a `{metadata, spec}` body.
pub(super) async fn apply_service(
    State(state): State<ApiState>,
    body: Bytes,
) -> ApiResult<Response> {
    let service = parse_apply(&body)?;
    let request = ApplyRequest {
        name: service.metadata.name,
        labels: service.metadata.labels,
        annotations: service.metadata.annotations,
        resource_version: Some(service.metadata.resource_version),
        spec: service.spec,
    };
    let (result, service) = operations::apply(&*state.store, request, "api").await?;
    let status = if result == ApplyResult::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ApplyResponse { result, service })).into_response())
}

pub(super) async fn list_services(
    State(state): State<ApiState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<List<Service>>> {
    let sel = selector(&query)?;
    let (items, rev) = typed::list::<Service>(&*state.store).await?;
    Ok(Json(List {
        items: items
            .into_iter()
            .filter(|s| sel.matches(&s.metadata.labels))
            .collect(),
        resource_version: rev,
    }))
}

/// `GET /api/v1/{kind}/{name}` for any stored kind.
pub(super) async fn get_object<T: Object>(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<T>> {
    match typed::get::<T>(&*state.store, &name).await? {
        Some(object) => Ok(Json(object)),
        None => Err(operations::not_found::<T>(&*state.store, &name)
            .await
            .into()),
    }
}

pub(super) async fn delete_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    Ok(Json(
        operations::delete_service(&*state.store, &name, "api").await?,
    ))
}

pub(super) async fn list_revisions(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<List<ServiceRevision>>> {
    let service = operations::get_service(&*state.store, &name).await?;
    Ok(Json(List {
        items: operations::revisions_of(&*state.store, &name).await?,
        resource_version: service.metadata.resource_version,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RollbackBody {
    /// Revision to return to; default: the one before the current revision.
    #[serde(default)]
    to_revision: Option<u64>,
}

/// `rollout undo`: the service's spec becomes that of an earlier revision (a new revision
/// records it), through the same compare-and-swap as any write.
pub(super) async fn rollback(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Service>> {
    let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        json_body(&body)?
    };
    let service = operations::rollback(&*state.store, &name, body.to_revision, "api").await?;
    Ok(Json(service))
}

pub(super) async fn pause(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    Ok(Json(operations::pause(&*state.store, &name).await?))
}

pub(super) async fn resume(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    Ok(Json(operations::resume(&*state.store, &name).await?))
}

/// A rolling restart: new instances of the same spec, one revision later.
pub(super) async fn restart(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    Ok(Json(
        operations::restart(&*state.store, &name, "api").await?,
    ))
}
