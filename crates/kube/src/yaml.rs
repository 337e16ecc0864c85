//! YAML documents as trees that remember where every key and value was written, so that an
//! error names `file:line:col` and the YAML path (typed deserialization forgets both, and
//! would drop the fields we cannot honour without a word).
//!
//! Scalars are resolved as Kubernetes reads them (YAML 1.2 core schema): plain `null`, `~` and
//! nothing are null, `true`/`false` booleans, integers and floats numbers; quoted and block
//! scalars are strings. Anchors and aliases are resolved; a key given twice is an error.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// Where something was written: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// The entries of a mapping; `None` for anything else.
    pub fn entries(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The value under `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// What kind of value this is, for an error message.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A document that is not YAML, or a YAML feature we do not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{}: {message}", pos.line, pos.col)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

enum Open {
    Seq(Vec<Node>, Pos, usize),
    Map(Vec<(Key, Node)>, Pos, usize, Option<Key>),
}

/// Every document of a multi-document stream (`---` separated). Empty documents are left out.
pub fn parse(text: &str) -> Result<Vec<Node>, YamlError> {
    let mut docs = Vec::new();
    let mut stack: Vec<Open> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| YamlError {
            pos: Pos {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        let pos = Pos {
            line: span.start.line(),
            // The parser counts columns from 0.
            col: span.start.col() + 1,
        };
        let node = match event {
            Event::DocumentStart(_) => {
                anchors.clear();
                root = None;
                continue;
            }
            Event::DocumentEnd => {
                if let Some(doc) = root.take()
                    && !doc.is_null()
                {
                    docs.push(doc);
                }
                continue;
            }
            Event::SequenceStart(anchor, _) => {
                stack.push(Open::Seq(Vec::new(), pos, anchor));
                continue;
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Open::Map(Vec::new(), pos, anchor, None));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Open::Seq(items, start, anchor)) => remember(
                    &mut anchors,
                    anchor,
                    Node {
                        value: Value::Seq(items),
                        pos: start,
                    },
                ),
                _ => return Err(broken(pos)),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Open::Map(entries, start, anchor, None)) => remember(
                    &mut anchors,
                    anchor,
                    Node {
                        value: Value::Map(entries),
                        pos: start,
                    },
                ),
                _ => return Err(broken(pos)),
            },
            Event::Scalar(text, style, anchor, tag) => {
                let forced_str = tag.as_deref().is_some_and(|t| t.suffix == "str");
                let value = scalar(text, style, forced_str);
                remember(&mut anchors, anchor, Node { value, pos })
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some(n) => Node {
                    value: n.value.clone(),
                    pos,
                },
                None => {
                    return Err(YamlError {
                        pos,
                        message: "alias of an unknown anchor".into(),
                    });
                }
            },
            Event::StreamStart | Event::StreamEnd | Event::Nothing => continue,
        };
        // A finished node goes into what is open: as a key, as a value, or as the root.
        match stack.last_mut() {
            None => root = Some(node),
            Some(Open::Seq(items, ..)) => items.push(node),
            Some(Open::Map(entries, _, _, pending)) => match pending.take() {
                None => {
                    let name = match node.value {
                        Value::Str(s) => s,
                        Value::Int(i) => i.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Null => String::new(),
                        Value::Seq(_) | Value::Map(_) => {
                            return Err(YamlError {
                                pos: node.pos,
                                message: "a key must be a plain value, not a list or mapping"
                                    .into(),
                            });
                        }
                    };
                    if entries.iter().any(|(k, _)| k.name == name) {
                        return Err(YamlError {
                            pos: node.pos,
                            message: format!("key {name:?} given twice in one mapping"),
                        });
                    }
                    *pending = Some(Key {
                        name,
                        pos: node.pos,
                    });
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }
    Ok(docs)
}

fn remember(anchors: &mut HashMap<usize, Node>, anchor: usize, node: Node) -> Node {
    if anchor > 0 {
        anchors.insert(anchor, node.clone());
    }
    node
}

fn broken(pos: Pos) -> YamlError {
    YamlError {
        pos,
        message: "unbalanced YAML structure".into(),
    }
}

fn scalar(text: Cow<'_, str>, style: ScalarStyle, forced_str: bool) -> Value {
    if forced_str || style != ScalarStyle::Plain {
        return Value::Str(text.into_owned());
    }
    match text.as_ref() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(i) = int(&text) {
        return Value::Int(i);
    }
    let t = text.as_ref();
    let numeric = t
        .trim_start_matches(['-', '+'])
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.');
    if numeric && let Ok(f) = t.parse::<f64>() {
        return Value::Float(f);
    }
    match t {
        ".inf" | ".Inf" | ".INF" | "+.inf" => Value::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Value::Float(f64::NAN),
        _ => Value::Str(text.into_owned()),
    }
}

fn int(t: &str) -> Option<i64> {
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let magnitude = if let Some(hex) = digits.strip_prefix("0x") {
        i64::from_str_radix(hex, 16).ok()?
    } else if let Some(oct) = digits.strip_prefix("0o") {
        i64::from_str_radix(oct, 8).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn positions_kinds_and_documents() {
        let text = "a: 1\nb:\n  - x\n  - 'true'\n  - true\nc: ~\n---\n---\nkind: List\n";
        let docs = parse(text).unwrap();
        assert_eq!(docs.len(), 2, "the empty document is left out");
        let d = &docs[0];
        assert_eq!(d.get("a").unwrap().value, Value::Int(1));
        assert_eq!(d.get("a").unwrap().pos, Pos { line: 1, col: 4 });
        let b = d.get("b").unwrap();
        let Value::Seq(items) = &b.value else {
            panic!("{b:?}")
        };
        assert_eq!(items[0].pos, Pos { line: 3, col: 5 });
        assert_eq!(items[1].value, Value::Str("true".into()));
        assert_eq!(items[2].value, Value::Bool(true));
        assert!(d.get("c").unwrap().is_null());
        let (key, _) = &d.entries().unwrap()[1];
        assert_eq!(key.pos, Pos { line: 2, col: 1 });
        assert_eq!(docs[1].get("kind").unwrap().as_str(), Some("List"));
    }

    #[test]
    fn anchors_numbers_and_errors() {
        let docs = parse("base: &b {x: 1}\ncopy: *b\nn: -0x10\nf: 0.5\ns: 1.2.3\n").unwrap();
        assert_eq!(
            docs[0].get("copy").unwrap().get("x").unwrap().value,
            Value::Int(1)
        );
        assert_eq!(docs[0].get("n").unwrap().value, Value::Int(-16));
        assert_eq!(docs[0].get("f").unwrap().value, Value::Float(0.5));
        assert_eq!(docs[0].get("s").unwrap().as_str(), Some("1.2.3"));
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, col: 1 });
        assert!(e.message.contains("twice"), "{e}");
        let e = parse("a: [1, 2\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e}");
    }
}
