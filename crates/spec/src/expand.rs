//! `${NAME}` expansion in args and env values.
//!
//! Rules: `${NAME}` is replaced by the variable's value (an unknown variable is an error);
//! `$$` is a literal `$`; a `$` followed by anything else (or at the end) stays as it is;
//! `${` without a closing `}` or with an invalid name is an error. Names are
//! `[A-Za-z_][A-Za-z0-9_]*`. Expansion is a single pass: values are not expanded again.

use std::collections::BTreeMap;

/// Why a template could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("unknown variable `{name}` in `${{{name}}}`")]
    UnknownVariable { name: String },
    #[error("unterminated `${{` at byte {at}: expected `}}`")]
    Unterminated { at: usize },
    #[error("invalid variable name `{name}` in `${{…}}`: expected [A-Za-z_][A-Za-z0-9_]*")]
    InvalidName { name: String },
}

/// Expands `template` with `vars`. See the module docs for the rules.
pub fn expand(template: &str, vars: &BTreeMap<String, String>) -> Result<String, ExpandError> {
    expand_with(template, |name| vars.get(name).map(String::as_str))
}

/// Expands `template`, looking variables up with `lookup`.
pub fn expand_with<'v, F>(template: &str, lookup: F) -> Result<String, ExpandError>
where
    F: Fn(&str) -> Option<&'v str>,
{
    let mut out = String::with_capacity(template.len());
    for piece in pieces(template) {
        match piece? {
            Piece::Text(t) => out.push_str(t),
            Piece::Var(name) => match lookup(name) {
                Some(v) => out.push_str(v),
                None => {
                    return Err(ExpandError::UnknownVariable {
                        name: name.to_string(),
                    });
                }
            },
        }
    }
    Ok(out)
}

/// Names of the variables `template` refers to, in order, or its first syntax error.
pub fn template_vars(template: &str) -> Result<Vec<String>, ExpandError> {
    let mut names = Vec::new();
    for piece in pieces(template) {
        if let Piece::Var(name) = piece? {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// True for `[A-Za-z_][A-Za-z0-9_]*`: a valid environment / template variable name.
pub fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

fn pieces(template: &str) -> Pieces<'_> {
    Pieces {
        s: template,
        pos: 0,
        failed: false,
    }
}

struct Pieces<'a> {
    s: &'a str,
    pos: usize,
    failed: bool,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Result<Piece<'a>, ExpandError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.s.len() {
            return None;
        }
        let rest = self.s.get(self.pos..)?;
        let Some(dollar) = rest.find('$') else {
            self.pos = self.s.len();
            return Some(Ok(Piece::Text(rest)));
        };
        if dollar > 0 {
            self.pos += dollar;
            return Some(Ok(Piece::Text(&rest[..dollar])));
        }
        // `rest` starts with `$`.
        let after = &rest[1..];
        if after.starts_with('$') {
            self.pos += 2;
            return Some(Ok(Piece::Text("$")));
        }
        if let Some(body) = after.strip_prefix('{') {
            let Some(close) = body.find('}') else {
                self.failed = true;
                return Some(Err(ExpandError::Unterminated { at: self.pos }));
            };
            let name = &body[..close];
            if !is_var_name(name) {
                self.failed = true;
                return Some(Err(ExpandError::InvalidName {
                    name: name.to_string(),
                }));
            }
            self.pos += 2 + close + 1;
            return Some(Ok(Piece::Var(name)));
        }
        // A lone `$`: literal.
        self.pos += 1;
        Some(Ok(Piece::Text("$")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars() -> BTreeMap<String, String> {
        [("PORT", "8080"), ("NAME", "web"), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_variables() {
        let v = vars();
        assert_eq!(expand("--port=${PORT}", &v).unwrap(), "--port=8080");
        assert_eq!(expand("${NAME}-${PORT}", &v).unwrap(), "web-8080");
        assert_eq!(expand("a${EMPTY}b", &v).unwrap(), "ab");
        assert_eq!(expand("", &v).unwrap(), "");
    }

    #[test]
    fn dollar_rules() {
        let v = vars();
        assert_eq!(expand("$$", &v).unwrap(), "$");
        assert_eq!(expand("$${PORT}", &v).unwrap(), "${PORT}");
        assert_eq!(expand("$HOME", &v).unwrap(), "$HOME");
        assert_eq!(expand("cost: 5$", &v).unwrap(), "cost: 5$");
        assert_eq!(expand("$ $x", &v).unwrap(), "$ $x");
        assert_eq!(expand("é$é", &v).unwrap(), "é$é");
        // Values are not expanded again.
        let mut v2 = v.clone();
        v2.insert("X".into(), "${PORT}".into());
        assert_eq!(expand("${X}", &v2).unwrap(), "${PORT}");
    }

    #[test]
    fn errors() {
        let v = vars();
        assert_eq!(
            expand("${NOPE}", &v),
            Err(ExpandError::UnknownVariable {
                name: "NOPE".into()
            })
        );
        assert_eq!(
            expand("${NOPE}", &v).unwrap_err().to_string(),
            "unknown variable `NOPE` in `${NOPE}`"
        );
        assert_eq!(
            expand("ab${PORT", &v),
            Err(ExpandError::Unterminated { at: 2 })
        );
        assert_eq!(
            expand("${}", &v),
            Err(ExpandError::InvalidName {
                name: String::new()
            })
        );
        assert_eq!(
            expand("${1X}", &v),
            Err(ExpandError::InvalidName { name: "1X".into() })
        );
    }

    #[test]
    fn lists_vars() {
        assert_eq!(
            template_vars("${A}$$${B_1}$x").unwrap(),
            vec!["A".to_string(), "B_1".to_string()]
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = expand(&s, &vars());
            let _ = template_vars(&s);
        }

        #[test]
        fn identity_without_dollar(s in "[^$]*") {
            prop_assert_eq!(expand(&s, &vars()).unwrap(), s);
        }

        #[test]
        fn escaped_dollars_are_literal(s in "[^$]*") {
            let escaped = s.replace('a', "$$");
            prop_assert_eq!(expand(&escaped, &BTreeMap::new()).unwrap(), s.replace('a', "$"));
        }
    }
}
