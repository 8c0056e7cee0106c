//! Reload: config files (or SIGHUP, or the admin API) → load → validate → compile → swap.
//!
//! A rejected config is never applied: the previous generation keeps serving and the errors are
//! logged once, counted, and shown by the admin API. Routes, upstreams and most settings apply at
//! once; changes to what is bound at start (listener ports, bind/admin/health addresses, threads)
//! are reported as needing a restart or a graceful upgrade rather than silently ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::{error, info, warn};
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sluice_core::model::Settings;
use sluice_core::snapshot::{ListenerSpec, Snapshot};

use crate::state::Live;

/// Quiet time after the last file event before reloading while a file may still be half written:
/// editors and ConfigMap updates write in several steps (temp file + rename, truncate + write).
const DEBOUNCE: Duration = Duration::from_millis(150);
/// Quiet time once every file written has been closed (or renamed into place): only to gather the
/// other files of the same edit (a `cp` of several files, a `git checkout`) into one reload.
const SETTLE_COMPLETE: Duration = Duration::from_millis(20);
/// Reload at the latest this long after the first event of a burst, even if events keep coming.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// How often generations replaced by a reload are checked for being unused, and freed.
const RELEASE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Reloader {
    pub paths: Vec<PathBuf>,
    pub live: Arc<Live>,
    /// What was bound at start: changes to these need a restart.
    started_with: StartupShape,
    /// Held for a whole reload: the watcher, SIGHUP and the admin API never interleave.
    last: std::sync::Mutex<LastLoad>,
}

/// What the previous load leaves the next: its fingerprint (equal means nothing changed) and its
/// caches: the files it read, by their identity on disk (unchanged ones are not read again), and its
/// parsed documents and validated VirtualServices (only changed ones are parsed and validated again).
struct LastLoad {
    fingerprint: u64,
    cache: sluice_core::LoadCache,
}

#[derive(Debug, Clone)]
struct StartupShape {
    listeners: Vec<ListenerSpec>,
    settings: Settings,
}

impl StartupShape {
    fn of(snapshot: &Snapshot) -> Self {
        Self {
            listeners: snapshot.listeners().map(|l| l.spec).collect(),
            settings: snapshot.settings.clone(),
        }
    }

    /// Human-readable differences that the running process cannot apply.
    fn needs_restart(&self, next: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        let next_listeners: Vec<ListenerSpec> = next.listeners().map(|l| l.spec).collect();
        for added in next_listeners
            .iter()
            .filter(|l| !self.listeners.contains(l))
        {
            out.push(format!(
                "listener port {} ({:?}) is new: restart Sluice or run a graceful upgrade to bind it",
                added.port, added.family
            ));
        }
        for removed in self
            .listeners
            .iter()
            .filter(|l| !next_listeners.contains(l))
        {
            out.push(format!(
                "listener port {} is no longer configured: it keeps its socket and answers 404 until restart",
                removed.port
            ));
        }
        let (old, new) = (&self.settings, &next.settings);
        let fields: [(&str, bool); 7] = [
            ("accessLog", old.access_log != new.access_log),
            ("bindAddress", old.bind_address != new.bind_address),
            ("admin.address", old.admin_address != new.admin_address),
            ("healthPort", old.health_port != new.health_port),
            ("threads", old.threads != new.threads),
            ("upgradeSocket", old.upgrade_socket != new.upgrade_socket),
            (
                "admin.tokenFile",
                old.admin_token_path() != new.admin_token_path(),
            ),
        ];
        for (field, changed) in fields {
            if changed {
                out.push(format!(
                    "GatewaySettings `spec.{field}` changed: applies after a restart"
                ));
            }
        }
        out
    }
}

impl Reloader {
    pub fn new(
        paths: Vec<PathBuf>,
        live: Arc<Live>,
        fingerprint: u64,
        cache: sluice_core::LoadCache,
    ) -> Self {
        let started_with = StartupShape::of(&live.current().snapshot);
        Self {
            paths,
            live,
            started_with,
            last: std::sync::Mutex::new(LastLoad { fingerprint, cache }),
        }
    }

