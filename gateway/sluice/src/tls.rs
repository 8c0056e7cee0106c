//! TLS at the edge: certificates, one rustls configuration per terminating Gateway server, reading
//! the ClientHello before deciding, and the verified client identity.
//!
//! Built for each config generation ([`TlsListeners::build`]) from the compiled snapshot: a reload,
//! including one triggered by a certificate file changing, loads every certificate again and
//! swaps them in with the rest of the config. A certificate that does not parse, has expired, or
//! does not match its key fails that reload, so the previous certificate keeps serving. ACME hosts
//! are the exception: Sluice renews those itself, so one without a usable certificate is refused
//! (and ordered again) while the other hosts load.

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::tls::Acceptor;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::CaType;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::IO;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig, SupportedCipherSuite};
use sluice_core::model::{Credential, ServerTls, TlsMode, TlsVersion, UpstreamTls};
use sluice_core::snapshot::{Snapshot, TlsServer};

use crate::metrics::HandshakeFailure;

/// The TLS material of one config generation: acceptors per listener port (aligned with the
/// snapshot's `TlsTable::servers`) and, per cluster, how to originate TLS to it.
pub struct TlsListeners {
    by_port: HashMap<u16, Vec<Arc<Acceptor>>>,
    refuse: Arc<Acceptor>,
    upstream: Vec<Option<Arc<Origination>>>,
    /// `(host, port, not-after as Unix seconds)` of each terminating server's leaf certificate.
    pub certificate_expiry: Vec<CertificateExpiry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateExpiry {
    pub host: String,
    pub port: u16,
    pub not_after: i64,
}

/// `DestinationRule.trafficPolicy.tls`, loaded: what the connector needs for one cluster.
pub struct Origination {
    pub sni: String,
    pub verify: bool,
    /// `caCertificates`; `None`: the system roots.
    pub ca: Option<Arc<CaType>>,
    /// MUTUAL: the client certificate chain and key.
    pub client: Option<Arc<CertKey>>,
}

impl std::fmt::Debug for TlsListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListeners")
            .field("ports", &self.by_port.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TlsListeners {
    /// Loads every certificate the snapshot's TLS servers name. Errors read
    /// `file:line:col: message`, at the server's `tls` block.
    pub fn build(snapshot: &Snapshot) -> Result<Self, Vec<String>> {
        let certs_dir = &snapshot.settings.certs_dir;
        let mut by_port = HashMap::new();
        let mut errors = Vec::new();
        let acme_hosts = crate::acme::managed_hosts(snapshot);
        for listener in snapshot.listeners() {
            for server in &listener.tls.servers {
                if let Some(Credential::Name(name)) = &server.tls.credential {
                    if acme_hosts.contains_key(name) {
                        errors.push(format!(
                            "{}: {}: credentialName `{name}` names the files Sluice writes for the \
                             ACME host {name} (certsDir/{name}.crt): rename the credential",
                            server.tls.written, server.label
                        ));
                    }
                }
            }
        }
        let mut certificate_expiry = Vec::new();
        for listener in snapshot.listeners() {
            let mut acceptors = Vec::new();
            for server in &listener.tls.servers {
                match server_config(server, certs_dir) {
                    Ok((config, expiry)) => {
                        certificate_expiry.extend(expiry.into_iter().map(|(host, not_after)| {
                            CertificateExpiry {
                                host,
                                port: listener.spec.port,
                                not_after,
                            }
                        }));
                        acceptors.push(Arc::new(Acceptor::from_server_config(Arc::new(config))))
                    }
                    Err(e) => errors.push(format!("{}: {}: {e}", server.tls.written, server.label)),
                }
            }
            if !acceptors.is_empty() {
                by_port.insert(listener.spec.port, acceptors);
            }
        }
        let mut upstream = Vec::new();
        for cluster in snapshot.clusters() {
            let origination = match &cluster.tls {
                Some(tls) => match origination(tls, &cluster.key.host) {
                    Ok(o) => Some(Arc::new(o)),
                    Err(e) => {
                        errors.push(format!(
                            "DestinationRule for `{}`: trafficPolicy.tls: {e}",
                            cluster.key
                        ));
                        None
                    }
                },
                None => None,
            };
            upstream.push(origination);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            by_port,
            refuse: Arc::new(Acceptor::from_server_config(Arc::new(refusing_config()))),
            upstream,
            certificate_expiry,
        })
    }

    /// How to speak TLS to the cluster at `index`, if its DestinationRule says so.
    pub fn origination(&self, cluster: usize) -> Option<&Arc<Origination>> {
        self.upstream.get(cluster)?.as_ref()
    }

    pub fn acceptor(&self, port: u16, server: usize) -> Option<&Arc<Acceptor>> {
        self.by_port.get(&port)?.get(server)
    }

    /// Answers any handshake with an alert: for names no server is configured for.
    pub fn refuse(&self) -> &Arc<Acceptor> {
        &self.refuse
    }
}

/// Loads what TLS origination to one cluster needs. Every certificate is parsed here first: Pingora's
/// connector assumes valid input and would panic on the request path otherwise.
fn origination(tls: &UpstreamTls, host: &str) -> Result<Origination, String> {
    let ca = match &tls.ca_certificates {
        Some(path) => {
            let mut wrapped = Vec::new();
            for der in read_certificates(path)? {
                x509_parser::parse_x509_certificate(der.as_ref())
                    .map_err(|e| format!("{} holds an invalid certificate: {e}", path.display()))?;
                wrapped.push(WrappedX509::new(der.as_ref().to_vec(), parse_x509));
            }
            Some(Arc::from(wrapped.into_boxed_slice()))
        }
        None => None,
    };
    let client = match &tls.client_certificate {
        Some((cert, key)) => {
            let path = key;
            let (certified, key, _) = load_key_pair(cert, key)?;
            let key_der = key.secret_der().to_vec();
            // Pingora's connector turns these bytes back into a key with this same conversion and
            // unwraps it per connection: check it here, where a failure is a config error.
            PrivateKeyDer::try_from(key_der.clone())
                .map_err(|e| format!("private key {} is not usable: {e}", path.display()))?;
            let chain: Vec<Vec<u8>> = certified.cert.iter().map(|c| c.as_ref().to_vec()).collect();
            Some(Arc::new(CertKey::new(chain, key_der)))
        }
        None => None,
    };
    Ok(Origination {
        sni: tls.sni.clone().unwrap_or_else(|| host.to_string()),
        verify: !tls.insecure_skip_verify,
        ca,
        client,
    })
}

/// Files a terminating server reads, for the watcher.
pub fn credential_files(server: &TlsServer, certs_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(Credential::Acme(_)) = &server.tls.credential {
        for host in crate::acme::server_hosts(server) {
            let (cert, key) = crate::acme::store::certificate_paths(certs_dir, host);
            files.extend([cert, key]);
        }
    } else if let Some(credential) = &server.tls.credential {
        let (cert, key) = credential_paths(credential, certs_dir);
        files.extend([cert, key]);
    }
    files.extend(server.tls.ca_certificates.clone());
    files
}

/// `credentialName: NAME` → `certsDir/NAME.crt` + `.key` if present, else the Kubernetes-secret
/// layout `certsDir/NAME/tls.crt` + `tls.key`.
fn credential_paths(credential: &Credential, certs_dir: &Path) -> (PathBuf, PathBuf) {
    match credential {
        Credential::Files {
            certificate,
            private_key,
        } => (certificate.clone(), private_key.clone()),
        Credential::Acme(_) => (PathBuf::new(), PathBuf::new()),
        Credential::Name(name) => {
            let flat = (
                certs_dir.join(format!("{name}.crt")),
                certs_dir.join(format!("{name}.key")),
            );
            if flat.0.exists() {
                flat
            } else {
                let dir = certs_dir.join(name);
                (dir.join("tls.crt"), dir.join("tls.key"))
            }
        }
    }
}

/// The CA bundle that verifies client certificates: `caCertificates`, else beside the credential
/// (`NAME-cacert.crt`, or `NAME/ca.crt` in the secret layout, as Istio stores them).
fn client_ca_path(tls: &ServerTls, certs_dir: &Path) -> Option<PathBuf> {
    if let Some(ca) = &tls.ca_certificates {
        return Some(ca.clone());
    }
    match &tls.credential {
        Some(Credential::Name(name)) => {
            let flat = certs_dir.join(format!("{name}-cacert.crt"));
            Some(if flat.exists() {
                flat
            } else {
                certs_dir.join(name).join("ca.crt")
            })
        }
        _ => None,
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificate file {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Reads a certificate chain and its key, and checks that they belong together and that the leaf
/// is valid now. Returns the key's DER too (the upstream connector needs it) and the leaf's
/// not-after time as Unix seconds.
pub(crate) fn load_key_pair(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(CertifiedKey, PrivateKeyDer<'static>, i64), String> {
    let chain = read_certificates(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("cannot read private key {}: {e}", key_path.display()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key in {}: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        format!(
            "certificate {} does not match private key {} ({e})",
            cert_path.display(),
            key_path.display()
        )
    })?;
    let not_after = match certified.cert.first() {
        Some(leaf) => check_validity(leaf, cert_path)?,
        None => return Err(format!("{} holds no certificate", cert_path.display())),
    };
    Ok((certified, key, not_after))
}

/// The rustls client settings for Sluice's own HTTPS calls (ACME, span export): trusting the CAs
/// in `ca_bundle`, else the Mozilla roots (so an image needs no system CA store).
pub fn client_config(ca_bundle: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_bundle {
        Some(path) => {
            for cert in read_certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| format!("TLS client settings: {e}"))
}

/// How far in the future a certificate's not-before may be: clocks differ a little between a CA
/// and this machine (Let's Encrypt backdates by an hour; Pebble does not).
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Checks the leaf is valid now; returns its not-after time as Unix seconds.
fn check_validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("{} is not a valid X.509 certificate: {e}", path.display()))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(format!(
            "certificate {} expired on {}",
            path.display(),
            validity.not_after
        ));
    }
    let skew =
        x509_parser::time::ASN1Time::from_timestamp(now.timestamp() + CLOCK_SKEW.as_secs() as i64)
            .unwrap_or(now);
    if validity.not_before > skew {
        return Err(format!(
            "certificate {} is not valid before {}",
            path.display(),
            validity.not_before
        ));
    }
    Ok(validity.not_after.timestamp())
}

/// The crypto provider with the TLS 1.2 suites a server allows (TLS 1.3 suites are fixed).
fn provider_for(suites: &[String]) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    if !suites.is_empty() {
        provider.cipher_suites.retain(|suite| match suite {
            SupportedCipherSuite::Tls13(_) => true,
            SupportedCipherSuite::Tls12(_) => suites
                .iter()
                .any(|name| openssl_name(*suite) == Some(name.as_str())),
        });
    }
    provider
}

/// The OpenSSL name (as in Istio's `cipherSuites`) of a rustls TLS 1.2 suite.
fn openssl_name(suite: SupportedCipherSuite) -> Option<&'static str> {
    use rustls::CipherSuite::*;
    Some(match suite.suite() {
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        _ => return None,
    })
}

/// Always the same certificate: one server, one credential. SNI was already used to pick the server.
#[derive(Debug)]
pub(crate) struct OneCertificate(pub(crate) Arc<CertifiedKey>);

/// A certificate per host name (ACME issues one per host). A name without one yet is refused.
#[derive(Debug)]
struct ByServerName(HashMap<String, Arc<CertifiedKey>>);

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.get(&name).cloned()
    }
}

