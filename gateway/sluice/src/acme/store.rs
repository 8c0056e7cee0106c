//! What ACME keeps on disk, all under `certsDir`: the certificates themselves
//! (`HOST.crt` + `HOST.key`, where the TLS loader and the watcher find them) and, under `acme/`,
//! account keys, orders in flight, their metadata, challenge answers and the per-host lock that
//! lets replicas sharing the directory order each certificate once.
//!
//! Every file is written to a temporary name and renamed into place, so a reader (this process, a
//! replica, the watcher) sees the old file or the new one, never half of one. Secrets are 0600.

use std::io::Write;

use crate::files::{write_whole, IfExists};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where the certificate and key of an ACME-managed host live.
pub fn certificate_paths(certs_dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    (
        certs_dir.join(format!("{host}.crt")),
        certs_dir.join(format!("{host}.key")),
    )
}

/// Host names and challenge tokens become file names: only these characters may.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Replaces `path` with `bytes`, whole (see [`crate::files::write_whole`]).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_whole(path, bytes, mode, IfExists::Replace).map(|_| ())
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The account of one issuer, as the ACME server knows it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredAccount {
    pub directory_url: String,
    pub credentials: instant_acme::AccountCredentials,
}

/// An order placed but not finished. Its key cannot be fetched again, and the order URL is how a
/// restarted process picks the same order up instead of placing another.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingOrder {
    pub issuer: String,
    pub order_url: String,
    pub key_pem: String,
}

/// Next to each issued certificate, for operators and for the status page.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct CertificateMeta {
    pub issuer: String,
    pub directory_url: String,
    pub not_before: i64,
    pub not_after: i64,
    pub serial: String,
    pub issued_at: i64,
}

/// The lease a replica holds while it orders a host's certificate.
#[derive(Serialize, Deserialize)]
struct LockLease {
    owner: String,
    expires_at: i64,
}

pub enum Lock {
    Acquired,
    /// Another replica is ordering; its lease ends at this Unix time.
    HeldBy(String, i64),
}

pub struct Store {
    certs_dir: PathBuf,
}

impl Store {
    pub fn new(certs_dir: &Path) -> Self {
        Self {
            certs_dir: certs_dir.to_path_buf(),
        }
    }

    fn acme_dir(&self) -> PathBuf {
        self.certs_dir.join("acme")
    }

    fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is damaged: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
        write_atomically(path, &bytes, mode)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    fn account_path(&self, issuer: &str) -> PathBuf {
        self.acme_dir()
            .join("accounts")
            .join(format!("{issuer}.json"))
    }

    pub fn account(&self, issuer: &str) -> Result<Option<StoredAccount>, String> {
        Self::read_json(&self.account_path(issuer))
    }