    /// Loads, validates and compiles the config files, and swaps the result in. `force` reloads
    /// even when no file changed (SIGHUP, admin API). Returns the generation now serving.
    pub fn reload(&self, trigger: &str, force: bool) -> Result<u64, String> {
        let mut last = self
            .last
            .lock()
            .map_err(|_| "a previous reload panicked".to_string())?;
        let started = std::time::Instant::now();
        if force {
            last.cache.forget_files();
        }
        let loaded = sluice_core::load_paths_cached(&self.paths, &mut last.cache);
        let reads = last.cache.last_file_reads();
        let loaded_in = started.elapsed();
        let unchanged =
            std::mem::replace(&mut last.fingerprint, loaded.fingerprint) == loaded.fingerprint;
        let serving = self.live.current().number;
        if unchanged && !force {
            info!("config reload ({trigger}): the files are unchanged");
            return Ok(serving);
        }
        let diagnostics = loaded.diagnostics.clone().into_sorted();
        let warnings: Vec<String> = diagnostics
            .iter()
            .filter(|d| !d.is_error())
            .map(ToString::to_string)
            .collect();
        // Certificates are part of what must load: a broken one rejects the whole reload.
        let built = loaded.snapshot_cached(&mut last.cache).map(|snapshot| {
            let compiled_in = started.elapsed();
            let tls = crate::tls::TlsListeners::build(&snapshot);
            (snapshot, tls.map(|tls| (tls, compiled_in)))
        });
        let (built, certificate_errors) = match built {
            Some((snapshot, Ok((tls, compiled_in)))) => {
                (Some((snapshot, tls, compiled_in)), Vec::new())
            }
            Some((_, Err(errors))) => (None, errors),
            None => (None, Vec::new()),
        };
        match built {
            None => {
                let errors: Vec<String> = diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .map(ToString::to_string)
                    .chain(certificate_errors)
                    .collect();
                let text = errors.join("\n");
                error!(
                    "config reload ({trigger}) rejected, generation {serving} keeps serving:\n{text}"
                );
                self.live.metrics.record_reload(false, serving);
                self.live.update_status(|s| {
                    s.reload_attempts += 1;
                    s.last_reload_successful = false;
                    s.last_error = Some(text.clone());
                    s.warnings = warnings;
                });
                Err(text)
            }
            Some((snapshot, tls, compiled_in)) => {
                let needs_restart = self.started_with.needs_restart(&snapshot);
                for message in &needs_restart {
                    warn!("{message}");
                }
                for warning in &warnings {
                    warn!("{warning}");
                }
                let names = snapshot.dns_names().to_vec();
                let generation = self.live.apply(snapshot, tls);
                info!(
                    "config reload ({trigger}) applied: generation {generation} in {} ms \
                     (load and validate {} ms, compile {} ms; {} files read, {} unchanged)",
                    started.elapsed().as_millis(),
                    loaded_in.as_millis(),
                    (compiled_in - loaded_in).as_millis(),
                    reads.read,
                    reads.unchanged,
                );
                self.live.release_retired();
                self.live.metrics.record_reload(true, generation);
                self.live.update_status(|s| {
                    s.generation = generation;
                    s.reload_attempts += 1;
                    s.last_reload_successful = true;
                    s.last_error = None;
                    s.warnings = warnings;
                    s.files = loaded.files.clone();
                    s.needs_restart = needs_restart;
                });
                // New DNS names resolve right away rather than at the next refresh.
                let live = self.live.clone();
                tokio::spawn(async move { live.dns.refresh_missing(&names).await });
                Ok(generation)
            }
        }
    }
}