impl ResolvesServerCert for OneCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// No certificate for anyone: rustls then aborts the handshake with an alert.
#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// The certificates of an ACME server's hosts, from `certsDir/HOST.crt` + `.key`. A host without a
/// usable certificate (not issued yet, expired, damaged) is left out rather than failing the
/// reload: the ACME manager obtains a new one, and the other hosts keep serving meanwhile.
fn acme_certificates(server: &TlsServer, certs_dir: &Path) -> (ByServerName, Vec<(String, i64)>) {
    let mut certificates = HashMap::new();
    let mut expiry = Vec::new();
    for host in crate::acme::server_hosts(server) {
        let (cert, key) = crate::acme::store::certificate_paths(certs_dir, host);
        if !cert.exists() {
            log::info!(
                "{}: no certificate for {host} yet (ACME); refusing it until one is issued",
                server.label
            );
            continue;
        }
        // The ACME service replaces the key, then the certificate: a reload between the two
        // renames sees a mismatched pair, which one more look a moment later resolves.
        let loaded = load_key_pair(&cert, &key).or_else(|_| {
            std::thread::sleep(Duration::from_millis(200));
            load_key_pair(&cert, &key)
        });
        match loaded {
            Ok((certified, _, not_after)) => {
                certificates.insert(host.to_string(), Arc::new(certified));
                expiry.push((host.to_string(), not_after));
            }
            Err(e) => log::warn!(
                "{}: ACME certificate for {host} not used: {e}",
                server.label
            ),
        }
    }
    (ByServerName(certificates), expiry)
}

