//! Certificates over ACME for Gateway servers whose `credentialName` is `acme:<issuer>`.
//!
//! A background service keeps one certificate per host: it orders when none is stored, renews
//! when a third of the lifetime is left (or `renewBefore`), and retries failures with capped
//! exponential backoff while the current certificate keeps serving. An issued certificate is
//! written to `certsDir/HOST.crt` + `.key` and a reload swaps it in; the TLS loader reads those
//! files like any other credential. Replicas sharing `certsDir` take a per-host lease first, so
//! only one of them orders; the others pick the files up through their certificate watcher.

mod challenge;
mod order;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use sluice_core::model::{AcmeIssuer, Credential};
use sluice_core::snapshot::{Snapshot, TlsServer};

pub use challenge::{Challenges, ACME_TLS_ALPN, HTTP_CHALLENGE_PREFIX};
use instant_acme::CertificateIdentifier;
use rustls::pki_types::Der;
use store::{unix_now, Lock, Store};

fn ari_key(issuer: &AcmeIssuer) -> (String, String) {
    (issuer.name.clone(), issuer.directory_url.clone())
}

use crate::reload::Reloader;
use crate::state::Live;

/// How long a replica's lease on ordering one host lasts. An order takes seconds to a few
/// minutes; a replica that dies mid-order blocks the others this long at most.
const ORDER_LEASE: Duration = Duration::from_secs(15 * 60);
/// While another replica holds the lease, look again this often (its certificate arrives through
/// the watcher; this catches a replica that gave up).
const REPLICA_RECHECK: i64 = 30;
/// Longest sleep between two looks at the stored certificates.
const MAX_SLEEP: i64 = 3600;

/// The host names of an ACME server (its `hosts` without a namespace, which validation
/// restricted to exact names).
pub fn server_hosts(server: &TlsServer) -> impl Iterator<Item = &str> {
    server
        .hosts
        .iter()
        .map(|h| h.rsplit('/').next().unwrap_or(h))
}

/// Every ACME-managed host of a config and the issuer that certifies it (the first server naming
/// a host decides).
pub fn managed_hosts(snapshot: &Snapshot) -> BTreeMap<String, AcmeIssuer> {
    let mut hosts = BTreeMap::new();
    for listener in snapshot.listeners() {
        for server in &listener.tls.servers {
            let Some(Credential::Acme(issuer)) = &server.tls.credential else {
                continue;
            };
            let Some(issuer) = snapshot.settings.acme_issuer(issuer) else {
                continue;
            };
            for host in server_hosts(server) {
                hosts
                    .entry(host.to_ascii_lowercase())
                    .or_insert_with(|| issuer.clone());
            }
        }
    }
    hosts
}

pub fn is_managed(snapshot: &Snapshot, host: &str) -> bool {
    snapshot.listeners().any(|listener| {
        listener.tls.servers.iter().any(|server| {
            matches!(server.tls.credential, Some(Credential::Acme(_)))
                && server_hosts(server).any(|h| h.eq_ignore_ascii_case(host))
        })
    })
}

/// What the admin status reports per host.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    pub issuer: String,
    /// `pending` (no certificate yet), `valid`, `renewing`, `retrying` (last order failed),
    /// `replica` (another replica holds the order lease).
    pub state: &'static str,
    pub not_after: Option<i64>,
    /// When renewal is due (Unix seconds).
    pub renew_at: Option<i64>,
    /// When the next order is attempted, after a failure (Unix seconds).
    pub retry_at: Option<i64>,
    pub failures: u32,
    pub last_error: Option<String>,
    #[serde(skip)]
    forced: bool,
}

/// ACME state shared with the listeners (challenge answers) and the admin API.
#[derive(Debug, Default)]
pub struct Acme {
    pub challenges: Challenges,
    hosts: Mutex<BTreeMap<String, HostStatus>>,
    wake: tokio::sync::Notify,
}

