//! Quantities with units: CPU in millicores, sizes in bytes, durations.
//!
//! Each accepts the forms a user writes (strings with units, plain numbers) and serializes to
//! one canonical string, so a spec round-trips through JSON unchanged.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// CPU in thousandths of a core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millicores(pub u64);

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// A duration written like `"100ms"`, `"10s"`, `"1m30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn zero() -> Self {
        Dur(Duration::ZERO)
    }
    pub fn one_second() -> Self {
        Dur(Duration::from_secs(1))
    }
    pub fn ten_seconds() -> Self {
        Dur(Duration::from_secs(10))
    }
    pub fn default_backoff_initial() -> Self {
        Dur(Duration::from_millis(100))
    }
    pub fn default_backoff_max() -> Self {
        Dur(Duration::from_secs(30))
    }
}

/// Parses `"500m"`, `"0.5"`, `"2"` into millicores.
pub fn parse_cpu(s: &str) -> Result<Millicores, String> {
    let s = s.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m
            .parse::<u64>()
            .map(Millicores)
            .map_err(|_| format!("invalid cpu {s:?}: expected e.g. \"500m\", \"0.5\" or 2"));
    }
    let cores: f64 = s
        .parse()
        .map_err(|_| format!("invalid cpu {s:?}: expected e.g. \"500m\", \"0.5\" or 2"))?;
    cores_to_millis(cores)
}

fn cores_to_millis(cores: f64) -> Result<Millicores, String> {
    if !cores.is_finite() || !(0.0..=1_000_000.0).contains(&cores) {
        return Err(format!(
            "invalid cpu {cores}: must be between 0 and 1000000 cores"
        ));
    }
    Ok(Millicores((cores * 1000.0).round() as u64))
}

/// Parses `"64Mi"`, `"1Gi"`, `"512Ki"`, `"500M"`, `"1G"`, `"1000"` into bytes.
pub fn parse_bytes(s: &str) -> Result<ByteSize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad_bytes(s))?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(bad_bytes(s)),
    };
    n.checked_mul(mult)
        .map(ByteSize)
        .ok_or_else(|| bad_bytes(s))
}

fn bad_bytes(s: &str) -> String {
    format!("invalid size {s:?}: expected e.g. \"64Mi\", \"1Gi\", \"500M\" or a number of bytes")
}

/// Parses `"100ms"`, `"10s"`, `"1m30s"`.
pub fn parse_duration(s: &str) -> Result<Dur, String> {
    humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
        format!("invalid duration {s:?}: {e} (expected e.g. \"100ms\", \"10s\", \"1m\")")
    })
}

impl fmt::Display for Millicores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, mult) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if n >= mult && n.is_multiple_of(mult) {
                return write!(f, "{}{unit}", n / mult);
            }
        }
        write!(f, "{n}")
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Millicores {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

struct CpuVisitor;
impl de::Visitor<'_> for CpuVisitor {
    type Value = Millicores;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cpu quantity such as \"500m\", \"0.5\" or 2")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Millicores, E> {
        parse_cpu(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millicores, E> {
        cores_to_millis(v as f64).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millicores, E> {
        cores_to_millis(v as f64).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Millicores, E> {
        cores_to_millis(v).map_err(E::custom)
    }
}
impl<'de> Deserialize<'de> for Millicores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CpuVisitor)
    }
}

struct BytesVisitor;
impl de::Visitor<'_> for BytesVisitor {
    type Value = ByteSize;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"64Mi\", \"1Gi\" or a number of bytes")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        parse_bytes(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
    }
}
impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BytesVisitor)
    }
}

struct DurVisitor;
impl de::Visitor<'_> for DurVisitor {
    type Value = Dur;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"100ms\", \"10s\" or \"1m\"")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
        parse_duration(v).map_err(E::custom)
    }
}
impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(DurVisitor)
    }
}
