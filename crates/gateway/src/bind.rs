//! Binding the gateway's listeners: one `SO_REUSEPORT` socket per worker on the same address,
//! and nobody else's. `SO_REUSEPORT` lets any socket of the same user join the group, so a
//! second gateway on the same address would silently share its traffic (requests alternating
//! between two processes). Before binding, a plain socket probes the address: any listener
//! makes it fail, and the bind fails naming the process that holds the address (found through
//! `/proc/net/tcp{,6}` and `/proc/PID/fd`) when `/proc` lets us see it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::GatewayError;

/// Connections waiting to be accepted, per listening socket.
const LISTEN_BACKLOG: i32 = 1024;

/// `count` listening sockets on `addr` with `SO_REUSEPORT`, one per worker: the kernel spreads
/// new connections evenly over them. (Workers sharing one socket do not share the load: the
/// first to wake takes a whole burst of connections.) With port 0, the later sockets take the
/// port the first one got. Fails with [`GatewayError::AddressInUse`] when another socket
/// listens on the address.
pub(crate) fn bind_tcp(
    addr: SocketAddr,
    count: usize,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), GatewayError> {
    if addr.port() != 0 {
        ensure_free(addr)?;
    }
    let mut listeners = Vec::with_capacity(count);
    let mut local = addr;
    for _ in 0..count.max(1) {
        let listener = reuseport_listener(local).map_err(|source| in_use_or(addr, source))?;
        if listeners.is_empty() {
            local = listener.local_addr().map_err(GatewayError::LocalAddr)?;
        }
        listeners.push(listener);
    }
    Ok((listeners, local))
}

/// Fails when anything listens on `addr`: a plain socket (no `SO_REUSEPORT`) cannot bind
/// where any socket listens, so this also sees a listener that would have let us share its
/// port. The kernel's socket tables are read only then, to name the holder (reading them costs
/// milliseconds, too much for every start).
fn ensure_free(addr: SocketAddr) -> Result<(), GatewayError> {
    use socket2::{Domain, Socket, Type};
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .and_then(|s| {
            // Not refused for connections of an earlier run in TIME_WAIT.
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            Ok(s)
        })
        .map_err(|source| in_use_or(addr, source))?;
    drop(probe);
    Ok(())
}

/// [`GatewayError::AddressInUse`] naming the process that listens on `addr` for an
/// "address in use", else [`GatewayError::Bind`].
fn in_use_or(addr: SocketAddr, source: std::io::Error) -> GatewayError {
    if source.kind() != std::io::ErrorKind::AddrInUse {
        return GatewayError::Bind { addr, source };
    }
    let holder = foreign_listener(&listening_tables(), addr, &HashSet::new());
    GatewayError::AddressInUse {
        addr,
        holder: holder.and_then(holder_of),
    }
}

/// The text of `/proc/net/tcp` and `/proc/net/tcp6` (empty where they cannot be read: a
/// kernel without IPv6 has no tcp6 table, and without /proc nothing can be checked).
fn listening_tables() -> String {
    let mut tables = String::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            tables.push_str(&text);
        }
    }
    tables
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A listening socket in `tables` (the text of `/proc/net/tcp` and `/proc/net/tcp6`) that
/// takes connections for `addr` and is not in `ours`: same port, and the same address or a
/// wildcard on either side.
fn foreign_listener(tables: &str, addr: SocketAddr, ours: &HashSet<u64>) -> Option<u64> {
    const LISTEN: &str = "0A";
    tables.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        if *state != LISTEN {
            return None;
        }
        let inode: u64 = inode.parse().ok()?;
        let theirs = parse_proc_addr(local)?;
        let overlaps = theirs.port() == addr.port()
            && (theirs.ip() == addr.ip()
                || theirs.ip().is_unspecified()
                || addr.ip().is_unspecified()
                || same_v4(theirs.ip(), addr.ip()));
        (overlaps && inode != 0 && !ours.contains(&inode)).then_some(inode)
    })
}

/// Whether an IPv4-mapped IPv6 address and an IPv4 address are the same.
fn same_v4(a: IpAddr, b: IpAddr) -> bool {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    v4(a).is_some_and(|a| Some(a) == v4(b))
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): the address in the kernel's byte
/// order, 32-bit word by word, and the port in hex.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word is printed as a number in the host's byte order: its bytes in memory
    // are the address's bytes.
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// "pid 1234 (flotilla)" for the process holding socket `inode`, when `/proc` shows it.
fn holder_of(inode: u64) -> Option<String> {
    let target = format!("socket:[{inode}]");
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("pid {pid} ({})", comm.trim()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLES: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 100 0 0 10 0
   3: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1 0000000000000000 100 0 0 10 0
";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn kernel_addresses_parse() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some(addr("127.0.0.1:8080"))
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:1F91"),
            Some(addr("[::1]:8081"))
        );
        assert_eq!(parse_proc_addr("zz:1"), None);
        assert_eq!(parse_proc_addr("0100007F"), None);
    }

    #[test]
    fn only_listeners_of_others_on_the_address_are_foreign() {
        let ours = |v: &[u64]| v.iter().copied().collect::<HashSet<u64>>();
        // Both listeners on 127.0.0.1:8080 are ours: nothing foreign (the connection is not a
        // listener).
        assert_eq!(
            foreign_listener(TABLES, addr("127.0.0.1:8080"), &ours(&[1111, 2222])),
            None
        );
        assert_eq!(
            foreign_listener(TABLES, addr("127.0.0.1:8080"), &ours(&[1111])),
            Some(2222)
        );
        // A wildcard listener on port 80 takes 127.0.0.1:80 too, and the other way round.
        assert_eq!(
            foreign_listener(TABLES, addr("127.0.0.1:80"), &ours(&[])),
            Some(4444)
        );
        assert_eq!(
            foreign_listener(TABLES, addr("0.0.0.0:8080"), &ours(&[2222])),
            Some(1111)
        );
        assert_eq!(
            foreign_listener(TABLES, addr("[::1]:8081"), &ours(&[])),
            Some(5555)
        );
        assert_eq!(
            foreign_listener(TABLES, addr("127.0.0.1:8081"), &ours(&[])),
            None
        );
    }

    #[test]
    fn a_reuseport_listener_already_on_the_address_is_refused() {
        let first = reuseport_listener(addr("127.0.0.1:0")).unwrap();
        let taken = first.local_addr().unwrap();
        let Err(GatewayError::AddressInUse { addr: got, holder }) = bind_tcp(taken, 2) else {
            panic!("a second gateway on {taken} was allowed to share it");
        };
        assert_eq!(got, taken);
        let holder = holder.unwrap_or_default();
        assert!(
            holder.starts_with(&format!("pid {} ", std::process::id())),
            "{holder}"
        );
        // A listener without SO_REUSEPORT is named too.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = plain.local_addr().unwrap();
        let Err(GatewayError::AddressInUse { holder, .. }) = bind_tcp(taken, 1) else {
            panic!("bound {taken} over a plain listener");
        };
        assert!(holder.is_some_and(|h| h.starts_with("pid ")));
        // Our own workers share the address among themselves.
        let (listeners, local) = bind_tcp(addr("127.0.0.1:0"), 3).unwrap();
        assert_eq!(listeners.len(), 3);
        assert_ne!(local.port(), 0);
    }
}
