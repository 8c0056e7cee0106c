//! DNS endpoints, resolved off the request path.
//!
//! A background task resolves every host name the current snapshot names, every
//! `dnsRefreshRate`, and publishes the results in one map swapped atomically. Requests only read the
//! map. A failed lookup keeps the previous addresses (a DNS hiccup must not empty a cluster).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{debug, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::state::Live;

/// Host name → addresses, IPv4 first-and-only when there is any (Envoy's `V4_PREFERRED`): a name like
/// `localhost` must not send half the requests to `::1` where the backend may not listen.
#[derive(Debug, Default)]
pub struct DnsCache {
    resolved: ArcSwap<HashMap<String, Arc<[IpAddr]>>>,
}

impl DnsCache {
    pub fn addresses(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        self.resolved.load().get(name).cloned()
    }

    /// Resolves `names` and publishes the result. Names that fail keep their previous addresses.
    pub async fn refresh(&self, names: &[String]) {
        let previous = self.resolved.load_full();
        let mut next = HashMap::with_capacity(names.len());
        for (name, result) in resolve_all(names).await {
            match result {
                Ok(addrs) if !addrs.is_empty() => {
                    next.insert(name, addrs);
                }
                result => {
                    let reason = match result {
                        Err(e) => e.to_string(),
                        Ok(_) => "no addresses".to_string(),
                    };
                    match previous.get(&name) {
                        Some(old) => {
                            warn!("DNS lookup of {name} failed ({reason}); keeping {} previous address(es)", old.len());
                            next.insert(name, old.clone());
                        }
                        None => warn!("DNS lookup of {name} failed ({reason}); its endpoints get 503 until it resolves"),
                    }
                }
            }
        }
        self.resolved.store(Arc::new(next));
    }
}

impl DnsCache {
    /// Resolves only the names that have no addresses yet (after a reload added them).
    pub async fn refresh_missing(&self, names: &[String]) {
        let missing: Vec<String> = {
            let resolved = self.resolved.load();
            names
                .iter()
                .filter(|n| !resolved.contains_key(*n))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let found: Vec<(String, Arc<[IpAddr]>)> = resolve_all(&missing)
            .await
            .into_iter()
            .filter_map(|(name, result)| result.ok().filter(|a| !a.is_empty()).map(|a| (name, a)))
            .collect();
        self.resolved.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.extend(found.iter().cloned());
            next
        });
    }
}

/// Resolves names concurrently (at most 32 at a time), so a few dead names cost one timeout, not one
/// each.
async fn resolve_all(names: &[String]) -> Vec<(String, std::io::Result<Arc<[IpAddr]>>)> {
    let mut results = Vec::with_capacity(names.len());
    for chunk in names.chunks(32) {
        let mut tasks = tokio::task::JoinSet::new();
        for name in chunk {
            let name = name.clone();
            tasks.spawn(async move {
                let result = resolve(&name).await;
                (name, result)
            });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(pair) = done {
                results.push(pair);
            }
        }
    }
    results
}

async fn resolve(name: &str) -> std::io::Result<Arc<[IpAddr]>> {
    let lookup = tokio::net::lookup_host((name, 0));
    let addrs: Vec<IpAddr> = tokio::time::timeout(Duration::from_secs(5), lookup)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??
        .map(|a| a.ip())
        .collect();
    let v4: Vec<IpAddr> = addrs.iter().copied().filter(IpAddr::is_ipv4).collect();
    let mut chosen = if v4.is_empty() { addrs } else { v4 };
    chosen.sort();
    chosen.dedup();
    Ok(chosen.into())
}

/// Re-resolves the current generation's DNS names every `dnsRefreshRate`.
pub struct DnsRefresher {
    pub live: Arc<Live>,
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let generation = self.live.current();
            let every = generation.snapshot.settings.dns_refresh;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let names = self.live.current().snapshot.dns_names().to_vec();
            debug!("refreshing {} DNS name(s)", names.len());
            self.live.dns.refresh(&names).await;
        }
    }
}
