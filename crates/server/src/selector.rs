//! Equality-based label selectors, as Kubernetes writes them: `app=web,tier!=db,canary,!legacy`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

impl Selector {
    /// Parses a selector; the error names the offending term.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for raw in s.split(',') {
            let t = raw.trim();
            if t.is_empty() {
                continue;
            }
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::NotEq(key(k, t)?, value(v, t)?)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Term::Eq(key(k, t)?, value(v, t)?)
            } else if let Some(k) = t.strip_prefix('!') {
                Term::NotExists(key(k, t)?)
            } else {
                Term::Exists(key(t, t)?)
            };
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }
}

fn valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn key(k: &str, term: &str) -> Result<String, String> {
    let k = k.trim();
    if valid(k) {
        Ok(k.to_string())
    } else {
        Err(format!(
            "invalid label selector term {term:?}: bad key {k:?}"
        ))
    }
}

fn value(v: &str, term: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() || valid(v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "invalid label selector term {term:?}: bad value {v:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selects() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(Selector::parse("app=web").unwrap().matches(&l));
        assert!(Selector::parse("app==web,tier").unwrap().matches(&l));
        assert!(!Selector::parse("app!=web").unwrap().matches(&l));
        assert!(Selector::parse("!legacy").unwrap().matches(&l));
        assert!(!Selector::parse("app=web,db").unwrap().matches(&l));
        assert!(Selector::parse("").unwrap().matches(&l));
    }

    #[test]
    fn rejects_garbage() {
        let e = Selector::parse("app=web,a b=c").unwrap_err();
        assert!(e.contains("a b=c"), "{e}");
    }
}
