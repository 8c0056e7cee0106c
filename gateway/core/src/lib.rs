//! Sluice's core: the pure part of the data flow, with no sockets and no async runtime.
//!
//! ```text
//! YAML ──config::ConfigSet::load_paths──▶ typed documents (with positions)
//!      ──validate::validate──▶ model::Model (or diagnostics with file:line:col)
//!      ──snapshot::Snapshot::compile──▶ immutable routing tables, looked up per request
//! ```
//! The binary crate (`sluice`) swaps snapshots with `ArcSwap` and drives Pingora with them.

pub mod config;
pub mod diag;
mod identity;
pub mod model;
pub mod snapshot;
pub mod source;
pub mod validate;

use std::path::PathBuf;

use config::{ConfigSet, ParseCache};
use diag::Diagnostics;
use model::Model;
use snapshot::{CompileCache, Snapshot};
use validate::ValidateCache;

/// The result of loading and checking a set of config paths.
pub struct Loaded {
    /// `Some` only when there were no errors.
    pub model: Option<Model>,
    /// Every error and warning, in file order.
    pub diagnostics: Diagnostics,
    /// See [`ConfigSet::fingerprint`].
    pub fingerprint: u64,
    pub files: Vec<PathBuf>,
}

impl Loaded {
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.model.as_ref().map(Snapshot::compile)
    }

    /// [`Loaded::snapshot`], reusing what the previous compile with `cache` built.
    pub fn snapshot_cached(&self, cache: &mut LoadCache) -> Option<Snapshot> {
        let model = self.model.as_ref()?;
        Some(Snapshot::compile_cached(model, &mut cache.compiled))
    }
}

/// Load → validate, for config files on disk.
pub fn load_paths(paths: &[PathBuf]) -> Loaded {
    let (set, diagnostics) = ConfigSet::load_paths(paths);
    check(set, diagnostics, &mut ValidateCache::default())
}

/// What a load keeps for the next load of the same config (a reload): the documents it parsed, the
/// VirtualServices it validated and the routes it compiled.
#[derive(Default)]
pub struct LoadCache {
    parsed: ParseCache,
    validated: ValidateCache,
    compiled: CompileCache,
}

impl LoadCache {
    /// The next load reads every file, changed or not.
    pub fn forget_files(&mut self) {
        self.parsed.forget_files();
    }

    /// How many files the last load read, and how many it found unchanged on disk.
    pub fn last_file_reads(&self) -> config::FileReads {
        self.parsed.last_load
    }
}

/// [`load_paths`], parsing and validating only what `cache` does not hold from the previous load:
/// how a reload of a large config stays fast when one document changed.
pub fn load_paths_cached(paths: &[PathBuf], cache: &mut LoadCache) -> Loaded {
    let (set, diagnostics) = ConfigSet::load_paths_cached(paths, &mut cache.parsed);
    check(set, diagnostics, &mut cache.validated)
}

/// Load → validate, for config text that is not on disk (the built-in demo, tests).
pub fn load_str(name: &str, text: &str) -> Loaded {
    let (set, diagnostics) = ConfigSet::load_str(name, text);
    check(set, diagnostics, &mut ValidateCache::default())
}

fn check(set: ConfigSet, mut diagnostics: Diagnostics, validated: &mut ValidateCache) -> Loaded {
    // Cross-reference checks on a set with broken documents would only add confusing follow-on
    // errors (a missing Gateway that merely failed to parse), so they run on clean loads only.
    let model = if diagnostics.has_errors() {
        None
    } else {
        validate::validate_cached(&set, &mut diagnostics, validated)
    };
    Loaded {
        model,
        diagnostics,
        fingerprint: set.fingerprint,
        files: set.files,
    }
}
