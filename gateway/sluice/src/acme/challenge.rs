//! Answers to the CA's validation requests, served by Sluice itself: HTTP-01 at
//! `/.well-known/acme-challenge/<token>` on plaintext ports, TLS-ALPN-01 as a special certificate
//! for handshakes that offer the `acme-tls/1` protocol. Answers are kept in memory and written to
//! `certsDir/acme/challenges/` so a replica that did not place the order can answer too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pingora::listeners::tls::Acceptor;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::store::{is_safe_file_name, Store};

pub const HTTP_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";
/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

fn alpn_file(host: &str) -> String {
    format!("{host}.tls-alpn-01")
}

#[derive(Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization.
    http: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: host → (key authorization, acceptor presenting the validation certificate).
    tls_alpn: Mutex<HashMap<String, (String, Arc<Acceptor>)>>,
    /// TLS-ALPN-01 answers of replicas' orders, read from their files.
    replicas_tls_alpn: Mutex<HashMap<String, (String, Arc<Acceptor>)>>,
    /// Tokens published per host, to withdraw them when the order is done.
    tokens: Mutex<HashMap<String, Vec<String>>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Challenges")
    }
}

impl Challenges {
    pub fn publish_http(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
        store: &Store,
    ) -> Result<(), String> {
        if !is_safe_file_name(token) {
            return Err(format!("the CA sent an unusable token `{token}`"));
        }
        store.put_challenge(token, key_authorization)?;
        if let Ok(mut http) = self.http.lock() {
            http.insert(token.to_string(), key_authorization.to_string());
        }
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens
                .entry(host.to_string())
                .or_default()
                .push(token.to_string());
        }
        Ok(())
    }

    pub fn publish_tls_alpn(
        &self,
        host: &str,
        key_authorization: &str,
        store: &Store,
    ) -> Result<(), String> {
        let acceptor = validation_acceptor(host, key_authorization)?;
        store.put_challenge(&alpn_file(host), key_authorization)?;
        if let Ok(mut map) = self.tls_alpn.lock() {
            map.insert(
                host.to_string(),
                (key_authorization.to_string(), Arc::new(acceptor)),
            );
        }
        Ok(())
    }

    /// Removes every answer published for `host`'s order (memory and files).
    pub fn withdraw(&self, host: &str, store: &Store) {
        let tokens = self
            .tokens
            .lock()
            .ok()
            .and_then(|mut t| t.remove(host))
            .unwrap_or_default();
        if let Ok(mut http) = self.http.lock() {
            for token in &tokens {
                http.remove(token);
            }
        }
        for token in &tokens {
            store.remove_challenge(token);
        }
        if let Ok(mut map) = self.tls_alpn.lock() {
            map.remove(host);
        }
        store.remove_challenge(&alpn_file(host));
    }

    /// The key authorization for an HTTP-01 token, from this process or a replica.
    pub async fn http_answer(&self, certs_dir: &Path, token: &str) -> Option<String> {
        // Tokens are base64url: anything else is not worth a look on disk.
        let token_like = !token.is_empty()
            && token.len() <= 128
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_like {
            return None;
        }
        let local = self.http.lock().ok()?.get(token).cloned();
        match local {
            Some(answer) => Some(answer),
            None => Store::new(certs_dir).challenge(token).await,
        }
    }

    /// The acceptor that answers a TLS-ALPN-01 validation for `host`, if one is under way here or
    /// in a replica.
    pub async fn tls_alpn_acceptor(&self, certs_dir: &Path, host: &str) -> Option<Arc<Acceptor>> {
        if let Some((_, acceptor)) = self.tls_alpn.lock().ok()?.get(host) {
            return Some(acceptor.clone());
        }
        // A replica's order: build the validation certificate once per challenge, not per
        // handshake (the CA validates from several places).
        let key_authorization = Store::new(certs_dir).challenge(&alpn_file(host)).await?;
        let key_authorization = key_authorization.trim().to_string();
        let cached = self.replicas_tls_alpn.lock().ok().and_then(|map| {
            map.get(host)
                .filter(|(known, _)| *known == key_authorization)
                .map(|(_, acceptor)| acceptor.clone())
        });
        if cached.is_some() {
            return cached;
        }
        let acceptor = Arc::new(validation_acceptor(host, &key_authorization).ok()?);
        if let Ok(mut map) = self.replicas_tls_alpn.lock() {
            map.insert(host.to_string(), (key_authorization, acceptor.clone()));
        }
        Some(acceptor)
    }
}

/// A self-signed certificate for `host` carrying the key authorization's digest in the critical
/// acmeIdentifier extension, offered only with ALPN `acme-tls/1` (RFC 8737 section 3).
fn validation_acceptor(host: &str, key_authorization: &str) -> Result<Acceptor, String> {
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| format!("TLS-ALPN-01 certificate for {host}: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("TLS-ALPN-01 key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("TLS-ALPN-01 certificate for {host}: {e}"))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("TLS-ALPN-01 key: {e}"))?;
    let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(crate::tls::OneCertificate(certified)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Acceptor::from_server_config(Arc::new(config)))
}
