//! Host port allocation from a dedicated range.
//!
//! Ports are not taken from the kernel's ephemeral range (`ip_local_port_range`, what binding
//! port 0 returns): an outgoing connection may take such a port at any time, e.g. while an
//! instance waits in restart backoff, and the instance could then not bind its port again.
//! The agent hands out ports from a range outside it ([`default_port_range`]), checks with a
//! bind that each is free, and remembers the ones handed out so two instances never get the
//! same one even before either binds it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

/// The range the agent prefers, before clipping away the ephemeral range.
pub const PREFERRED_PORT_RANGE: RangeInclusive<u16> = 20000..=32767;

/// Lowest port ever handed out (below are the privileged / well-known ports).
const MIN_PORT: u16 = 1024;

/// The kernel's ephemeral port range, from `/proc/sys/net/ipv4/ip_local_port_range`.
pub fn ephemeral_range() -> Option<(u16, u16)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    parse_range(&s)
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace();
    let lo = it.next()?.parse().ok()?;
    let hi = it.next()?.parse().ok()?;
    (lo <= hi).then_some((lo, hi))
}

/// The allocation range (pure): [`PREFERRED_PORT_RANGE`] minus the ephemeral range, keeping
/// the larger remaining piece. When the ephemeral range covers all of it, the largest piece of
/// 1024–65535 outside the ephemeral range; when there is none, the preferred range as is.
pub fn default_port_range(ephemeral: Option<(u16, u16)>) -> RangeInclusive<u16> {
    let Some((lo, hi)) = ephemeral else {
        return PREFERRED_PORT_RANGE;
    };
    let outside = |r: RangeInclusive<u16>| -> Vec<RangeInclusive<u16>> {
        let (a, b) = (*r.start(), *r.end());
        let mut out = Vec::new();
        if a < lo {
            out.push(a..=b.min(lo - 1));
        }
        if b > hi {
            out.push(a.max(hi.saturating_add(1))..=b);
        }
        out.into_iter().filter(|r| r.start() <= r.end()).collect()
    };
    let largest = |v: Vec<RangeInclusive<u16>>| {
        v.into_iter()
            .max_by_key(|r| u32::from(*r.end()) - u32::from(*r.start()))
    };
    largest(outside(PREFERRED_PORT_RANGE))
        .or_else(|| largest(outside(MIN_PORT..=u16::MAX)))
        .unwrap_or(PREFERRED_PORT_RANGE)
}

#[derive(Debug)]
pub struct PortAllocator {
    range: RangeInclusive<u16>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_use: BTreeSet<u16>,
    /// Where the next search starts: allocation goes round the range, so a released port is
    /// not handed out again at once, and two agents on one host (each with its own allocator)
    /// start at different random points.
    next: u16,
}

impl PortAllocator {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let range = if range.start() <= range.end() && *range.start() > 0 {
            range
        } else {
            PREFERRED_PORT_RANGE
        };
        let next = rand::random_range(range.clone());
        Self {
            range,
            state: Mutex::new(State {
                in_use: BTreeSet::new(),
                next,
            }),
        }
    }

    /// A port of the range that is free on this host (a bind on all addresses succeeds) and
    /// not handed out before (and not yet released).
    pub fn allocate(&self) -> std::io::Result<u16> {
        let mut st = flotilla_store::lock(&self.state);
        let (lo, hi) = (*self.range.start(), *self.range.end());
        let size = u32::from(hi) - u32::from(lo) + 1;
        let mut port = st.next.clamp(lo, hi);
        for _ in 0..size {
            let candidate = port;
            port = if port >= hi { lo } else { port + 1 };
            if st.in_use.contains(&candidate) || !free(candidate) {
                continue;
            }
            st.in_use.insert(candidate);
            st.next = port;
            return Ok(candidate);
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("no free port in {lo}-{hi}"),
        ))
    }

    /// Marks `port` as handed out (a re-adopted process keeps its ports).
    pub fn claim(&self, port: u16) {
        flotilla_store::lock(&self.state).in_use.insert(port);
    }

    pub fn release(&self, ports: impl IntoIterator<Item = u16>) {
        let mut st = flotilla_store::lock(&self.state);
        for p in ports {
            st.in_use.remove(&p);
        }
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        flotilla_store::lock(&self.state).in_use.len()
    }
}

/// True when nothing listens on `port` on any address (the instance may bind any of them).
fn free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_avoids_the_ephemeral_range() {
        assert_eq!(default_port_range(None), 20000..=32767);
        // Linux default 32768–60999: the preferred range is already outside.
        assert_eq!(default_port_range(Some((32768, 60999))), 20000..=32767);
        // Overlapping from above: clipped below it.
        assert_eq!(default_port_range(Some((30000, 60999))), 20000..=29999);
        // Overlapping from below: clipped above it.
        assert_eq!(default_port_range(Some((1024, 25000))), 25001..=32767);
        // Inside: the larger piece.
        assert_eq!(default_port_range(Some((22000, 24000))), 24001..=32767);
        // Covering it all: the largest piece outside, anywhere.
        assert_eq!(default_port_range(Some((10000, 60000))), 1024..=9999);
        assert_eq!(default_port_range(Some((5000, 60000))), 60001..=65535);
        assert_eq!(default_port_range(Some((1024, 65535))), 20000..=32767);
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("9 1"), None);
        // On this host, whatever its setting.
        if let Some((lo, hi)) = ephemeral_range()
            && (lo > 20000 || hi < 32767)
        {
            let r = default_port_range(Some((lo, hi)));
            assert!(*r.end() < lo || *r.start() > hi, "{r:?} vs {lo}-{hi}");
        }
    }

    #[test]
    fn distinct_until_released_and_in_range() {
        let a = PortAllocator::new(PREFERRED_PORT_RANGE);
        let ports: BTreeSet<u16> = (0..20).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(ports.len(), 20);
        assert!(ports.iter().all(|p| PREFERRED_PORT_RANGE.contains(p)));
        assert_eq!(a.in_use(), 20);
        a.release(ports);
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn skips_ports_in_use_and_reports_exhaustion() {
        // Find four consecutive free ports to use as the range, and occupy one of them.
        let base = (61000..65500u16)
            .step_by(7)
            .find(|p| (*p..*p + 4).all(free))
            .expect("no four free consecutive ports");
        let busy = TcpListener::bind((Ipv4Addr::UNSPECIFIED, base + 1)).unwrap();
        let a = PortAllocator::new(base..=base + 3);
        let got: BTreeSet<u16> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got, BTreeSet::from([base, base + 2, base + 3]));
        let e = a.allocate().unwrap_err();
        assert!(e.to_string().contains("no free port"), "{e}");
        a.release([base + 2]);
        assert_eq!(a.allocate().unwrap(), base + 2);
        drop(busy);
        assert_eq!(a.allocate().unwrap(), base + 1);
    }
}