/// The rustls configuration of one terminating server, and the not-after time of each host's
/// certificate.
fn server_config(
    server: &TlsServer,
    certs_dir: &Path,
) -> Result<(ServerConfig, Vec<(String, i64)>), String> {
    let tls = &server.tls;
    let credential = tls
        .credential
        .as_ref()
        .ok_or_else(|| "a terminating server has no credential".to_string())?;
    let (resolver, expiry): (Arc<dyn ResolvesServerCert>, _) = match credential {
        Credential::Acme(_) => {
            let (certificates, expiry) = acme_certificates(server, certs_dir);
            (Arc::new(certificates), expiry)
        }
        _ => {
            let (cert_path, key_path) = credential_paths(credential, certs_dir);
            let (certified, _, not_after) = load_key_pair(&cert_path, &key_path)?;
            let expiry = server
                .hosts
                .iter()
                .map(|h| (h.clone(), not_after))
                .collect();
            (Arc::new(OneCertificate(Arc::new(certified))), expiry)
        }
    };
    let provider = Arc::new(provider_for(&tls.cipher_suites));
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::Tls12, &rustls::version::TLS12),
        (TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (tls.min_version..=tls.max_version).contains(v))
    .map(|(_, version)| version)
    .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match tls.mode {
        TlsMode::Mutual | TlsMode::OptionalMutual => {
            let ca_path = client_ca_path(tls, certs_dir)
                .ok_or_else(|| "MUTUAL needs a CA to verify clients".to_string())?;
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(&ca_path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", ca_path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.mode == TlsMode::OptionalMutual {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("client verifier from {}: {e}", ca_path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        TlsMode::Simple | TlsMode::Passthrough => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, expiry))
}

fn refusing_config() -> ServerConfig {
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map(|b| {
            b.with_no_client_auth()
                .with_cert_resolver(Arc::new(NoCertificate))
        })
        // The default provider supports the default versions; this cannot fail.
        .unwrap_or_else(|_| {
            ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(NoCertificate))
        })
}

/// Largest ClientHello Sluice reads before deciding (several records; post-quantum key shares make
/// them bigger than they used to be).
const MAX_CLIENT_HELLO: usize = 32 * 1024;
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CLIENT_HELLO_RECORDS: usize = 8;

/// What Sluice needs from a ClientHello to decide what to do with the connection.
#[derive(Debug, Default)]
pub struct Hello {
    /// SNI, lower-case.
    pub server_name: Option<String>,
    /// The client offers only `acme-tls/1`: a CA validating a TLS-ALPN-01 challenge.
    pub acme_validation: bool,
}

/// Reads the ClientHello without consuming it, so the connection can be terminated with the right
/// server's settings or passed through untouched.
pub async fn peek_client_hello(stream: &mut dyn IO) -> Result<Hello, (HandshakeFailure, String)> {
    tokio::time::timeout(CLIENT_HELLO_TIMEOUT, peek_inner(stream))
        .await
        .map_err(|_| {
            (
                HandshakeFailure::Timeout,
                "no ClientHello within 10 s".to_string(),
            )
        })?
}

async fn peek_inner(stream: &mut dyn IO) -> Result<Hello, (HandshakeFailure, String)> {
    let malformed = |message: String| (HandshakeFailure::MalformedClientHello, message);
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = 0usize;
    // A ClientHello fits in one record or a few; refusing more keeps re-peeking bounded.
    for _record in 0..MAX_CLIENT_HELLO_RECORDS {
        let mut header = vec![0u8; seen + 5];
        peek(stream, &mut header).await?;
        let record = &header[seen..];
        if record[0] != 0x16 {
            return Err(malformed(
                "not a TLS handshake (plaintext on a TLS port?)".into(),
            ));
        }
        let length = usize::from(u16::from_be_bytes([record[3], record[4]]));
        let total = seen + 5 + length;
        if total > MAX_CLIENT_HELLO {
            return Err(malformed("ClientHello too large".into()));
        }
        let mut bytes = vec![0u8; total];
        peek(stream, &mut bytes).await?;
        // rustls takes at most 4 KiB per call: feed it until the record is used up.
        let mut unread = &bytes[seen..];
        while !unread.is_empty() {
            let read = acceptor
                .read_tls(&mut unread)
                .map_err(|e| malformed(format!("reading ClientHello: {e}")))?;
            if read == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let acme_validation = hello.alpn().is_some_and(|protocols| {
                    let offered: Vec<&[u8]> = protocols.collect();
                    !offered.is_empty() && offered.iter().all(|p| *p == crate::acme::ACME_TLS_ALPN)
                });
                return Ok(Hello {
                    server_name: hello.server_name().map(str::to_ascii_lowercase),
                    acme_validation,
                });
            }
            Ok(None) => seen = total,
            Err((e, _)) => return Err(malformed(format!("invalid ClientHello: {e}"))),
        }
    }
    Err(malformed("ClientHello spread over too many records".into()))
}

