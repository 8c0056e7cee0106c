//! What happens on a connection `accept.rs` accepted, before HTTP: the PROXY header (where
//! configured), then by the port's family — plaintext HTTP straight to the proxy; TLS: read the
//! ClientHello, then pass the stream through untouched, or terminate it with the named server's
//! settings, or refuse it with an alert; TCP: forward to the port's route.
//!
//! Sluice does the TLS handshake here rather than in a Pingora listener so that each Gateway server
//! keeps its own versions, suites and client-certificate policy, and so that certificates and
//! routes change with every config generation.
//!
//! HTTP/1.1 keep-alive is driven here too: between requests a connection waits for the first byte
//! of its next request holding only its stream, and Pingora's per-request session and proxy state
//! exist only while a request is under way (an idle connection costs a few KiB, not tens). Requests
//! a client pipelines are answered in order: Pingora carries what it read past a request into the
//! next session, so on a connection that pipelines, sessions follow each other without the wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use log::debug;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::{Peek, Ssl, Stream, ALPN};
use pingora::server::ShutdownWatch;
use sluice_core::model::ListenerFamily;
use sluice_core::snapshot::{L4Route, TlsDecision};

use crate::metrics::{HandshakeFailure, ListenerSeries};
use crate::replay_io::ReplayIo;
use crate::state::{Generation, Live};
use crate::tls::{peek_client_hello, SessionCallback};

/// The PROXY header, ClientHello and TLS handshake together must finish within this.
const PRE_HTTP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an HTTP/1.1 connection may sit between requests (and a new one before its first):
/// Pingora's default keep-alive timeout.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

pub struct ListenerApp<A> {
    pub inner: Arc<A>,
    pub live: Arc<Live>,
    pub port: u16,
    pub family: ListenerFamily,
    pub series: ListenerSeries,
}

/// What became of a connection on a TLS port once its ClientHello was read.
enum TlsOutcome {
    /// Sluice terminated TLS: HTTP follows.
    Terminated(Stream),
    /// To pass through untouched (the ClientHello was only peeked at), with the generation whose
    /// route it is (route targets index that generation's clusters).
    Passthrough(Stream, Arc<L4Route>, Arc<Generation>),
    Closed,
}

