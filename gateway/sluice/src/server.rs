//! Assembling and running the Pingora server from the first compiled snapshot: one proxy service per
//! listener port, the reloader, the admin API, the DNS refresher and the lifecycle hooks.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use log::info;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use sluice_core::model::ListenerFamily;
use sluice_core::snapshot::Snapshot;

use crate::accept::AcceptService;
use crate::admin::{load_or_create_token, AdminService};
use crate::dns::DnsRefresher;
use crate::lifecycle::{watch_phases, Signals};
use crate::listener::ListenerApp;
use crate::proxy::GatewayProxy;
use crate::reload::{ReloadService, Reloader};
use crate::state::Live;

/// What `sluice run` was started with.
pub struct Startup {
    pub snapshot: Snapshot,
    /// Config paths to watch and reload from (empty for the built-in demo).
    pub paths: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
    pub fingerprint: u64,
    /// What the load at start parsed and validated, for the first reload to reuse.
    pub cache: sluice_core::LoadCache,
    /// Take the listening sockets over from a running Sluice (graceful upgrade).
    pub upgrade: bool,
}

/// Builds the server and runs it until shutdown. DNS names are resolved once before listeners
/// open so the first requests do not fail while the resolver warms up.
pub fn run(startup: Startup) -> anyhow::Result<()> {
    let settings = startup.snapshot.settings.clone();
    let tls = crate::tls::TlsListeners::build(&startup.snapshot).map_err(|errors| {
        anyhow::anyhow!("certificates could not be loaded:\n{}", errors.join("\n"))
    })?;
    let live = Live::new(startup.snapshot, tls, startup.files).context("creating metrics")?;
    let names = live.current().snapshot.dns_names().to_vec();
    if !names.is_empty() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the DNS warm-up runtime")?
            .block_on(live.dns.refresh(&names));
    }
    let token: Arc<str> = load_or_create_token(&settings.admin_token_path())?.into();

    let conf = ServerConf {
        threads: settings.threads,
        // Pingora sleeps this long after listeners close; the lifecycle thread exits earlier as
        // soon as no request is in flight, so this is only the upper bound.
        grace_period_seconds: Some(settings.shutdown_timeout.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: settings.upgrade_socket.to_string_lossy().into_owned(),
        // One single-threaded runtime per worker thread instead of a work-stealing pool: a
        // connection stays on the thread that accepted it, with no cross-thread wakeups.
        work_stealing: false,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: startup.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let bind_patience = if startup.upgrade {
        crate::accept::BIND_PATIENCE_UPGRADING
    } else {
        crate::accept::BIND_PATIENCE
    };
    let generation = live.current();
    for listener in generation.snapshot.listeners() {
        let port = listener.spec.port;
        let mut options = HttpServerOptions::default();
        // Plaintext HTTP/2 (h2c, prior knowledge) is accepted on every HTTP port, as Envoy does for
        // HTTP2/GRPC servers; HTTP/1.1 clients are unaffected.
        options.h2c = true;
        let family = listener.spec.family;
        let mut proxy = pingora::proxy::http_proxy(
            &server.configuration,
            GatewayProxy {
                port,
                live: live.clone(),
                tls: family == ListenerFamily::Tls,
            },
        );
        proxy.server_options = Some(options);
        let app = ListenerApp {
            inner: Arc::new(proxy),
            live: live.clone(),
            port,
            family,
            series: live.metrics.listener(port),
        };
        let address = std::net::SocketAddr::new(settings.bind_address, port);
        info!("listening on {address} ({:?})", listener.spec.family);
        server.add_service(AcceptService::new(address, app, bind_patience));
    }
    if let Some(settings) = &settings.access_log {
        let (logger, writer) =
            crate::access_log::AccessLogger::new(settings, live.metrics.access_log_dropped.clone());
        let _ = live.access_log.set(logger);
        server.add_service(background_service("access log", writer));
    }
    let (spans, span_sender) = crate::spans::SpanQueue::new(live.clone());
    let _ = live.spans.set(spans);
    server.add_service(background_service("span export", span_sender));
    let reloader = Arc::new(Reloader::new(
        startup.paths.clone(),
        live.clone(),
        startup.fingerprint,
        startup.cache,
    ));
    if !startup.paths.is_empty() {
        server.add_service(background_service(
            "config reloader",
            ReloadService::new(reloader.clone()),
        ));
    }
    server.add_service(background_service(
        "acme",
        crate::acme::AcmeService::new(live.clone(), reloader.clone()),
    ));
    server.add_service(background_service(
        "admin",
        AdminService {
            live: live.clone(),
            reloader,
            token,
        },
    ));
    server.add_service(background_service(
        "dns refresher",
        DnsRefresher { live: live.clone() },
    ));
    watch_phases(live.clone(), server.watch_execution_phase());
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { live }),
    });
    Ok(())
}