/// Directories to watch for `paths`: a directory itself, or a file's parent (editors and ConfigMaps
/// replace files by rename, which a watch on the file alone would lose). `certificates` are the
/// certificate files the config names outside `certs_dir`.
fn watch_dirs(paths: &[PathBuf], certs_dir: &Path, certificates: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .chain(certificates)
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            }
        })
        .collect();
    if certs_dir.is_dir() {
        dirs.push(certs_dir.to_path_buf());
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// What the file watcher reacts to. Decided on notify's own thread, so a busy file beside the
/// config (a log written on every request) never wakes the reloader.
struct WatchedFiles {
    /// The `--config` paths, as given and as absolute paths (notify reports absolute ones).
    config: Vec<PathBuf>,
    /// The certificate and key files the config names, in the same two forms.
    certificates: Vec<PathBuf>,
}

impl WatchedFiles {
    fn new(config: &[PathBuf], certificates: &[PathBuf]) -> Self {
        let both_forms = |paths: &[PathBuf]| {
            paths
                .iter()
                .flat_map(|p| {
                    [
                        p.clone(),
                        std::path::absolute(p).unwrap_or_else(|_| p.clone()),
                    ]
                })
                .collect()
        };
        Self {
            config: both_forms(config),
            certificates: both_forms(certificates),
        }
    }

    /// Whether a change to `path` is a certificate or key changing: not covered by the config
    /// fingerprint, so the reload it triggers is forced.
    fn is_certificate(&self, path: &Path) -> bool {
        let in_secret = path.components().any(|c| c.as_os_str() == "..data");
        in_secret
            || matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("crt" | "key" | "pem" | "cert")
            )
            || self.certificates.iter().any(|c| c == path)
    }

    /// Whether a change to `path` can change the config: a YAML file, a `--config` file, a
    /// certificate, or a ConfigMap's `..data` swap. Editor swap files and the like are ignored.
    fn is_relevant(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) && !name.starts_with('.');
        yaml || name == "..data"
            || self.config.iter().any(|p| p == path)
            || self.is_certificate(path)
    }
}

/// Watches the config (and certificate) directories and reloads after each burst of changes;
/// reloads on SIGHUP too.
pub struct ReloadService {
    reloader: Arc<Reloader>,
    /// Taken by [`BackgroundService::start`]. The watches exist from [`ReloadService::new`] on,
    /// before any port opens, so an edit made as soon as Sluice answers is never missed.
    watch: std::sync::Mutex<Option<FileWatch>>,
}

struct FileWatch {
    /// Dropping the watcher ends the watches.
    _watcher: Option<notify::RecommendedWatcher>,
    events: tokio::sync::mpsc::UnboundedReceiver<FileEvent>,
}

impl ReloadService {
    pub fn new(reloader: Arc<Reloader>) -> Self {
        let generation = reloader.live.current();
        let certs_dir = generation.snapshot.settings.certs_dir.clone();
        let certificates: Vec<PathBuf> = generation
            .snapshot
            .listeners()
            .flat_map(|l| &l.tls.servers)
            .flat_map(|server| crate::tls::credential_files(server, &certs_dir))
            .collect();
        drop(generation);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel::<FileEvent>();
        let watched = WatchedFiles::new(&reloader.paths, &certificates);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.need_rescan() {
                // The kernel dropped events (its queue overflowed): any file may have changed.
                let _ = tx.send(FileEvent {
                    path: PathBuf::new(),
                    step: WriteStep::Done,
                    force: true,
                });
                return;
            }
            let Some(step) = WriteStep::of(&event.kind) else {
                return;
            };
            for path in event.paths {
                if watched.is_relevant(&path) {
                    let force = watched.is_certificate(&path);
                    let _ = tx.send(FileEvent { path, step, force });
                }
            }
        });
        let watcher = match watcher {
            Ok(mut watcher) => {
                for dir in watch_dirs(&reloader.paths, &certs_dir, &certificates) {
                    // certsDir is watched with its subdirectories: mounted Kubernetes secrets
                    // (`certs/NAME/tls.crt`) rotate by swapping `certs/NAME/..data`.
                    let mode = if dir == certs_dir {
                        RecursiveMode::Recursive
                    } else {
                        RecursiveMode::NonRecursive
                    };
                    if let Err(e) = watcher.watch(&dir, mode) {
                        warn!(
                            "cannot watch {}: {e}; edits there need SIGHUP",
                            dir.display()
                        );
                    }
                }
                Some(watcher)
            }
            Err(e) => {
                warn!("file watching unavailable ({e}); reload with SIGHUP");
                None
            }
        };
        Self {
            reloader,
            watch: std::sync::Mutex::new(Some(FileWatch {
                _watcher: watcher,
                events,
            })),
        }
    }
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let taken = self.watch.lock().ok().and_then(|mut watch| watch.take());
        let Some(FileWatch {
            _watcher,
            events: mut rx,
        }) = taken
        else {
            return;
        };
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                warn!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        // Replaced generations are freed here, once the requests that used them are done.
        let mut release = tokio::time::interval(RELEASE_INTERVAL);
        release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = release.tick() => {
                    let live = self.reloader.live.clone();
                    let _ = tokio::task::spawn_blocking(move || live.release_retired()).await;
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.run_reload("SIGHUP", true).await;
                }
                Some(first) = rx.recv() => {
                    let force = settle(first, &mut rx).await;
                    let trigger = if force { "certificate change" } else { "file change" };
                    self.run_reload(trigger, force).await;
                }
            }
        }
    }
}

