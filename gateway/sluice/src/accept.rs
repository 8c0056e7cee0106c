//! Accepting connections on a listener port: bind the socket (or take it over from the Sluice
//! being upgraded), accept until shutdown, and run one task per connection.
//!
//! Pingora's own listening service would do this too, but the task it spawns per connection is
//! sized for the TLS handshake its listener can run (about 8.8 KiB), and an idle keep-alive
//! connection keeps that task for as long as it is open. Sluice does every handshake itself
//! (`listener.rs`), so its connection task only holds the stream and `ListenerApp`'s small
//! connection future, whose heavier phases are boxed and freed when done.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::{error, warn};
use pingora::apps::HttpServerApp;
use pingora::protocols::l4::listener::Listener;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;

use crate::listener::ListenerApp;

/// The listen backlog Pingora uses too: bursts of new connections queue instead of being refused.
const LISTEN_BACKLOG: u32 = 65535;

/// How long apart a port still held by another process is tried again.
const BIND_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a fresh start keeps trying a port that is in use (a restart right after an exit).
pub const BIND_PATIENCE: Duration = Duration::from_secs(5);

/// How long `sluice run --upgrade` keeps trying: a port the old process holds but did not hand
/// over (its address changed, say) frees only once that process has drained and exited.
pub const BIND_PATIENCE_UPGRADING: Duration = Duration::from_secs(120);

/// One listener port as a Pingora service.
pub struct AcceptService<A> {
    name: String,
    address: SocketAddr,
    /// The key the socket is passed under across graceful upgrades: the address as Pingora's own
    /// listeners write it, so an upgrade between versions finds it.
    upgrade_key: String,
    app: Arc<ListenerApp<A>>,
    /// How long a port in use is tried again before giving up.
    bind_patience: Duration,
}

impl<A> AcceptService<A> {
    pub fn new(address: SocketAddr, app: ListenerApp<A>, bind_patience: Duration) -> Self {
        Self {
            name: format!("listener :{}", address.port()),
            address,
            upgrade_key: address.to_string(),
            app: Arc::new(app),
            bind_patience,
        }
    }

    /// The socket passed over by the process being upgraded, else a new one (registered so it can
    /// be passed on at the next upgrade).
    async fn listen(&self, fds: Option<ListenFds>) -> std::io::Result<Listener> {
        let Some(fds) = fds else {
            return bind(self.address, self.bind_patience)
                .await
                .map(Listener::from);
        };
        let inherited = fds.lock().get(&self.upgrade_key).copied();
        if let Some(fd) = inherited {
            return adopt(fd).map(Listener::from);
        }
        let listener = bind(self.address, self.bind_patience).await?;
        fds.lock()
            .add(self.upgrade_key.clone(), listener.as_raw_fd());
        Ok(Listener::from(listener))
    }
}

/// Takes ownership of a listening socket received from the process being upgraded.
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> std::io::Result<tokio::net::TcpListener> {
    // SAFETY: Pingora's bootstrap received this descriptor over the upgrade socket as the
    // listening TCP socket for this service's address, and only this service takes it.
    let socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket)
}

/// Binds with `SO_REUSEADDR`, trying again for up to `patience` while the port is in use.
async fn bind(address: SocketAddr, patience: Duration) -> std::io::Result<tokio::net::TcpListener> {
    let started = std::time::Instant::now();
    loop {
        let socket = match address {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(address) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < patience => {
                warn!("{address} is in use; trying again in {BIND_RETRY_AFTER:?}");
                tokio::time::sleep(BIND_RETRY_AFTER).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> AcceptService<A> {
    async fn accept_until_shutdown(
        app: Arc<ListenerApp<A>>,
        listener: Arc<Listener>,
        mut shutdown: ShutdownWatch,
    ) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            match accepted {
                Ok(mut stream) => {
                    // Responses are written whole; waiting for more would only add latency.
                    let _ = stream.set_nodelay();
                    let app = app.clone();
                    let shutdown = shutdown.clone();
                    // Spread over the worker threads, as Pingora's listener does.
                    pingora_runtime::current_handle().spawn(async move {
                        app.serve_connection(Box::new(stream), &shutdown).await;
                    });
                }
                Err(e) => {
                    error!("accept() on port {} failed: {e}", app.port);
                    // Out of descriptors (EMFILE/ENFILE): accept fails at once until some close,
                    // so pause rather than spin.
                    if matches!(e.raw_os_error(), Some(23 | 24)) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> Service for AcceptService<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let listener = match self.listen(fds).await {
            Ok(listener) => Arc::new(listener),
            Err(e) => {
                // Serving without one of the configured ports would be a half-applied config.
                error!("cannot listen on {}: {e}", self.address);
                std::process::exit(1);
            }
        };
        let accept_loops: Vec<_> = (0..listeners_per_fd.max(1))
            .map(|_| {
                tokio::spawn(Self::accept_until_shutdown(
                    self.app.clone(),
                    listener.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        self.app.inner.http_cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![self.upgrade_key.clone()])
    }
}