impl<A: HttpServerApp + Send + Sync + 'static> ListenerApp<A> {
    /// Serves HTTP on the connection for as long as it is reused. HTTP/2 (by ALPN, or h2c with prior
    /// knowledge on plaintext ports) goes to Pingora's own connection loop: its requests are
    /// streams, nothing waits per request. HTTP/1.1 keep-alive is looped here, see the module docs.
    async fn serve_http(&self, mut stream: ReplayIo, shutdown: &ShutdownWatch) {
        // Boxed, as every step that happens once: this future lives as long as the connection.
        let Some(h2) = Box::pin(self.speaks_h2(&mut stream)).await else {
            return;
        };
        if h2 {
            stream.stop_following_requests();
            let _ = ServerApp::process_new(&self.inner, Box::new(stream), shutdown).await;
            return;
        }
        let mut next = self.http1_request(Box::new(stream), None, shutdown);
        // Once a session has been handed bytes past its request (pipelined requests; or a body
        // whose end the stream cannot tell, such as a chunked one), Pingora may hold the next
        // requests, in any number, and what the stream hands over no longer tells where a request
        // starts. From then on each session starts at once and waits in Pingora's own read (with
        // the same idle limit, see `http1_request`), as Pingora's own loop does.
        let mut may_hold_next_request = false;
        while let Some(reused) = next.await {
            let (stream, persistent) = reused.consume();
            // The stream handed to the session comes back from it.
            let Ok(mut stream) = stream.into_any().downcast::<ReplayIo>() else {
                return;
            };
            may_hold_next_request |= stream.begin_next_request();
            if !may_hold_next_request && !next_request_arrives(&mut stream, shutdown).await {
                return;
            }
            next = self.http1_request(stream, persistent, shutdown);
        }
    }

    /// Whether the connection speaks HTTP/2: by ALPN under TLS, else by the h2c preface. `None`
    /// when it closes, fails or stays silent before a first request: nothing to serve.
    async fn speaks_h2(&self, stream: &mut ReplayIo) -> Option<bool> {
        match stream.selected_alpn_proto() {
            Some(ALPN::H2) => Some(true),
            _ if stream.get_ssl_digest().is_some() => Some(false),
            _ => {
                let h2c = self.inner.server_options().is_some_and(|o| o.h2c);
                let opening =
                    tokio::time::timeout(KEEPALIVE_IDLE, stream.starts_with_h2_preface()).await;
                match opening {
                    Ok(Ok(preface)) => Some(h2c && preface),
                    Ok(Err(_)) | Err(_) => None,
                }
            }
        }
    }

    /// One HTTP/1.1 request on the connection. A plain function that returns Pingora's boxed
    /// future: the session is built and moved into that box, never kept in the caller's state, so
    /// a connection between requests holds only its stream.
    fn http1_request<'a>(
        &'a self,
        stream: Stream,
        persistent: Option<HttpPersistentSettings>,
        shutdown: &'a ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>> {
        let mut session = ServerSession::new_http1(stream);
        match persistent {
            Some(persistent) => {
                persistent.apply_to_session(&mut session);
                // What the last request carried over is "keep alive" without a limit (Pingora
                // records a request's keep-alive as infinite): the idle limit applies to the
                // session's own wait for its request, when the connection skips Sluice's.
                session.set_keepalive(Some(KEEPALIVE_IDLE.as_secs()));
            }
            None => {
                // Carried to the connection's later sessions with the other persistent settings.
                session.set_pipelining_enabled(true);
                session.set_keepalive(Some(KEEPALIVE_IDLE.as_secs()));
                session.set_keepalive_reuses_remaining(
                    self.inner
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            }
        }
        self.inner.process_new_http(session, shutdown)
    }

    /// Forwards a TLS passthrough or TCP connection. Boxed: the connection's own future, which an
    /// idle HTTP connection keeps too, should not carry the forwarding state.
    async fn forward(&self, stream: Stream, route: &L4Route, generation: &Generation) {
        Box::pin(crate::upstream::forward(
            stream, route, generation, &self.live,
        ))
        .await
    }

    async fn tls(&self, stream: Stream, shutdown: &ShutdownWatch) {
        // The TLS handshake (and what precedes it) must finish in time: a client that sends a
        // ClientHello and then nothing may not hold the connection.
        let accepted = tokio::time::timeout(PRE_HTTP_DEADLINE, Box::pin(self.accept_tls(stream)));
        match accepted.await {
            Ok(TlsOutcome::Terminated(tls)) => {
                self.serve_http(ReplayIo::for_http(tls), shutdown).await
            }
            // Forwarding is not part of the handshake deadline.
            Ok(TlsOutcome::Passthrough(stream, route, generation)) => {
                self.forward(stream, &route, &generation).await
            }
            Ok(TlsOutcome::Closed) => {}
            Err(_) => {
                self.series.handshake_failed(HandshakeFailure::Timeout);
                debug!(
                    "port {}: TLS handshake not done within {PRE_HTTP_DEADLINE:?}",
                    self.port
                );
            }
        }
    }

    /// Reads the ClientHello and terminates, passes through or refuses.
    async fn accept_tls(&self, mut stream: Stream) -> TlsOutcome {
        let generation = self.live.current();
        let Some(listener) = generation.snapshot.listener(self.port) else {
            return TlsOutcome::Closed;
        };
        let hello = match peek_client_hello(stream.as_mut()).await {
            Ok(hello) => hello,
            Err((failure, reason)) => {
                self.series.handshake_failed(failure);
                debug!("port {}: {reason}", self.port);
                discard_arrived(&mut stream).await;
                return TlsOutcome::Closed;
            }
        };
        let server_name = hello.server_name;
        // Only for Sluice's own ACME hosts: a passthrough backend validating its own
        // certificates over TLS-ALPN-01 gets its handshakes as before.
        let own_validation = hello.acme_validation
            && server_name
                .as_deref()
                .is_some_and(|h| crate::acme::is_managed(&generation.snapshot, h));
        if own_validation {
            self.answer_acme_validation(stream, server_name.as_deref(), &generation)
                .await;
            return TlsOutcome::Closed;
        }
        // Refused names still get a handshake, so the client sees an alert rather than a reset.
        let mut failure = HandshakeFailure::Handshake;
        let (acceptor, server) = match listener.tls.decide(server_name.as_deref()) {
            TlsDecision::Passthrough(route) => {
                return TlsOutcome::Passthrough(stream, route.clone(), generation.clone());
            }
            TlsDecision::Terminate(index, server) => {
                match generation.tls.acceptor(self.port, index) {
                    Some(acceptor) => (acceptor.clone(), server.label.as_str().into()),
                    None => {
                        debug!("port {}: no acceptor for {}", self.port, server.label);
                        return TlsOutcome::Closed;
                    }
                }
            }
            TlsDecision::Refuse => {
                failure = HandshakeFailure::UnknownServerName;
                (generation.tls.refuse().clone(), Arc::from(""))
            }
        };
        let callback = SessionCallback { server };
        match handshake_with_callback(&acceptor, ReplayIo::new(stream), &callback).await {
            Ok(tls) => {
                self.series.handshake_done();
                TlsOutcome::Terminated(Box::new(tls))
            }
            Err(e) => {
                self.series.handshake_failed(failure);
                debug!(
                    "port {}: TLS handshake with SNI {server_name:?} failed: {e}",
                    self.port
                );
                TlsOutcome::Closed
            }
        }
    }

    /// A CA checking a TLS-ALPN-01 challenge: the handshake itself is the answer (the certificate
    /// carries the proof); no application data follows.
    async fn answer_acme_validation(
        &self,
        stream: Stream,
        server_name: Option<&str>,
        generation: &Generation,
    ) {
        let acceptor = match server_name {
            Some(host) => {
                let certs_dir = &generation.snapshot.settings.certs_dir;
                self.live
                    .acme
                    .challenges
                    .tls_alpn_acceptor(certs_dir, host)
                    .await
            }
            None => None,
        };
        let Some(acceptor) = acceptor else {
            debug!(
                "port {}: acme-tls/1 handshake for {server_name:?}: no challenge under way",
                self.port
            );
            let refuse = generation.tls.refuse().clone();
            let _ =
                pingora::protocols::tls::server::handshake(&refuse, ReplayIo::new(stream)).await;
            return;
        };
        match pingora::protocols::tls::server::handshake(&acceptor, ReplayIo::new(stream)).await {
            Ok(_) => log::info!(
                "port {}: answered TLS-ALPN-01 validation for {server_name:?}",
                self.port
            ),
            Err(e) => debug!(
                "port {}: TLS-ALPN-01 validation handshake failed: {e}",
                self.port
            ),
        }
    }

    /// Whether the connection may go on: its port still speaks what it was bound as, and its PROXY
    /// header (where configured) arrived in time and was valid.
    async fn admit(&self, stream: &mut Stream) -> bool {
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
            return false;
        }
        let proxy_protocol = generation.snapshot.settings.proxy_protocol.clone();
        drop(generation);
        if let Some(settings) = proxy_protocol.filter(|s| s.applies_to(self.port)) {
            let accepted = tokio::time::timeout(
                PRE_HTTP_DEADLINE,
                crate::proxy_protocol::accept(stream.as_mut(), &settings),
            )
            .await
            .unwrap_or_else(|_| Err("PROXY header not complete in time".into()));
            if let Err(reason) = accepted {
                debug!("closing connection on port {}: {reason}", self.port);
                return false;
            }
        }
        true
    }

    /// Everything that happens on an accepted connection, until it closes.
    pub async fn serve_connection(&self, mut stream: Stream, shutdown: &ShutdownWatch) {
        let _open = self.series.open_connection();
        if !Box::pin(self.admit(&mut stream)).await {
            return;
        }
        // Each branch is boxed: this future is the connection's task, and an idle HTTP connection
        // should not carry the space a TLS handshake or a TCP forward needs. HTTP connections do
        // not keep a generation alive either; each request loads its own.
        match self.family {
            ListenerFamily::PlainHttp => {
                Box::pin(self.serve_http(ReplayIo::for_http(stream), shutdown)).await
            }
            ListenerFamily::Tls => Box::pin(self.tls(stream, shutdown)).await,
            ListenerFamily::Tcp => {
                let generation = self.live.current();
                let route = generation
                    .snapshot
                    .listener(self.port)
                    .and_then(|l| l.tcp_routes.first().cloned());
                match route {
                    Some(route) => self.forward(stream, &route, &generation).await,
                    None => debug!("port {}: no TCP route", self.port),
                }
            }
        }
    }
}

