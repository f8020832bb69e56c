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

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> Result<u16> {
    Ok(free_udp()?.port())
}