async fn peek(stream: &mut dyn IO, buf: &mut [u8]) -> Result<(), (HandshakeFailure, String)> {
    match stream.try_peek(buf).await {
        Ok(true) => Ok(()),
        Ok(false) => Err((
            HandshakeFailure::MalformedClientHello,
            "this stream cannot be peeked".into(),
        )),
        // Also what an L4 balancer's TCP health check looks like: connect, then close.
        Err(e) => Err((
            HandshakeFailure::ClosedBeforeClientHello,
            format!("connection closed during ClientHello: {e}"),
        )),
    }
}

/// What a terminated TLS connection was accepted as: the Gateway server whose settings the
/// handshake used, and the verified client certificate, if any. Every request on the connection is
/// checked against it, so a client cannot present one name in SNI and reach another server's routes
/// (with a weaker client-certificate policy) through the Host header.
#[derive(Debug, Clone)]
pub struct TlsSession {
    pub server: Arc<str>,
    pub identity: Option<ClientIdentity>,
}

/// The verified client certificate of a connection, as Envoy writes `x-forwarded-client-cert`.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub xfcc: String,
}

impl ClientIdentity {
    fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let hash = ring::digest::digest(&ring::digest::SHA256, der);
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let subject = xfcc_value(&cert.subject().to_string(), true);
        let mut xfcc = format!("Hash={hex};Subject={subject}");
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(uri) => {
                        xfcc.push_str(&format!(";URI={}", xfcc_value(uri, false)))
                    }
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        xfcc.push_str(&format!(";DNS={}", xfcc_value(dns, false)))
                    }
                    _ => {}
                }
            }
        }
        Some(Self { xfcc })
    }
}