/// Reads and drops what the client has already sent, without waiting for more. Closing a socket
/// with unread data makes the kernel answer with a reset, so a client that sent something other
/// than a ClientHello (plaintext HTTP, say) would see "connection reset" instead of the close.
async fn discard_arrived(stream: &mut Stream) {
    use tokio::io::AsyncReadExt;
    // Bounded: a client streaming garbage is not read for long.
    const MOST: usize = 64 * 1024;
    let mut scratch = vec![0u8; 4096];
    let mut discarded = 0;
    while discarded < MOST {
        // A zero timeout polls the read once: it answers only with what has already arrived.
        match tokio::time::timeout(std::time::Duration::ZERO, stream.read(&mut scratch)).await {
            Ok(Ok(read)) if read > 0 => discarded += read,
            _ => break,
        }
    }
}

/// Waits, holding nothing but the stream, until the next request's first byte arrives: false when
/// the client closes, stays silent past [`KEEPALIVE_IDLE`], or the server shuts down (as Pingora
/// drops idle keep-alive connections at shutdown).
async fn next_request_arrives(stream: &mut ReplayIo, shutdown: &ShutdownWatch) -> bool {
    let mut shutdown = shutdown.clone();
    if *shutdown.borrow_and_update() {
        return false;
    }
    let mut first = [0u8; 1];
    tokio::select! {
        biased;
        peeked = tokio::time::timeout(KEEPALIVE_IDLE, stream.try_peek(&mut first)) => {
            matches!(peeked, Ok(Ok(true)))
        }
        _ = shutdown.changed() => false,
    }
}
