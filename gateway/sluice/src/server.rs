//! Assembling the Pingora server from a compiled snapshot: one proxy service per listener port,
//! plus the DNS refresher.

use std::sync::Arc;

use anyhow::Context;
use log::info;
use pingora::apps::HttpServerOptions;
use pingora::proxy::ProxyServiceBuilder;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use sluice_core::model::ServerProtocol;
use sluice_core::snapshot::Snapshot;

use crate::dns::DnsRefresher;
use crate::proxy::GatewayProxy;
use crate::state::Live;

/// Builds the server for `snapshot`, resolving its DNS names once before any listener opens so the
/// first requests do not fail while the resolver warms up.
pub fn build(snapshot: Snapshot) -> anyhow::Result<(Server, Arc<Live>)> {
    let threads = snapshot.settings.threads;
    let bind = snapshot.settings.bind_address;
    let live = Live::new(snapshot);
    let names = live.current().snapshot.dns_names().to_vec();
    if !names.is_empty() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the DNS warm-up runtime")?
            .block_on(live.dns.refresh(&names));
    }

    let conf = ServerConf {
        threads,
        // Istio's default drain is 5 s; the lifecycle issue makes this configurable.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let generation = live.current();
    for listener in generation.snapshot.listeners() {
        let port = listener.spec.port;
        let mut options = HttpServerOptions::default();
        // Plaintext HTTP/2 (h2c, prior knowledge) is accepted on every HTTP port, as Envoy does for
        // HTTP2/GRPC servers; HTTP/1.1 clients are unaffected.
        options.h2c = true;
        let proxy = GatewayProxy {
            port,
            live: live.clone(),
        };
        let mut service = ProxyServiceBuilder::new(&server.configuration, proxy)
            .name(format!("listener :{port}"))
            .server_options(options)
            .build();
        let address = std::net::SocketAddr::new(bind, port);
        service.add_tcp(&address.to_string());
        let protocol = match listener.spec.protocol {
            ServerProtocol::Http => "HTTP",
            ServerProtocol::Http2 => "HTTP2",
            ServerProtocol::Grpc => "GRPC",
        };
        info!("listening on {address} ({protocol})");
        server.add_service(service);
    }
    server.add_service(background_service(
        "dns refresher",
        DnsRefresher { live: live.clone() },
    ));
    Ok((server, live))
}