impl Acme {
    pub fn status(&self) -> BTreeMap<String, HostStatus> {
        self.hosts.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Orders a new certificate for `host` now, whatever its expiry and backoff say.
    pub fn force_renewal(&self, snapshot: &Snapshot, host: &str) -> bool {
        if !is_managed(snapshot, host) {
            return false;
        }
        if let Ok(mut hosts) = self.hosts.lock() {
            hosts.entry(host.to_string()).or_default().forced = true;
        }
        self.wake.notify_one();
        true
    }

    /// A new config may name new hosts: look at once.
    pub fn config_changed(&self) {
        self.wake.notify_one();
    }

    fn update(&self, host: &str, change: impl FnOnce(&mut HostStatus)) {
        if let Ok(mut hosts) = self.hosts.lock() {
            if let Some(status) = hosts.get_mut(host) {
                change(status);
            }
        }
    }
}

/// The certificate stored for a host, as far as scheduling cares.
struct Stored {
    not_before: i64,
    not_after: i64,
    /// How ARI (RFC 9773) names it; `None` without an Authority Key Identifier.
    id: Option<CertificateIdentifier<'static>>,
}

/// The stored certificate, checked as the TLS loader checks it (parses, matches its key, valid
/// now): one the loader would refuse counts as missing, so it is ordered again.
fn stored_certificate(certs_dir: &std::path::Path, host: &str) -> Option<Stored> {
    let (cert, key) = store::certificate_paths(certs_dir, host);
    let (certified, _, not_after) = crate::tls::load_key_pair(&cert, &key).ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certified.cert.first()?.as_ref()).ok()?;
    let authority_key_id = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        });
    let id = authority_key_id.map(|aki| {
        CertificateIdentifier::new(
            Der::from_slice(aki),
            Der::from_slice(parsed.tbs_certificate.raw_serial()),
        )
        .into_owned()
    });
    Some(Stored {
        not_before: parsed.validity().not_before.timestamp(),
        not_after,
        id,
    })
}

/// When to renew: `renewBefore` ahead of expiry, else when a third of the lifetime is left;
/// moved earlier by up to a twentieth of that window (at most an hour), fixed per certificate, so
/// replicas and many hosts issued together do not all renew in the same second.
fn renewal_time(host: &str, stored: &Stored, issuer: &AcmeIssuer) -> i64 {
    let lifetime = (stored.not_after - stored.not_before).max(0);
    let window = issuer
        .renew_before
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(lifetime / 3)
        .max(0);
    let spread = (window / 20).clamp(0, 3600);
    let jitter = if spread > 0 {
        let seed = host.bytes().fold(stored.not_after as u64, |h, b| {
            h.wrapping_mul(31).wrapping_add(u64::from(b))
        });
        (seed % spread as u64) as i64
    } else {
        0
    };
    stored
        .not_after
        .saturating_sub(window)
        .saturating_sub(jitter)
}

/// The wait after the `failures`-th failure in a row: doubling from the issuer's minimum up to its
/// maximum, with ±10% jitter.
fn backoff(issuer: &AcmeIssuer, failures: u32) -> Duration {
    let min = issuer.min_retry_interval.as_secs_f64();
    let max = issuer.max_retry_interval.as_secs_f64();
    let exponent = failures.saturating_sub(1).min(30);
    let base = (min * 2f64.powi(exponent as i32)).min(max);
    Duration::try_from_secs_f64(base * (0.9 + fastrand::f64() * 0.2))
        .unwrap_or(issuer.max_retry_interval)
}

/// The background service that obtains and renews certificates.
pub struct AcmeService {
    pub live: Arc<Live>,
    pub reloader: Arc<Reloader>,
    /// Identifies this process in order leases (`hostname:pid:random`).
    pub owner: String,
}

impl AcmeService {
    pub fn new(live: Arc<Live>, reloader: Arc<Reloader>) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let owner = format!(
            "{hostname}:{}:{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        Self {
            live,
            reloader,
            owner,
        }
    }
}

/// Releases the order lease and withdraws challenge answers however the order ends, including
/// when shutdown cancels it midway (a restarted Sluice then resumes at once, not after the lease).
struct OrderGuard<'a> {
    store: &'a Store,
    challenges: &'a Challenges,
    host: &'a str,
    owner: &'a str,
}

