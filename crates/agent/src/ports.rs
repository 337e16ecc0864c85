//! Host port allocation: ask the kernel for a free port, and remember the ones handed out so
//! two instances never get the same one even before either binds it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct PortAllocator {
    in_use: Mutex<BTreeSet<u16>>,
}

impl PortAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// A free port on 127.0.0.1 not handed out before (and not yet released).
    pub fn allocate(&self) -> std::io::Result<u16> {
        for _ in 0..64 {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
            if in_use.insert(port) {
                return Ok(port);
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no free port found after 64 attempts",
        ))
    }

    pub fn release(&self, ports: impl IntoIterator<Item = u16>) {
        let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        for p in ports {
            in_use.remove(&p);
        }
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_until_released() {
        let a = PortAllocator::new();
        let ports: BTreeSet<u16> = (0..20).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(ports.len(), 20);
        assert_eq!(a.in_use(), 20);
        a.release(ports);
        assert_eq!(a.in_use(), 0);
    }
}