/// One file event, as far as reloading cares.
#[derive(Debug)]
struct FileEvent {
    path: PathBuf,
    step: WriteStep,
    /// The reload must run even if the config text is unchanged: a certificate changed, or events
    /// were lost.
    force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteStep {
    /// The file is being written: more may follow (created, truncated, data written).
    Writing,
    /// The file is complete: closed after writing, renamed into place, or removed.
    Done,
}

impl WriteStep {
    /// `None` for events that change nothing. Opening and reading a file are events too, and every
    /// reload reads the certificates: reacting to those would reload forever.
    fn of(kind: &notify::EventKind) -> Option<Self> {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
        match kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Self::Done),
            EventKind::Access(_) | EventKind::Other => None,
            EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => Some(Self::Done),
            EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) => Some(Self::Writing),
        }
    }
}

/// Gathers the rest of a burst of file events, starting with `first`: returns once every file
/// written has been completed and nothing more came for [`SETTLE_COMPLETE`], or nothing came
/// for [`DEBOUNCE`] (a writer that never closes, an event source without close events), or
/// [`MAX_DELAY`] has passed. Returns whether any of the events forces the reload.
async fn settle(
    first: FileEvent,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<FileEvent>,
) -> bool {
    let deadline = tokio::time::Instant::now() + MAX_DELAY;
    let mut writing: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut force = false;
    let mut event = first;
    loop {
        force |= event.force;
        match event.step {
            WriteStep::Writing => writing.insert(event.path),
            WriteStep::Done => writing.remove(&event.path),
        };
        let quiet = if writing.is_empty() {
            SETTLE_COMPLETE
        } else {
            DEBOUNCE
        };
        let quiet_until = (tokio::time::Instant::now() + quiet).min(deadline);
        let next = tokio::select! {
            next = rx.recv() => next,
            _ = tokio::time::sleep_until(quiet_until) => None,
        };
        match next {
            Some(next) => event = next,
            None => return force,
        }
    }
}

impl ReloadService {
    async fn run_reload(&self, trigger: &'static str, force: bool) {
        let reloader = self.reloader.clone();
        // Parsing a large config is CPU work: keep it off the async worker.
        let _ = tokio::task::spawn_blocking(move || reloader.reload(trigger, force)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watcher_keeps_config_and_certificates_and_drops_the_rest() {
        let watched = WatchedFiles::new(
            &[PathBuf::from("gateway.conf")],
            &[PathBuf::from("/etc/tls/site.cer")],
        );
        let cwd = std::env::current_dir().unwrap_or_default();
        // notify reports absolute paths, also for a config given relative (and watched as `.`).
        assert!(watched.is_relevant(&cwd.join(".").join("gateway.conf")));
        assert!(watched.is_relevant(&cwd.join("routes.yaml")));
        assert!(watched.is_relevant(Path::new("/etc/sluice/..data")));
        // A certificate the config names, whatever its extension, forces the reload.
        assert!(watched.is_relevant(Path::new("/etc/tls/site.cer")));
        assert!(watched.is_certificate(Path::new("/etc/tls/site.cer")));
        assert!(watched.is_certificate(Path::new("/certs/example/tls.key")));
        assert!(!watched.is_certificate(&cwd.join("routes.yaml")));
        for ignored in [
            "requests.log",
            ".gateway.yaml.swp",
            ".routes.yaml",
            "other.conf",
        ] {
            assert!(!watched.is_relevant(&cwd.join(ignored)), "{ignored}");
        }
    }
}
