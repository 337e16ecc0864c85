//! The OpenAPI 3.1 document served at `/openapi.json`.

pub const DOCUMENT: &str = include_str!("openapi.json");