    /// Stores a newly registered account. Unless `replace` (the stored one is for another
    /// directory), an account a replica stored meanwhile wins: returns false, and the caller uses
    /// that one, so all replicas share one account.
    pub fn save_account(
        &self,
        issuer: &str,
        account: &StoredAccount,
        replace: bool,
    ) -> Result<bool, String> {
        let path = self.account_path(issuer);
        let bytes = serde_json::to_vec_pretty(account).map_err(|e| e.to_string())?;
        let if_exists = if replace {
            IfExists::Replace
        } else {
            IfExists::Keep
        };
        write_whole(&path, &bytes, 0o600, if_exists)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    fn order_path(&self, host: &str) -> PathBuf {
        self.acme_dir().join("orders").join(format!("{host}.json"))
    }

    pub fn pending_order(&self, host: &str) -> Result<Option<PendingOrder>, String> {
        Self::read_json(&self.order_path(host))
    }

    pub fn save_pending_order(&self, host: &str, order: &PendingOrder) -> Result<(), String> {
        Self::write_json(&self.order_path(host), order, 0o600)
    }

    pub fn remove_pending_order(&self, host: &str) {
        let _ = std::fs::remove_file(self.order_path(host));
    }

    fn meta_path(&self, host: &str) -> PathBuf {
        self.acme_dir().join(format!("{host}.json"))
    }

    /// Installs a new certificate: key first, then the chain (the TLS loader pairs them and checks
    /// they match), then the metadata.
    pub fn save_certificate(
        &self,
        host: &str,
        chain_pem: &str,
        key_pem: &str,
        meta: &CertificateMeta,
    ) -> Result<(), String> {
        let (cert_path, key_path) = certificate_paths(&self.certs_dir, host);
        write_atomically(&key_path, key_pem.as_bytes(), 0o600)
            .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
        write_atomically(&cert_path, chain_pem.as_bytes(), 0o644)
            .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
        Self::write_json(&self.meta_path(host), meta, 0o644)
    }

    fn challenge_path(&self, name: &str) -> PathBuf {
        self.acme_dir().join("challenges").join(name)
    }

    /// Challenge answers are shared through the directory, so whichever replica the CA's
    /// validation request reaches can answer it.
    pub fn put_challenge(&self, name: &str, key_authorization: &str) -> Result<(), String> {
        let path = self.challenge_path(name);
        write_atomically(&path, key_authorization.as_bytes(), 0o644)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn remove_challenge(&self, name: &str) {
        let _ = std::fs::remove_file(self.challenge_path(name));
    }

    pub async fn challenge(&self, name: &str) -> Option<String> {
        if !is_safe_file_name(name) {
            return None;
        }
        tokio::fs::read_to_string(self.challenge_path(name))
            .await
            .ok()
    }

    fn lock_path(&self, host: &str) -> PathBuf {
        self.acme_dir().join("locks").join(format!("{host}.lock"))
    }

    /// Takes (or extends) the lease on ordering `host`'s certificate. A lease past its end is
    /// taken over: its owner crashed or hung.
    pub fn lock(&self, host: &str, owner: &str, lease: Duration) -> Result<Lock, String> {
        let path = self.lock_path(host);
        let expires_at = unix_now() + lease.as_secs() as i64;
        let ours = LockLease {
            owner: owner.to_string(),
            expires_at,
        };
        let bytes = serde_json::to_vec(&ours).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        for _ in 0..2 {
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path);
            match created {
                Ok(mut file) => {
                    file.write_all(&bytes)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    return Ok(Lock::Acquired);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
            // A lock being written right now reads as empty: treat it as held for a moment.
            let held_bytes = std::fs::read(&path).unwrap_or_default();
            let held: Option<LockLease> = serde_json::from_slice(&held_bytes).ok();
            match held {
                Some(lease) if lease.owner == owner => {
                    write_atomically(&path, &bytes, 0o644)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    return Ok(Lock::Acquired);
                }
                Some(lease)
                    if lease.expires_at > unix_now() && !owner_is_gone(&lease.owner, owner) =>
                {
                    return Ok(Lock::HeldBy(lease.owner, lease.expires_at))
                }
                None if modified_within(&path, Duration::from_secs(10)) => {
                    return Ok(Lock::HeldBy("(being written)".into(), unix_now() + 10))
                }
                _ => {
                    log::warn!(
                        "ACME lock {} is stale: taking it over (its owner stopped mid-order)",
                        path.display()
                    );
                    self.take_over(&path, &held_bytes)?;
                }
            }
        }
        Ok(Lock::HeldBy("(another replica)".into(), unix_now() + 10))
    }

    /// Moves a stale lease aside, atomically: of two replicas taking it over at once, only one
    /// moves the stale file; the other may move the winner's fresh lease instead, notices by its
    /// content, and puts it back.
    fn take_over(&self, path: &Path, stale: &[u8]) -> Result<(), String> {
        let aside = path.with_extension(format!("stale.{:08x}", fastrand::u32(..)));
        if std::fs::rename(path, &aside).is_err() {
            return Ok(()); // Already moved by the other replica: compete on creating it.
        }
        let moved = std::fs::read(&aside).unwrap_or_default();
        if moved != stale {
            // Not the stale lease: someone's fresh one. Restore it unless another appeared.
            let _ = std::fs::hard_link(&aside, path);
        }
        let _ = std::fs::remove_file(&aside);
        Ok(())
    }

    pub fn unlock(&self, host: &str, owner: &str) {
        let path = self.lock_path(host);
        if let Ok(Some(lease)) = Self::read_json::<LockLease>(&path) {
            if lease.owner == owner {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// A lease held by a process on this machine that no longer runs (a restart) need not be waited
/// out. Owners read `hostname:pid:random`.
fn owner_is_gone(holder: &str, me: &str) -> bool {
    let mut theirs = holder.split(':');
    let mut mine = me.split(':');
    let (Some(their_host), Some(their_pid)) = (theirs.next(), theirs.next()) else {
        return false;
    };
    if Some(their_host) != mine.next() || their_pid.parse::<u32>().is_err() {
        return false;
    }
    !Path::new("/proc").join(their_pid).exists()
}

fn modified_within(path: &Path, within: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < within)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lease_holder_at_a_time() {
        let dir = std::env::temp_dir().join(format!("sluice-lock-{}", fastrand::u64(..)));
        let store = Store::new(&dir);
        let lease = Duration::from_secs(60);
        assert!(matches!(
            store.lock("a.test", "one", lease),
            Ok(Lock::Acquired)
        ));
        assert!(
            matches!(store.lock("a.test", "two", lease), Ok(Lock::HeldBy(owner, _)) if owner == "one")
        );
        assert!(matches!(
            store.lock("a.test", "one", lease),
            Ok(Lock::Acquired)
        ));
        store.unlock("a.test", "two");
        assert!(matches!(
            store.lock("a.test", "two", lease),
            Ok(Lock::HeldBy(..))
        ));
        store.unlock("a.test", "one");
        assert!(matches!(
            store.lock("a.test", "two", lease),
            Ok(Lock::Acquired)
        ));
        // An expired lease is taken over.
        assert!(matches!(
            store.lock("b.test", "one", Duration::ZERO),
            Ok(Lock::Acquired)
        ));
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(
            store.lock("b.test", "two", lease),
            Ok(Lock::Acquired)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn file_names_cannot_leave_the_directory() {
        assert!(is_safe_file_name("shop.example.com"));
        assert!(is_safe_file_name("Xy_z-09"));
        for bad in ["", "../x", "a/b", ".hidden", "a\0b", "a b"] {
            assert!(!is_safe_file_name(bad), "{bad:?}");
        }
    }
}
