//! The live configuration and process state shared by every listener and background task.
//!
//! The current compiled snapshot sits behind one `ArcSwap`: requests `load` it once and keep that
//! generation to the end; a reload builds a whole new [`Generation`] off the request path and swaps
//! it in atomically. Beside it lives what survives reloads (DNS results keyed by host name) and what
//! the admin API reports (reload status, readiness, requests in flight).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use sluice_core::snapshot::Snapshot;

use crate::dns::DnsCache;
use crate::metrics::{DestinationSeries, Metrics};
use crate::tls::TlsListeners;

/// One applied config.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    pub snapshot: Snapshot,
    /// Certificates and TLS settings of this generation's TLS listeners.
    pub tls: TlsListeners,
    /// Request and TCP metrics per cluster (same index as the snapshot's clusters).
    pub series: Vec<Arc<DestinationSeries>>,
    /// Metrics of requests that reached no destination (no route, redirects, direct responses).
    pub unrouted: Arc<DestinationSeries>,
}

impl Generation {
    fn new(number: u64, snapshot: Snapshot, tls: TlsListeners, metrics: &Metrics) -> Self {
        let series = snapshot
            .clusters()
            .iter()
            .map(|cluster| Arc::new(DestinationSeries::new(metrics, Some(&cluster.key))))
            .collect();
        Self {
            number,
            snapshot,
            tls,
            series,
            unrouted: Arc::new(DestinationSeries::new(metrics, None)),
        }
    }

    /// The metrics of the cluster at `index`, or of unrouted requests.
    pub fn series(&self, cluster: Option<usize>) -> &DestinationSeries {
        cluster
            .and_then(|i| self.series.get(i))
            .unwrap_or(&self.unrouted)
    }
}

/// What `GET /api/v1/status` reports about configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    pub generation: u64,
    /// Reload attempts since start, successful or not (a broken file counts too).
    pub reload_attempts: u64,
    pub last_reload_successful: bool,
    /// Every error of the last failed reload, as `file:line:col: message` lines; `None` once a
    /// reload succeeds.
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
    pub files: Vec<PathBuf>,
    /// Changes that were not applied because they need a restart (or a graceful upgrade).
    pub needs_restart: Vec<String>,
}

#[derive(Debug)]
pub struct Live {
    current: ArcSwap<Generation>,
    /// Generations a reload replaced, held until no request uses them and then freed by
    /// [`Live::release_retired`] off the request path: freeing a 10,000-host generation takes
    /// ~150 ms, which must not land on whichever request happened to finish last.
    retired: Mutex<Vec<Arc<Generation>>>,
    pub dns: DnsCache,
    pub metrics: Metrics,
    pub status: Mutex<ReloadStatus>,
    /// Set at start when `accessLog` is configured.
    pub access_log: std::sync::OnceLock<Arc<crate::access_log::AccessLogger>>,
    /// Certificates Sluice obtains itself: challenge answers and per-host order state.
    pub acme: crate::acme::Acme,
    /// Sampled spans on their way to the collector (set at start; tracing may be enabled later).
    pub spans: std::sync::OnceLock<Arc<crate::spans::SpanQueue>>,
    /// Listeners are bound and serving (Pingora reached its running phase).
    serving: AtomicBool,
    /// Shutdown has begun: `/readyz` answers 503 so the balancer moves away.
    draining: AtomicBool,
    /// Shutdown or an upgrade has begun: HTTP/1.1 responses say `Connection: close` so clients
    /// reconnect (to another replica, or to the process that took the sockets over).
    closing: AtomicBool,
    in_flight: Arc<AtomicUsize>,
}

impl Live {
    pub fn new(
        snapshot: Snapshot,
        tls: TlsListeners,
        files: Vec<PathBuf>,
    ) -> prometheus::Result<Arc<Self>> {
        let metrics = Metrics::new()?;
        metrics.record_reload(true, 1);
        metrics.record_certificates(&tls.certificate_expiry);
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(Generation::new(1, snapshot, tls, &metrics)),
            retired: Mutex::new(Vec::new()),
            dns: DnsCache::default(),
            access_log: std::sync::OnceLock::new(),
            acme: crate::acme::Acme::default(),
            spans: std::sync::OnceLock::new(),
            metrics,
            status: Mutex::new(ReloadStatus {
                generation: 1,
                reload_attempts: 0,
                last_reload_successful: true,
                files,
                ..ReloadStatus::default()
            }),
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }))
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Applies a new snapshot as the next generation and returns its number.
    pub fn apply(&self, snapshot: Snapshot, tls: TlsListeners) -> u64 {
        let number = self.current.load().number + 1;
        self.metrics.record_certificates(&tls.certificate_expiry);
        let replaced = self.current.swap(Arc::new(Generation::new(
            number,
            snapshot,
            tls,
            &self.metrics,
        )));
        if let Ok(mut retired) = self.retired.lock() {
            retired.push(replaced);
        }
        self.acme.config_changed();
        number
    }

    /// Frees the replaced generations that no request holds any more. Call it where a pause does
    /// not matter (the reloader's thread); generations still in use wait for the next call.
    pub fn release_retired(&self) {
        let unused: Vec<Arc<Generation>> = match self.retired.lock() {
            Ok(mut retired) => {
                let (unused, used) = retired
                    .drain(..)
                    .partition(|generation| Arc::strong_count(generation) == 1);
                *retired = used;
                unused
            }
            Err(_) => Vec::new(),
        };
        if !unused.is_empty() {
            drop(unused);
            return_freed_pages();
        }
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn update_status(&self, change: impl FnOnce(&mut ReloadStatus)) {
        if let Ok(mut status) = self.status.lock() {
            change(&mut status);
        }
    }

    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::SeqCst);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.closing.store(true, Ordering::SeqCst);
    }

    /// An upgrade: connections should move to the new process, which serves the same sockets, so
    /// the balancer must keep seeing this node as ready.
    pub fn start_handover(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ready for traffic: config loaded, listeners bound, not shutting down.
    pub fn is_ready(&self) -> bool {
        self.serving.load(Ordering::SeqCst) && !self.is_draining()
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn request_started(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.in_flight.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// One request in flight; shutdown waits for these.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Gives the pages a freed generation occupied back to the system. mimalloc returns free pages
/// only after a delay and only when some thread next allocates through its slow path, so an idle
/// Sluice kept a large replaced generation's memory resident indefinitely: the 10,000-host config
/// held 556 MiB after reloads that rebuilt everything, against 450 with this (BENCHMARKS.md).
/// Without mimalloc as the global allocator (unit tests) it finds nothing to collect.
fn return_freed_pages() {
    // SAFETY: `mi_collect` has no preconditions; it only walks the calling thread's heap and the
    // shared arenas under mimalloc's own locks.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
