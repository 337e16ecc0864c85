//! Error types: a [`SpecError`] names file, line, column and field path.

use std::fmt;

use crate::path::FieldPath;

/// A problem with one field, found by validation (no location yet: see [`SpecError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_path_message(&self.path.to_string(), &self.message))]
pub struct FieldError {
    pub path: FieldPath,
    pub message: String,
}

impl FieldError {
    pub fn new(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }

    /// The same error with `prefix` put in front of its path.
    pub fn prefixed(mut self, prefix: &FieldPath) -> Self {
        self.path = self.path.prefixed(prefix);
        self
    }
}

fn display_path_message(path: &str, message: &str) -> String {
    if path.is_empty() {
        message.to_string()
    } else {
        format!("{path}: {message}")
    }
}

/// One error in a flotilla file or API body, located as precisely as possible.
///
/// Displays as `file:line:col: path: message`; parts that are unknown are left out
/// (no file for API bodies, no path for a syntax error, line 0 when nothing could be located).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub file: Option<String>,
    /// 1-based; 0 when unknown.
    pub line: usize,
    /// 1-based, in characters; 0 when unknown.
    pub col: usize,
    /// Field path, e.g. `service.web.probes.readiness.period` (empty for syntax errors).
    pub path: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}:")?;
        }
        if self.line > 0 {
            write!(f, "{}:{}: ", self.line, self.col)?;
        } else if self.file.is_some() {
            f.write_str(" ")?;
        }
        f.write_str(&display_path_message(&self.path, &self.message))
    }
}

/// All errors found in one document, in document order. Never empty when returned as `Err`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, SpecError> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl IntoIterator for SpecErrors {
    type Item = SpecError;
    type IntoIter = std::vec::IntoIter<SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a SpecErrors {
    type Item = &'a SpecError;
    type IntoIter = std::slice::Iter<'a, SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_forms() {
        let e = SpecError {
            file: Some("f.toml".into()),
            line: 3,
            col: 5,
            path: "service.web.replicas".into(),
            message: "must be at most 1000".into(),
        };
        assert_eq!(
            e.to_string(),
            "f.toml:3:5: service.web.replicas: must be at most 1000"
        );
        let e2 = SpecError {
            file: None,
            line: 1,
            col: 2,
            path: String::new(),
            message: "expected value".into(),
        };
        assert_eq!(e2.to_string(), "1:2: expected value");
        let all = SpecErrors(vec![e, e2]);
        assert_eq!(all.to_string().lines().count(), 2);
    }
}
