//! Choosing where a request or connection goes once its route is known: the weighted target's
//! cluster, round robin over its endpoints, DNS endpoints from the refreshed cache. Shared by the
//! HTTP proxy and by TLS-passthrough / TCP forwarding.

use std::net::SocketAddr;
use std::time::Duration;

use log::debug;
use pingora::protocols::Stream;
use sluice_core::snapshot::{L4Route, UpstreamEndpoint};

use crate::state::{Generation, Live};

/// Istio's default `connectTimeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The address of the next endpoint of `cluster`, or why there is none.
pub fn endpoint_address(
    generation: &Generation,
    live: &Live,
    cluster: usize,
) -> Result<SocketAddr, &'static str> {
    let cluster = generation
        .snapshot
        .cluster(cluster)
        .ok_or("no healthy upstream: unknown cluster\n")?;
    let (endpoint, turn) = cluster
        .next_endpoint()
        .ok_or("no healthy upstream: the destination has no endpoints\n")?;
    match endpoint {
        UpstreamEndpoint::Addr(addr) => Ok(addr),
        UpstreamEndpoint::Dns { slot, port } => {
            let ips = generation
                .snapshot
                .dns_names()
                .get(slot)
                .and_then(|name| live.dns.addresses(name))
                .filter(|ips| !ips.is_empty())
                .ok_or("no healthy upstream: the destination's DNS name has not resolved\n")?;
            Ok(SocketAddr::new(ips[turn % ips.len()], port))
        }
    }
}

/// Forwards a whole connection (TLS passthrough or TCP) to the route's weighted destination and
/// copies bytes both ways until either side closes.
pub async fn forward(downstream: Stream, route: &L4Route, generation: &Generation, live: &Live) {
    // A forwarded connection is in flight for shutdown, like a request.
    let _in_flight = live.request_started();
    let Some(target) = route.targets.pick().and_then(|i| route.targets.get(i)) else {
        return;
    };
    let address = match endpoint_address(generation, live, target.cluster) {
        Ok(address) => address,
        Err(reason) => {
            debug!("{}: {}", route.label, reason.trim_end());
            return;
        }
    };
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address));
    let upstream = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!("{}: connecting to {address}: {e}", route.label);
            return;
        }
        Err(_) => {
            debug!("{}: connecting to {address} timed out", route.label);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let series = generation.series(Some(target.cluster));
    series.tcp_opened();
    let mut counts = (0u64, 0u64);
    if let Err(e) = copy_until_idle(downstream, upstream, L4_IDLE_TIMEOUT, &mut counts).await {
        debug!("{}: connection to {address} ended: {e}", route.label);
    }
    series.tcp_closed(counts.0, counts.1);
}

/// Envoy's `tcp_proxy` default: a forwarded connection with no byte either way for this long closes.
pub const L4_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Copies both ways until either side closes, or nothing moves for `idle`.
/// `counts` gets (bytes sent to the client, bytes received from it), also when it ends in an error.
async fn copy_until_idle(
    downstream: Stream,
    upstream: tokio::net::TcpStream,
    idle: Duration,
    counts: &mut (u64, u64),
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "idle");
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = upstream.into_split();
    let mut down_buf = vec![0u8; 16 * 1024];
    let mut up_buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = tokio::time::timeout(idle, down_read.read(&mut down_buf)) => {
                let n = read.map_err(|_| timed_out())??;
                if n == 0 {
                    // The client is done sending: pass that on, then drain the answer.
                    up_write.shutdown().await?;
                    counts.0 += tokio::time::timeout(idle, tokio::io::copy(&mut up_read, &mut down_write))
                        .await
                        .map_err(|_| timed_out())??;
                    return Ok(());
                }
                counts.1 += n as u64;
                up_write.write_all(&down_buf[..n]).await?;
                up_write.flush().await?;
            }
            read = tokio::time::timeout(idle, up_read.read(&mut up_buf)) => {
                let n = read.map_err(|_| timed_out())??;
                if n == 0 {
                    down_write.shutdown().await?;
                    counts.1 += tokio::time::timeout(idle, tokio::io::copy(&mut down_read, &mut up_write))
                        .await
                        .map_err(|_| timed_out())??;
                    return Ok(());
                }
                counts.0 += n as u64;
                // Pingora's stream buffers writes: flush, or the bytes wait for more.
                down_write.write_all(&up_buf[..n]).await?;
                down_write.flush().await?;
            }
        }
    }
}
