//! Finding where a field path is in the source text: byte offsets → 1-based line:col.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::path::{FieldPath, PathSeg};

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Where to point for a path: at the value, or at the key naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Value,
    Key,
}

/// Something that can tell the byte offset of a value (or its key) in the source.
pub(crate) trait Locate {
    fn offset(&self, path: &FieldPath, target: Target) -> Option<usize>;

    /// The offset of `path`, or of its nearest ancestor present in the source.
    fn nearest(&self, path: &FieldPath, target: Target) -> usize {
        let mut p = path.clone();
        let mut target = target;
        loop {
            if let Some(o) = self.offset(&p, target) {
                return o;
            }
            if p.is_root() {
                return 0;
            }
            p = p.parent();
            // An ancestor is best pointed at by its key (the header or `key =` line).
            target = Target::Key;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TOML

pub(crate) struct TomlLocator<'a, 'i> {
    pub(crate) root: &'a Spanned<DeTable<'i>>,
}

impl Locate for TomlLocator<'_, '_> {
    fn offset(&self, path: &FieldPath, target: Target) -> Option<usize> {
        let Some((last, init)) = path.0.split_last() else {
            return Some(self.root.span().start);
        };
        let mut cur: &DeValue<'_> = &DeValue::Table(DeTable::new());
        let mut table: Option<&DeTable<'_>> = Some(self.root.get_ref());
        for seg in init {
            let next = step_toml(table, cur, seg)?;
            cur = next.0.get_ref();
            table = cur.as_table();
        }
        let (value, key_start) = step_toml(table, cur, last)?;
        // A table is best pointed at by its key: its own span starts at the header.
        let at_key = target == Target::Key || value.get_ref().is_table();
        match (at_key, key_start) {
            (true, Some(k)) => Some(k),
            _ => Some(value.span().start),
        }
    }
}

/// One step down: returns the child and, for a table entry, the start of its key.
fn step_toml<'a, 'i>(
    table: Option<&'a DeTable<'i>>,
    cur: &'a DeValue<'i>,
    seg: &PathSeg,
) -> Option<(&'a Spanned<DeValue<'i>>, Option<usize>)> {
    match seg {
        PathSeg::Key(k) => {
            let t = table?;
            t.iter()
                .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                .map(|(key, v)| (v, Some(key.span().start)))
        }
        PathSeg::Index(i) => cur.as_array()?.get(*i).map(|v| (v, None)),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON: a small scanner over text already known to be valid JSON.

pub(crate) struct JsonLocator<'a> {
    pub(crate) text: &'a [u8],
}

impl Locate for JsonLocator<'_> {
    fn offset(&self, path: &FieldPath, target: Target) -> Option<usize> {
        let b = self.text;
        let mut pos = skip_ws(b, 0);
        let mut key_pos = None;
        for seg in &path.0 {
            match seg {
                PathSeg::Key(k) => {
                    let (kp, vp) = find_key(b, pos, k)?;
                    key_pos = Some(kp);
                    pos = vp;
                }
                PathSeg::Index(i) => {
                    pos = find_index(b, pos, *i)?;
                    key_pos = None;
                }
            }
        }
        let at_key = target == Target::Key || b.get(pos) == Some(&b'{');
        match (at_key, key_pos) {
            (true, Some(k)) => Some(k),
            _ => Some(pos),
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at `i` (which must be `"`).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// End (exclusive) of the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        open @ (b'{' | b'[') => {
            let close = if open == b'{' { b'}' } else { b']' };
            let mut j = skip_ws(b, i + 1);
            if b.get(j) == Some(&close) {
                return Some(j + 1);
            }
            loop {
                if open == b'{' {
                    j = skip_string(b, j)?;
                    j = skip_ws(b, j);
                    if b.get(j) != Some(&b':') {
                        return None;
                    }
                    j = skip_ws(b, j + 1);
                }
                j = skip_value(b, j)?;
                j = skip_ws(b, j);
                match b.get(j)? {
                    b',' => j = skip_ws(b, j + 1),
                    c if *c == close => return Some(j + 1),
                    _ => return None,
                }
            }
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// In the object starting at `i`, the (key start, value start) of the last entry named `key`.
fn find_key(b: &[u8], i: usize, key: &str) -> Option<(usize, usize)> {
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut found = None;
    let mut j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b'}') {
        return None;
    }
    loop {
        let kstart = j;
        let kend = skip_string(b, j)?;
        let name: Option<String> = serde_json::from_slice(&b[kstart..kend]).ok();
        j = skip_ws(b, kend);
        if b.get(j) != Some(&b':') {
            return found;
        }
        j = skip_ws(b, j + 1);
        if name.as_deref() == Some(key) {
            found = Some((kstart, j));
        }
        j = skip_value(b, j)?;
        j = skip_ws(b, j);
        match b.get(j) {
            Some(b',') => j = skip_ws(b, j + 1),
            _ => return found,
        }
    }
}

/// In the array starting at `i`, the start of element `index`.
fn find_index(b: &[u8], i: usize, index: usize) -> Option<usize> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b']') {
        return None;
    }
    let mut n = 0;
    loop {
        if n == index {
            return Some(j);
        }
        j = skip_value(b, j)?;
        j = skip_ws(b, j);
        match b.get(j) {
            Some(b',') => j = skip_ws(b, j + 1),
            _ => return None,
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_cols() {
        let t = "ab\ncdé\nf";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 7), (2, 4)); // after `cdé` (é is 2 bytes)
        assert_eq!(line_col(t, 6), (2, 3)); // inside é: clamps back
        assert_eq!(line_col(t, 100), (3, 2));
    }

    #[test]
    fn json_locate() {
        let t = br#"{"a": {"b\"": [1, {"c": true}], "d": "x"}, "a": {"e": 2}}"#;
        let l = JsonLocator { text: t };
        let p = FieldPath::root().key("a");
        // Last duplicate wins, as in serde_json maps.
        assert_eq!(l.offset(&p.key("e"), Target::Value), Some(54));
        let first = br#"{"a": {"b\"": [1, {"c": true}], "d": "x"}}"#;
        let l = JsonLocator { text: first };
        let c = p.key("b\"").index(1).key("c");
        assert_eq!(l.offset(&c, Target::Value), Some(24));
        assert_eq!(l.offset(&c, Target::Key), Some(19));
        assert_eq!(l.offset(&p.key("d"), Target::Value), Some(37));
        assert_eq!(l.offset(&p.key("zz"), Target::Value), None);
        assert_eq!(l.nearest(&p.key("zz"), Target::Value), 1);
    }
}
