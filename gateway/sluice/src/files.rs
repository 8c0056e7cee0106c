//! Writing files other processes read while Sluice writes them (replicas sharing a directory,
//! the certificate watcher, a restarted Sluice): always whole, never half.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What to do when the target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfExists {
    Replace,
    /// Leave it (another process created it first): `write_whole` returns `Ok(false)`.
    Keep,
}

/// Writes `bytes` to a temporary file with `mode`, syncs it, and moves it to `path` in one step
/// (rename, or a hard link when an existing file must be kept). Readers see the old file or the new
/// one. Returns whether `path` now holds `bytes`.
pub fn write_whole(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    if_exists: IfExists,
) -> std::io::Result<bool> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!(
        "tmp.{}.{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let placed = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        match if_exists {
            IfExists::Replace => std::fs::rename(&tmp, path).map(|()| true),
            IfExists::Keep => match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            },
        }
    })();
    // After a rename this is already gone; after a link (or a failure) it is left over.
    let _ = std::fs::remove_file(&tmp);
    // The rename itself is durable only once the directory is synced.
    if let (Ok(true), Some(dir)) = (&placed, dir) {
        if let Ok(handle) = std::fs::File::open(dir) {
            let _ = handle.sync_all();
        }
    }
    placed
}
