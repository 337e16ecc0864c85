//! Field paths such as `service.web.routes[0].host`, used to name where an error is.

use std::fmt;

/// One step of a [`FieldPath`]: a table key / struct field, or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A path from the root of a document to a value.
///
/// Displays as dotted keys with `[i]` for array elements; keys that are not bare TOML keys
/// are quoted (`env."A.B"`). The empty path displays as the empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(pub Vec<PathSeg>);

impl FieldPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// This path with `key` appended.
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut p = self.clone();
        p.0.push(PathSeg::Key(key.into()));
        p
    }

    /// This path with `[index]` appended.
    pub fn index(&self, index: usize) -> Self {
        let mut p = self.clone();
        p.0.push(PathSeg::Index(index));
        p
    }

    /// `prefix` followed by this path.
    pub fn prefixed(&self, prefix: &FieldPath) -> Self {
        let mut segs = prefix.0.clone();
        segs.extend(self.0.iter().cloned());
        Self(segs)
    }

    /// The path without its last segment (the root stays the root).
    pub fn parent(&self) -> Self {
        let mut p = self.clone();
        p.0.pop();
        p
    }

    pub fn last(&self) -> Option<&PathSeg> {
        self.0.last()
    }

    /// Builds a path from dotted keys: `FieldPath::from_keys(["service", "web"])`.
    pub fn from_keys<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self(keys.into_iter().map(|k| PathSeg::Key(k.into())).collect())
    }
}

fn is_bare_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl fmt::Display for PathSeg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathSeg::Key(k) if is_bare_key(k) => f.write_str(k),
            PathSeg::Key(k) => write!(f, "{k:?}"),
            PathSeg::Index(i) => write!(f, "[{i}]"),
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            if i > 0 && matches!(seg, PathSeg::Key(_)) {
                f.write_str(".")?;
            }
            write!(f, "{seg}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let p = FieldPath::from_keys(["service", "web", "routes"])
            .index(0)
            .key("host");
        assert_eq!(p.to_string(), "service.web.routes[0].host");
        assert_eq!(
            FieldPath::root().key("env").key("A.B").to_string(),
            "env.\"A.B\""
        );
        assert_eq!(FieldPath::root().to_string(), "");
        assert_eq!(p.parent().to_string(), "service.web.routes[0]");
    }
}