/// A value in `x-forwarded-client-cert`, as Envoy writes it: quoted when it contains a separator
/// (`,` `;` `=`) or a quote, with `"` and `\` escaped; control characters dropped. A crafted
/// certificate (a URI containing `;DNS=admin`, say) therefore cannot add fields or break the header.
fn xfcc_value(value: &str, always_quote: bool) -> String {
    let clean: String = value.chars().filter(|c| !c.is_control()).collect();
    if !always_quote && !clean.contains([',', ';', '=', '"', '\\']) {
        return clean;
    }
    let mut out = String::with_capacity(clean.len() + 2);
    out.push('"');
    for c in clean.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Records, once the handshake is done, which server accepted the connection and the client
/// certificate's identity.
pub struct SessionCallback {
    pub server: Arc<str>,
}

#[async_trait]
impl TlsAccept for SessionCallback {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let identity = tls
            .peer_certificate_der()
            .and_then(ClientIdentity::from_der);
        Some(Arc::new(TlsSession {
            server: self.server.clone(),
            identity,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::xfcc_value;

    #[test]
    fn xfcc_values_cannot_add_fields() {
        assert_eq!(xfcc_value("spiffe://a/b", false), "spiffe://a/b");
        assert_eq!(
            xfcc_value("spiffe://a;DNS=admin", false),
            "\"spiffe://a;DNS=admin\""
        );
        assert_eq!(xfcc_value("CN=x\",O=\\y", true), "\"CN=x\\\",O=\\\\y\"");
        assert_eq!(xfcc_value("a\r\nb", false), "ab");
    }
}
