//! PROXY protocol v1 and v2 from the L4 load balancer, read before anything else on a connection.
//!
//! Only sources in `proxyProtocol.trustedCidrs` may send a header; the address it carries replaces
//! the TCP peer as the client address (X-Forwarded-For, logs, metrics). A header from an untrusted
//! source, a malformed header, or a trusted source without a header (unless `allowWithoutHeader`)
//! closes the connection. Settings are read per connection, so a reload changes them at once.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::SocketDigest;
use pingora::protocols::IO;
use sluice_core::model::ProxyProtocolSettings;
use tokio::io::AsyncReadExt;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header (`PROXY TCP6 <ip6> <ip6> <port> <port>\r\n`) is 107 bytes.
const V1_MAX: usize = 107;
/// v2 allows 64 KiB of TLVs; a balancer sends a few dozen bytes. Refuse anything larger.
const V2_MAX_PAYLOAD: usize = 1024;
/// A source that connects and sends nothing is not allowed to hold the connection open here.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the first bytes of a connection said.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// A PROXY header with the original client address.
    Client(SocketAddr),
    /// A PROXY header without an address (v2 LOCAL, v1 UNKNOWN): a health check from the balancer.
    Local,
    /// No PROXY header: the first bytes belong to the application protocol.
    Absent,
}

/// Reads a PROXY header if one starts the stream; bytes that are not one stay unread.
pub async fn read_header(stream: &mut dyn IO) -> Result<Header, String> {
    // Five bytes tell a header from anything else, so a client whose first message is short is
    // not kept waiting for bytes it will never send.
    let mut start = [0u8; 5];
    if !peek_exact(stream, &mut start).await? {
        return Ok(Header::Absent);
    }
    if start == *b"PROXY" {
        return read_v1(stream).await;
    }
    if start != V2_SIGNATURE[..5] {
        return Ok(Header::Absent);
    }
    let mut signature = [0u8; 12];
    if peek_exact(stream, &mut signature).await? && &signature == V2_SIGNATURE {
        read_v2(stream).await
    } else {
        Ok(Header::Absent)
    }
}

async fn peek_exact(stream: &mut dyn IO, buf: &mut [u8]) -> Result<bool, String> {
    match tokio::time::timeout(HEADER_TIMEOUT, stream.try_peek(buf)).await {
        Err(_) => Err("no data within 5 s".into()),
        Ok(Err(e)) => Err(format!("read failed: {e}")),
        Ok(Ok(peeked)) => Ok(peeked),
    }
}

async fn read_v2(stream: &mut dyn IO) -> Result<Header, String> {
    let mut bytes = vec![0u8; 16];
    read_exact(stream, &mut bytes).await?;
    let payload = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(format!("v2 header payload of {payload} bytes is too large"));
    }
    bytes.resize(16 + payload, 0);
    read_exact(stream, &mut bytes[16..]).await?;
    let header = ppp::v2::Header::try_from(bytes.as_slice())
        .map_err(|e| format!("invalid v2 header: {e}"))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(Header::Local);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Header::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Header::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => Header::Local,
    })
}

async fn read_v1(stream: &mut dyn IO) -> Result<Header, String> {
    let mut line = Vec::with_capacity(V1_MAX);
    // Byte by byte so nothing after the header is consumed; Pingora's stream is buffered.
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err("v1 header longer than 107 bytes".into());
        }
        let byte = tokio::time::timeout(HEADER_TIMEOUT, stream.read_u8())
            .await
            .map_err(|_| "v1 header incomplete after 5 s".to_string())?
            .map_err(|e| format!("read failed: {e}"))?;
        line.push(byte);
    }
    let header = ppp::v1::Header::try_from(line.as_slice())
        .map_err(|e| format!("invalid v1 header: {e}"))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Header::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Header::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Unknown => Header::Local,
    })
}

async fn read_exact(stream: &mut dyn IO, buf: &mut [u8]) -> Result<(), String> {
    tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(buf))
        .await
        .map_err(|_| "header incomplete after 5 s".to_string())?
        .map(|_| ())
        .map_err(|e| format!("read failed: {e}"))
}

/// Applies the PROXY policy to a new connection: reads the header where one is expected and makes
/// its address the connection's client address. `Err` means close the connection.
pub async fn accept(stream: &mut dyn IO, settings: &ProxyProtocolSettings) -> Result<(), String> {
    let peer = stream.get_socket_digest().and_then(|d| {
        d.peer_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical())
    });
    let trusted = peer.is_some_and(|ip| settings.trusts(ip));
    let header = read_header(stream).await?;
    match (header, trusted) {
        (Header::Absent, false) => Ok(()),
        (Header::Absent, true) if settings.allow_without_header => Ok(()),
        (Header::Absent, true) => Err("trusted source sent no PROXY header".into()),
        (_, false) => Err(format!("PROXY header from untrusted source {peer:?}")),
        (Header::Local, true) => Ok(()),
        (Header::Client(client), true) => {
            let digest = SocketDigest::from_raw_fd(stream.id());
            let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(client)));
            stream.set_socket_digest(digest);
            Ok(())
        }
    }
}