impl Drop for OrderGuard<'_> {
    fn drop(&mut self) {
        self.challenges.withdraw(self.host, self.store);
        self.store.unlock(self.host, self.owner);
    }
}

/// Longest one order may take (a CA that keeps answering "processing"); shorter than the lease so
/// no replica starts a second order while this one still runs.
const ORDER_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Accounts by issuer, with the issuer settings they were made for (a changed issuer gets a new
/// client and account).
type Accounts = HashMap<String, (AcmeIssuer, order::AcmeHttp, instant_acme::Account)>;

/// What the CA's renewal information (ARI) said about one certificate.
struct AriAnswer {
    /// The certificate it is about (its not-after).
    certificate: i64,
    /// A time inside the suggested window; `None` if the query failed.
    renew_at: Option<i64>,
    next_query: i64,
}

/// What the scheduler remembers between rounds.
#[derive(Default)]
struct Memory {
    accounts: Accounts,
    /// Stored certificates a reload was already run for (host → not-after).
    picked_up: HashMap<String, i64>,
    ari: HashMap<String, AriAnswer>,
    /// Issuers (name and directory) whose CA offers no ARI.
    no_ari: HashSet<(String, String)>,
}

/// ARI answers are asked again after the CA's Retry-After, kept within these bounds.
const ARI_MIN_RECHECK: i64 = 60;
const ARI_MAX_RECHECK: i64 = 86_400;
const ARI_RETRY_AFTER_ERROR: i64 = 3600;

#[async_trait]
impl BackgroundService for AcmeService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut memory = Memory::default();
        loop {
            let sleep_until = tokio::select! {
                next = self.round(&mut memory) => next,
                _ = shutdown.changed() => return,
            };
            let wait = Duration::from_secs(sleep_until.saturating_sub(unix_now()).max(0) as u64);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.live.acme.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl AcmeService {
    /// Looks at every managed host, orders what is due, and returns when to look again.
    async fn round(&self, memory: &mut Memory) -> i64 {
        let generation = self.live.current();
        let certs_dir = generation.snapshot.settings.certs_dir.clone();
        let managed = managed_hosts(&generation.snapshot);
        if let Ok(mut hosts) = self.live.acme.hosts.lock() {
            hosts.retain(|host, _| managed.contains_key(host));
            for (host, issuer) in &managed {
                let status = hosts.entry(host.clone()).or_default();
                status.issuer = issuer.name.clone();
            }
        }
        let mut next = unix_now() + MAX_SLEEP;
        for (host, issuer) in &managed {
            let now = unix_now();
            let stored = stored_certificate(&certs_dir, host).filter(|s| s.not_after > now);
            let mut renew_at = stored.as_ref().map(|s| renewal_time(host, s, issuer));
            if let (Some(stored), Some(at)) = (&stored, renew_at) {
                if at > now {
                    // The CA may ask for an earlier renewal (a revocation coming, say).
                    let suggested = self
                        .ari_renewal(host, issuer, &certs_dir, stored, memory)
                        .await;
                    renew_at = Some(suggested.map_or(at, |s| s.min(at)));
                }
            }
            let status = self.live.acme.status().remove(host).unwrap_or_default();
            let due = renew_at.is_none_or(|at| at <= now);
            let when = if status.forced {
                now
            } else {
                renew_at.unwrap_or(now).max(status.retry_at.unwrap_or(0))
            };
            if let Some(stored) = &stored {
                self.pick_up(&generation, host, stored.not_after, &mut memory.picked_up)
                    .await;
            }
            self.live.acme.update(host, |s| {
                let renewed = s.not_after != stored.as_ref().map(|s| s.not_after);
                s.not_after = stored.as_ref().map(|s| s.not_after);
                s.renew_at = renew_at;
                // A failed forced renewal stays visible until a new certificate appears.
                if !due && (s.failures == 0 || renewed) {
                    // Valid and not due, whoever renewed it (a replica, an operator's copy).
                    s.state = "valid";
                    s.failures = 0;
                    s.retry_at = None;
                    s.last_error = None;
                } else if s.state.is_empty() {
                    s.state = if stored.is_some() { "valid" } else { "pending" };
                }
            });
            if (due || status.forced) && when <= now {
                let replaces = stored
                    .as_ref()
                    .filter(|_| !memory.no_ari.contains(&ari_key(issuer)))
                    .filter(|_| memory.ari.get(host).is_some_and(|a| a.renew_at.is_some()))
                    .and_then(|s| s.id.clone());
                let retry = self
                    .order(host, issuer, &certs_dir, &mut memory.accounts, replaces)
                    .await;
                next = next.min(retry.unwrap_or(next));
            } else {
                next = next.min(when);
            }
        }
        next
    }

    /// When the CA's renewal information suggests renewing `stored`: a fixed random point of its
    /// suggested window. Asked only with an existing account (not worth registering one for),
    /// again after the CA's Retry-After; a CA without ARI is remembered and not asked again.
    async fn ari_renewal(
        &self,
        host: &str,
        issuer: &AcmeIssuer,
        certs_dir: &std::path::Path,
        stored: &Stored,
        memory: &mut Memory,
    ) -> Option<i64> {
        let now = unix_now();
        if memory.no_ari.contains(&ari_key(issuer)) {
            return None;
        }
        if let Some(answer) = memory
            .ari
            .get(host)
            .filter(|a| a.certificate == stored.not_after && now < a.next_query)
        {
            return answer.renew_at;
        }
        let id = stored.id.as_ref()?;
        let store = Store::new(certs_dir);
        let has_account = store
            .account(&issuer.name)
            .ok()
            .flatten()
            .is_some_and(|a| a.directory_url == issuer.directory_url);
        if !has_account {
            return None;
        }
        let (_, account) = self
            .account(issuer, &store, &mut memory.accounts)
            .await
            .ok()?;
        let (renew_at, next_query) = match account.renewal_info(id).await {
            Ok((info, retry_after)) => {
                let start = info.suggested_window.start.unix_timestamp();
                let end = info.suggested_window.end.unix_timestamp().max(start);
                // RFC 9773 4.2: a uniformly random time in the window, kept until the window
                // changes (so each round does not draw again).
                let seed = host.bytes().fold(start as u64, |h, b| {
                    h.wrapping_mul(31).wrapping_add(u64::from(b))
                });
                let span = u64::try_from(end - start).unwrap_or(0);
                let at = start + i64::try_from(seed % span.max(1)).unwrap_or(0);
                let wait = i64::try_from(retry_after.as_secs()).unwrap_or(ARI_MAX_RECHECK);
                (Some(at), now + wait.clamp(ARI_MIN_RECHECK, ARI_MAX_RECHECK))
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                info!(
                    "ACME issuer `{}` offers no renewal information (ARI): renewing by expiry",
                    issuer.name
                );
                memory.no_ari.insert(ari_key(issuer));
                return None;
            }
            Err(e) => {
                log::debug!("ACME {host}: renewal information unavailable: {e}");
                (None, now + ARI_RETRY_AFTER_ERROR)
            }
        };
        memory.ari.insert(
            host.to_string(),
            AriAnswer {
                certificate: stored.not_after,
                renew_at,
                next_query,
            },
        );
        renew_at
    }

    /// A certificate on disk that this generation does not serve (a replica stored it, and the
    /// watcher missed it: network filesystems send no change events) is loaded by a reload, once.
    async fn pick_up(
        &self,
        generation: &crate::state::Generation,
        host: &str,
        not_after: i64,
        picked_up: &mut HashMap<String, i64>,
    ) {
        let served = generation
            .tls
            .certificate_expiry
            .iter()
            .any(|c| c.host == host && c.not_after == not_after);
        if served || picked_up.get(host) == Some(&not_after) {
            return;
        }
        picked_up.insert(host.to_string(), not_after);
        self.reload(&format!("stored ACME certificate for {host}"))
            .await;
    }

    async fn reload(&self, trigger: &str) {
        let reloader = self.reloader.clone();
        let trigger = trigger.to_string();
        let done = tokio::task::spawn_blocking(move || reloader.reload(&trigger, true)).await;
        if let Ok(Err(errors)) = done {
            warn!("the new certificate waits for a valid config: {errors}");
        }
    }

    /// Orders `host`'s certificate under the replica lease. Returns when to look again if that is
    /// sooner than usual (after a failure, or while a replica holds the lease).
    async fn order(
        &self,
        host: &str,
        issuer: &AcmeIssuer,
        certs_dir: &std::path::Path,
        accounts: &mut Accounts,
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Option<i64> {
        let acme = &self.live.acme;
        let store = Store::new(certs_dir);
        match store.lock(host, &self.owner, ORDER_LEASE) {
            Ok(Lock::Acquired) => {}
            Ok(Lock::HeldBy(owner, until)) => {
                info!("ACME {host}: replica {owner} is ordering; picking its certificate up");
                acme.update(host, |s| s.state = "replica");
                return Some(until.min(unix_now() + REPLICA_RECHECK));
            }
            Err(e) => {
                return Some(self.failed(host, issuer, &format!("order lease: {e}"), None));
            }
        }
        let _guard = OrderGuard {
            store: &store,
            challenges: &acme.challenges,
            host,
            owner: &self.owner,
        };
        // A replica may have renewed while this one waited for the lease.
        let forced = acme.status().get(host).is_some_and(|s| s.forced);
        let now = unix_now();
        if let Some(stored) = stored_certificate(certs_dir, host) {
            if !forced && stored.not_after > now && renewal_time(host, &stored, issuer) > now {
                acme.update(host, |s| s.state = "valid");
                return None;
            }
        }
        acme.update(host, |s| {
            s.state = "renewing";
            s.forced = false;
        });
        info!("ACME {host}: ordering a certificate from `{}`", issuer.name);
        let result = tokio::time::timeout(
            ORDER_TIMEOUT,
            self.obtain(host, issuer, &store, accounts, replaces),
        )
        .await
        .unwrap_or_else(|_| {
            Err(order::Failure {
                message: format!("the order took longer than {ORDER_TIMEOUT:?}"),
                retry_after: None,
            })
        });
        let outcome = match result {
            Ok(issued) => {
                match store.save_certificate(host, &issued.chain_pem, &issued.key_pem, &issued.meta)
                {
                    Ok(()) => {
                        store.remove_pending_order(host);
                        Ok(issued.meta)
                    }
                    Err(e) => Err((format!("storing the certificate: {e}"), None)),
                }
            }
            Err(failure) => {
                // A later attempt builds the client and account afresh (the CA may have been
                // replaced, the account deleted).
                accounts.remove(&issuer.name);
                Err((failure.message, failure.retry_after))
            }
        };
        match outcome {
            Ok(meta) => {
                self.live.metrics.record_acme_order(&issuer.name, true);
                info!(
                    "ACME {host}: certificate issued by `{}` (serial {}, valid until {})",
                    issuer.name,
                    meta.serial,
                    chrono::DateTime::from_timestamp(meta.not_after, 0)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default()
                );
                // Served first, then reported: `valid` in the status means handshakes use it.
                self.reload(&format!("ACME certificate for {host}")).await;
                acme.update(host, |s| {
                    s.state = "valid";
                    s.failures = 0;
                    s.retry_at = None;
                    s.last_error = None;
                    s.not_after = Some(meta.not_after);
                });
                // A certificate due again at once (renewBefore longer than the CA's lifetime)
                // must not turn into an order loop.
                let stored = Stored {
                    not_before: meta.not_before,
                    not_after: meta.not_after,
                    id: None,
                };
                if renewal_time(host, &stored, issuer) <= unix_now() {
                    warn!(
                        "ACME {host}: renewBefore of issuer `{}` is longer than the lifetime it \
                         issues; next renewal in {:?}",
                        issuer.name, issuer.max_retry_interval
                    );
                    let wait =
                        i64::try_from(issuer.max_retry_interval.as_secs()).unwrap_or(MAX_SLEEP);
                    let at = unix_now().saturating_add(wait);
                    acme.update(host, |s| s.retry_at = Some(at));
                    return Some(at);
                }
                None
            }
            Err((message, retry_after)) => Some(self.failed(host, issuer, &message, retry_after)),
        }
    }

    async fn obtain(
        &self,
        host: &str,
        issuer: &AcmeIssuer,
        store: &Store,
        accounts: &mut Accounts,
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<order::Issued, order::Failure> {
        let (http, account) = self.account(issuer, store, accounts).await?;
        order::obtain(
            host,
            issuer,
            &account,
            &http,
            store,
            &self.live.acme.challenges,
            replaces,
        )
        .await
    }

    /// The issuer's client and account: cached, else restored from storage or registered.
    async fn account(
        &self,
        issuer: &AcmeIssuer,
        store: &Store,
        accounts: &mut Accounts,
    ) -> Result<(order::AcmeHttp, instant_acme::Account), order::Failure> {
        let cached = accounts
            .get(&issuer.name)
            .filter(|(settings, _, _)| settings == issuer)
            .map(|(_, http, account)| (http.clone(), account.clone()));
        let (http, account) = match cached {
            Some(cached) => cached,
            None => {
                let http = order::AcmeHttp::new(issuer).map_err(|message| order::Failure {
                    message,
                    retry_after: None,
                })?;
                let account = order::account(store, issuer, &http).await?;
                accounts.insert(
                    issuer.name.clone(),
                    (issuer.clone(), http.clone(), account.clone()),
                );
                (http, account)
            }
        };
        Ok((http, account))
    }

    /// Records a failed order and returns when to try again.
    fn failed(
        &self,
        host: &str,
        issuer: &AcmeIssuer,
        message: &str,
        retry_after: Option<Duration>,
    ) -> i64 {
        self.live.metrics.record_acme_order(&issuer.name, false);
        let failures = self
            .live
            .acme
            .status()
            .get(host)
            .map_or(1, |s| s.failures + 1);
        let wait = backoff(issuer, failures).max(retry_after.unwrap_or_default());
        let at =
            unix_now().saturating_add(i64::try_from(wait.as_secs().max(1)).unwrap_or(MAX_SLEEP));
        warn!(
            "ACME {host}: order from `{}` failed (attempt {failures}): {message}; retrying in {}s",
            issuer.name,
            wait.as_secs().max(1)
        );
        self.live.acme.update(host, |s| {
            s.state = "retrying";
            s.failures = failures;
            s.retry_at = Some(at);
            s.last_error = Some(message.to_string());
        });
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::model::{AcmeChallenge, AcmeKeyType};

    fn issuer(renew_before: Option<Duration>) -> AcmeIssuer {
        AcmeIssuer {
            name: "le".into(),
            directory_url: "https://acme.test/dir".into(),
            email: None,
            ca_bundle: None,
            challenge: AcmeChallenge::Http01,
            eab: None,
            renew_before,
            key_type: AcmeKeyType::EcdsaP256,
            min_retry_interval: Duration::from_secs(60),
            max_retry_interval: Duration::from_secs(6 * 3600),
        }
    }

    #[test]
    fn renews_with_a_third_of_the_lifetime_left_unless_told_otherwise() {
        let day = 86_400;
        let stored = Stored {
            not_before: 0,
            not_after: 90 * day,
            id: None,
        };
        let at = renewal_time("a.test", &stored, &issuer(None));
        assert!((60 * day - 3600..=60 * day).contains(&at), "{at}");
        let at = renewal_time(
            "a.test",
            &stored,
            &issuer(Some(Duration::from_secs(7 * 86_400))),
        );
        assert!((83 * day - 3600..=83 * day).contains(&at), "{at}");
        // Fixed per certificate: the same answer every time.
        assert_eq!(
            at,
            renewal_time(
                "a.test",
                &stored,
                &issuer(Some(Duration::from_secs(7 * 86_400)))
            )
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let issuer = issuer(None);
        let secs = |n| backoff(&issuer, n).as_secs_f64();
        assert!((54.0..=66.0).contains(&secs(1)));
        assert!((108.0..=132.0).contains(&secs(2)));
        assert!((216.0..=264.0).contains(&secs(3)));
        assert!(secs(40) <= 6.0 * 3600.0 * 1.1);
        assert!(secs(40) >= 6.0 * 3600.0 * 0.9);
    }
}
