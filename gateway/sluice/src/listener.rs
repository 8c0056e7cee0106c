//! What happens on a listener port before HTTP: the PROXY header (where configured), then by the
//! port's family — plaintext HTTP straight to the proxy; TLS: read the ClientHello, then pass the
//! stream through untouched, or terminate it with the named server's settings, or refuse it with an
//! alert; TCP: forward to the port's route.
//!
//! Sluice does the TLS handshake here rather than in Pingora's listener so that each Gateway server
//! keeps its own versions, suites and client-certificate policy, and so that certificates and
//! routes change with every config generation.

use std::sync::Arc;

use async_trait::async_trait;
use log::debug;
use pingora::apps::ServerApp;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use sluice_core::model::ListenerFamily;
use sluice_core::snapshot::TlsDecision;

use crate::state::Live;
use crate::tls::{peek_server_name, SessionCallback};

/// The PROXY header, ClientHello and TLS handshake together must finish within this.
const PRE_HTTP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct ListenerApp<A> {
    pub inner: Arc<A>,
    pub live: Arc<Live>,
    pub port: u16,
    pub family: ListenerFamily,
}

impl<A: ServerApp + Send + Sync + 'static> ListenerApp<A> {
    /// Hands the stream to the HTTP application for as long as the connection is reused. Reuse is
    /// handled here, not by the listener, so the steps above run once per connection.
    async fn serve_http(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut next = self.inner.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
    }

    async fn tls(&self, stream: Stream, shutdown: &ShutdownWatch) {
        // The TLS handshake (and what precedes it) must finish in time: a client that sends a
        // ClientHello and then nothing may not hold the connection.
        let tls = match tokio::time::timeout(PRE_HTTP_DEADLINE, self.accept_tls(stream)).await {
            Ok(Some(tls)) => tls,
            Ok(None) => return,
            Err(_) => {
                debug!(
                    "port {}: TLS handshake not done within {PRE_HTTP_DEADLINE:?}",
                    self.port
                );
                return;
            }
        };
        self.serve_http(tls, shutdown).await
    }

    /// Reads the ClientHello and terminates, passes through (then returns `None`) or refuses.
    async fn accept_tls(&self, mut stream: Stream) -> Option<Stream> {
        let generation = self.live.current();
        let listener = generation.snapshot.listener(self.port)?;
        let server_name = match peek_server_name(stream.as_mut()).await {
            Ok(name) => name,
            Err(reason) => {
                debug!("port {}: {reason}", self.port);
                return None;
            }
        };
        let (acceptor, server) = match listener.tls.decide(server_name.as_deref()) {
            TlsDecision::Passthrough(route) => {
                let route = route.clone();
                let (generation, live) = (generation.clone(), self.live.clone());
                // Forwarding is not part of the handshake deadline.
                tokio::spawn(async move {
                    crate::upstream::forward(stream, &route, &generation, &live).await
                });
                return None;
            }
            TlsDecision::Terminate(index, server) => {
                match generation.tls.acceptor(self.port, index) {
                    Some(acceptor) => (acceptor.clone(), server.label.as_str().into()),
                    None => {
                        debug!("port {}: no acceptor for {}", self.port, server.label);
                        return None;
                    }
                }
            }
            TlsDecision::Refuse => (generation.tls.refuse().clone(), Arc::from("")),
        };
        let callback = SessionCallback { server };
        match handshake_with_callback(&acceptor, crate::boxed_io::Boxed(stream), &callback).await {
            Ok(tls) => Some(Box::new(tls)),
            Err(e) => {
                debug!(
                    "port {}: TLS handshake with SNI {server_name:?} failed: {e}",
                    self.port
                );
                None
            }
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ListenerApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let generation = self.live.current();
        // What a port speaks is fixed when it is bound. If a reload changed it (HTTP → HTTPS, say),
        // serving the new routes over the old family could expose TLS-only routes in plaintext: the
        // port closes connections until a restart binds it anew (reported in `needsRestart`).
        let family = generation
            .snapshot
            .listener(self.port)
            .map(|l| l.spec.family);
        if family.is_some_and(|f| f != self.family) {
            debug!(
                "port {}: now configured as {family:?}, bound as {:?}; closing",
                self.port, self.family
            );
            return None;
        }
        let proxy_protocol = generation.snapshot.settings.proxy_protocol.clone();
        if let Some(settings) = proxy_protocol.filter(|s| s.applies_to(self.port)) {
            let accepted = tokio::time::timeout(
                PRE_HTTP_DEADLINE,
                crate::proxy_protocol::accept(stream.as_mut(), &settings),
            )
            .await
            .unwrap_or_else(|_| Err("PROXY header not complete in time".into()));
            if let Err(reason) = accepted {
                debug!("closing connection on port {}: {reason}", self.port);
                return None;
            }
        }
        match self.family {
            ListenerFamily::PlainHttp => self.serve_http(stream, shutdown).await,
            ListenerFamily::Tls => self.tls(stream, shutdown).await,
            ListenerFamily::Tcp => {
                let route = generation
                    .snapshot
                    .listener(self.port)
                    .and_then(|l| l.tcp_routes.first().cloned());
                match route {
                    Some(route) => {
                        crate::upstream::forward(stream, &route, &generation, &self.live).await
                    }
                    None => debug!("port {}: no TCP route", self.port),
                }
            }
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}
