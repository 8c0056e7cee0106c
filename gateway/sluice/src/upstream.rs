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
pub async fn forward(
    mut downstream: Stream,
    route: &L4Route,
    generation: &Generation,
    live: &Live,
) {
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
    let mut upstream = match connect.await {
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
    if let Err(e) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        debug!("{}: connection to {address} ended: {e}", route.label);
    }
}
