//! A bench peer, not part of Sluice: the smallest HTTP proxy Pingora can run (every request to one
//! upstream, no filters, Pingora's own listener), configured like Sluice (one worker thread, no
//! work stealing). `bench/run.sh` measures it beside Sluice so the cost of Pingora's proxy path
//! and the cost of Sluice's own work can be told apart. `bare_pingora_mimalloc.rs` is the same proxy on
//! Sluice's allocator.
//!
//!     cargo run --release --example bare_pingora -- LISTEN-ADDRESS UPSTREAM-ADDRESS

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};

struct Bare {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

pub fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bare_pingora LISTEN-ADDRESS UPSTREAM-ADDRESS");
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        // A bench peer: gone at once when the bench stops it, never left holding the port.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: upstream.parse()?,
        },
    );
    service.add_tcp(&listen);
    server.add_service(service);
    server.run(RunArgs::default());
    Ok(())
}
