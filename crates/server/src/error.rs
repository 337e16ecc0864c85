//! API errors: JSON bodies with a message, the offending field and the request id.
//!
//! Internal errors are logged with their detail and answered with a generic message, so store
//! paths and backend messages never leak to clients.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_store::StoreError;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub code: u16,
    /// Machine-readable reason: `Unauthorized`, `NotFound`, `Invalid`, `Conflict`, ….
    pub reason: &'static str,
    pub message: String,
    /// Field path of the offending value, when there is one (`spec.replicas`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every problem found, when validation found several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<FieldProblem>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: status.as_u16(),
            reason,
            message: message.into(),
            field: None,
            details: Vec::new(),
        }
    }
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Conflict", message)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "internal error; see the server log for this request id",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if let StoreError::Conflict { key, .. } = &error {
            let name = key.rsplit('/').next().unwrap_or(key);
            return ApiError::conflict(format!(
                "{name} was changed by someone else; read it again and retry"
            ))
            .with_field("metadata.resourceVersion");
        }
        if let StoreError::Unavailable { store, .. } = &error {
            tracing::warn!(error = %flotilla_store::error_chain(&error), "the store is unavailable");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "StoreUnavailable",
                format!(
                    "the store ({store}) is unavailable: nothing was written; retry once it is back (see the server log for this request id)"
                ),
            );
        }
        tracing::error!(%error, "store error while serving a request");
        ApiError::internal()
    }
}

impl From<crate::operations::OpError> for ApiError {
    fn from(error: crate::operations::OpError) -> Self {
        use crate::operations::OpError;
        let message = error.to_string();
        match error {
            OpError::NotFound { .. } => ApiError::not_found(message),
            OpError::Conflict { field, .. } => {
                let e = ApiError::conflict(message);
                match field {
                    Some(f) => e.with_field(f),
                    None => e,
                }
            }
            OpError::Invalid { problems } => {
                let mut e = ApiError::invalid(message);
                e.field = problems.first().map(|p| p.field.clone());
                e.details = problems;
                e
            }
            OpError::Store(e) => e.into(),
        }
    }
}

/// The body is rendered by the request-id middleware, which adds the request id.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
