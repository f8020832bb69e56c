//! Ports on 127.0.0.1 that were free a moment ago (bound to port 0, then released: a small
//! race, as with any test port).

use anyhow::{Context, Result};

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_tcp_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A UDP address on 127.0.0.1 that was free a moment ago.
pub fn free_udp() -> Result<std::net::SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// `count` distinct TCP ports on 127.0.0.1 that were free a moment ago (all bound at once,
/// then released).
pub fn free_tcp_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    listeners.iter().map(|listener| Ok(listener.local_addr()?.port())).collect()
}

/// The first of `count` consecutive TCP ports on 127.0.0.1 that were free a moment ago (a
/// node's shard k listens on base + k).
pub fn consecutive_free_tcp_ports(count: usize) -> Result<u16> {
    for _ in 0..100 {
        let base = free_tcp_port()?;
        let all_free = (1..count).all(|offset| {
            u16::try_from(offset)
                .ok()
                .and_then(|offset| base.checked_add(offset))
                .is_some_and(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        });
        if all_free {
            return Ok(base);
        }
    }
    anyhow::bail!("no {count} consecutive free ports on 127.0.0.1")
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> Result<u16> {
    Ok(free_udp()?.port())
}
