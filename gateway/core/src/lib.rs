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
pub mod model;
pub mod snapshot;
pub mod source;
pub mod validate;

use std::path::PathBuf;

use config::{ConfigSet, ParseCache};
use diag::Diagnostics;
use model::Model;
use snapshot::Snapshot;

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
}

/// Load → validate, for config files on disk.
pub fn load_paths(paths: &[PathBuf]) -> Loaded {
    let (set, diagnostics) = ConfigSet::load_paths(paths);
    check(set, diagnostics)
}

/// [`load_paths`], parsing only the documents `cache` does not hold from an earlier load: how a
/// reload of a large config stays fast when one file changed.
pub fn load_paths_cached(paths: &[PathBuf], cache: &mut ParseCache) -> Loaded {
    let (set, diagnostics) = ConfigSet::load_paths_cached(paths, cache);
    check(set, diagnostics)
}

/// Load → validate, for config text that is not on disk (the built-in demo, tests).
pub fn load_str(name: &str, text: &str) -> Loaded {
    let (set, diagnostics) = ConfigSet::load_str(name, text);
    check(set, diagnostics)
}

fn check(set: ConfigSet, mut diagnostics: Diagnostics) -> Loaded {
    // Cross-reference checks on a set with broken documents would only add confusing follow-on
    // errors (a missing Gateway that merely failed to parse), so they run on clean loads only.
    let model = if diagnostics.has_errors() {
        None
    } else {
        validate::validate(&set, &mut diagnostics)
    };
    Loaded {
        model,
        diagnostics,
        fingerprint: set.fingerprint,
        files: set.files,
    }
}
