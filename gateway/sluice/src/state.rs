//! The live configuration: the current compiled snapshot behind one `ArcSwap`.
//!
//! Requests `load` it once and keep that generation to the end; a reload builds a whole new
//! [`Generation`] off the request path and swaps it in atomically.

use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice_core::snapshot::Snapshot;

use crate::dns::DnsCache;

/// One applied config.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    pub snapshot: Snapshot,
}

/// Shared by every listener and background task: the current generation and the state that
/// survives reloads because it is keyed by stable identity (DNS results by host name).
#[derive(Debug)]
pub struct Live {
    current: ArcSwap<Generation>,
    pub dns: DnsCache,
}

impl Live {
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(Generation {
                number: 1,
                snapshot,
            }),
            dns: DnsCache::default(),
        })
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Applies a new snapshot as the next generation and returns its number.
    pub fn apply(&self, snapshot: Snapshot) -> u64 {
        let number = self.current.load().number + 1;
        self.current
            .store(Arc::new(Generation { number, snapshot }));
        number
    }
}
