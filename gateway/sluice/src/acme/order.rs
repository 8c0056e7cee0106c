//! One ACME order, start to finish: account → order → authorizations → challenges → finalize
//! with a CSR → download → check the chain against its key. Resumable: the order URL and the new
//! private key are stored before anything that could leave them unrecoverable, so a process that
//! stops mid-order picks the same order up rather than placing another.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, ExternalAccountKey,
    HttpClient, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sluice_core::model::{AcmeChallenge, AcmeIssuer, AcmeKeyType};

use super::challenge::Challenges;
use super::store::{unix_now, CertificateMeta, PendingOrder, Store, StoredAccount};

/// Why an order failed, and when the CA asked to hear from us again (`Retry-After`).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A certificate ready to be installed.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub meta: CertificateMeta,
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The HTTP client instant-acme talks through. It keeps the last `Retry-After` the CA sent
/// (instant-acme does not report it with errors), so a rate-limited order waits as long as asked.
#[derive(Clone)]
pub struct AcmeHttp {
    client: HyperClient<Connector, BodyWrapper<Bytes>>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl AcmeHttp {
    /// Trusts `issuer.caBundle` when set, else the Mozilla roots (so the image needs no CA store).
    pub fn new(issuer: &AcmeIssuer) -> Result<Self, String> {
        let config = crate::tls::client_config(issuer.ca_bundle.as_deref())
            .map_err(|e| format!("caBundle: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let client = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            retry_after: Arc::new(Mutex::new(None)),
        })
    }

    /// The wait the CA asked for in its most recent answer that carried one, then forgets it.
    pub fn take_retry_after(&self) -> Option<Duration> {
        let at = self.retry_after.lock().ok()?.take()?;
        at.duration_since(SystemTime::now()).ok()
    }
}

/// Request timeout for each call to the CA: a CA that accepts the connection and then stalls may
/// not hold an order forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// ACME answers are small JSON documents and certificate chains.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let response = self.client.request(req);
        let retry_after = self.retry_after.clone();
        Box::pin(async move {
            // Headers and body within the deadline, and the body bounded: a CA that stalls or
            // streams without end must not hold the ACME service.
            let whole = async {
                let response = response
                    .await
                    .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                let (parts, body) = response.into_parts();
                let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                    body,
                    MAX_RESPONSE_BYTES,
                ))
                .await
                .map_err(instant_acme::Error::Other)?
                .to_bytes();
                Ok::<_, instant_acme::Error>((parts, body))
            };
            let (parts, body) = tokio::time::timeout(REQUEST_TIMEOUT, whole)
                .await
                .map_err(|_| {
                    instant_acme::Error::Str("the ACME server did not answer in 30 s")
                })??;
            if let Some(at) = parse_retry_after(parts.headers.get(http::header::RETRY_AFTER)) {
                if let Ok(mut slot) = retry_after.lock() {
                    *slot = Some(at);
                }
            }
            Ok(BytesResponse {
                parts,
                body: Box::new(body),
            })
        })
    }
}

/// `Retry-After: <seconds>` or an HTTP date; capped at a day so a bad value cannot park a host.
fn parse_retry_after(value: Option<&http::HeaderValue>) -> Option<SystemTime> {
    let text = value?.to_str().ok()?.trim();
    let wait = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => chrono::DateTime::parse_from_rfc2822(text)
            .ok()?
            .signed_duration_since(chrono::Utc::now())
            .to_std()
            .ok()?,
    };
    Some(SystemTime::now() + wait.min(Duration::from_secs(86_400)))
}

/// Loads the issuer's account from `certsDir/acme/accounts/`, or registers one and stores it
/// (0600) there. Registering happens once per issuer and directory URL.
pub async fn account(
    store: &Store,
    issuer: &AcmeIssuer,
    http: &AcmeHttp,
) -> Result<Account, Failure> {
    let stored = store.account(&issuer.name).map_err(Failure::new)?;
    let other_directory = stored.is_some();
    if let Some(stored) = stored.filter(|s| s.directory_url == issuer.directory_url) {
        return restore(stored, http).await;
    }
    let contact = issuer.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = match &issuer.eab {
        Some(eab) => {
            let text = std::fs::read_to_string(&eab.hmac_key_file).map_err(|e| {
                Failure::new(format!(
                    "eab.hmacKeyFile {}: {e}",
                    eab.hmac_key_file.display()
                ))
            })?;
            use base64::Engine;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text.trim().trim_end_matches('='))
                .map_err(|e| {
                    Failure::new(format!(
                        "eab.hmacKeyFile {} is not base64url: {e}",
                        eab.hmac_key_file.display()
                    ))
                })?;
            Some(ExternalAccountKey::new(eab.kid.clone(), &key))
        }
        None => None,
    };
    let (account, credentials) = Account::builder_with_http(Box::new(http.clone()))
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            issuer.directory_url.clone(),
            eab.as_ref(),
        )
        .await
        .map_err(|e| failure(http, format!("registering an ACME account: {e}"), &e))?;
    let saved = store
        .save_account(
            &issuer.name,
            &StoredAccount {
                directory_url: issuer.directory_url.clone(),
                credentials,
            },
            other_directory,
        )
        .map_err(Failure::new)?;
    if !saved {
        // A replica registered at the same moment and stored its account first: use that one.
        match store.account(&issuer.name).map_err(Failure::new)? {
            Some(stored) => return restore(stored, http).await,
            None => return Err(Failure::new("the stored ACME account disappeared")),
        }
    }
    log::info!(
        "ACME issuer `{}`: registered account {}",
        issuer.name,
        account.id()
    );
    Ok(account)
}

async fn restore(stored: StoredAccount, http: &AcmeHttp) -> Result<Account, Failure> {
    Account::builder_with_http(Box::new(http.clone()))
        .from_credentials(stored.credentials)
        .await
        .map_err(|e| failure(http, format!("restoring the ACME account: {e}"), &e))
}

fn failure(http: &AcmeHttp, message: String, error: &instant_acme::Error) -> Failure {
    let mut retry_after = http.take_retry_after();
    if let instant_acme::Error::Timeout(Some(at)) = error {
        retry_after = retry_after.or(Some(
            at.saturating_duration_since(std::time::Instant::now()),
        ));
    }
    Failure {
        message,
        retry_after,
    }
}

/// How long the CA may take to validate challenges and to issue, per order.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs one order for `host` and returns the certificate, checked against its key.
pub async fn obtain(
    host: &str,
    issuer: &AcmeIssuer,
    account: &Account,
    http: &AcmeHttp,
    store: &Store,
    challenges: &Challenges,
    replaces: Option<instant_acme::CertificateIdentifier<'static>>,
) -> Result<Issued, Failure> {
    // A wait the CA asked for during an earlier order says nothing about this one.
    let _ = http.take_retry_after();
    let on = |what: &str, e: instant_acme::Error| failure(http, format!("{what}: {e}"), &e);
    let pending = store
        .pending_order(host)
        .ok()
        .flatten()
        .filter(|p| p.issuer == issuer.name);
    let mut resumed = None;
    if let Some(pending) = pending {
        match account.order(pending.order_url.clone()).await {
            Ok(mut order) => {
                if order.state().status == OrderStatus::Invalid {
                    log::info!("ACME {host}: stored order became invalid; placing a new one");
                } else {
                    log::info!("ACME {host}: resuming order {}", pending.order_url);
                    resumed = Some((order, pending.key_pem));
                }
            }
            // The CA no longer knows it (expired, deleted): start over.
            Err(e @ instant_acme::Error::Api(_)) => {
                log::info!("ACME {host}: stored order unusable ({e}); placing a new one")
            }
            // The CA is unreachable: keep the order for the next attempt.
            Err(e) => return Err(on("fetching the stored order", e)),
        }
        if resumed.is_none() {
            store.remove_pending_order(host);
        }
    }
    let (mut order, key_pem) = match resumed {
        Some(resumed) => resumed,
        None => {
            let identifiers = [Identifier::Dns(host.to_string())];
            let placed = match replaces {
                // Naming the certificate it replaces lets the CA exempt the order from rate
                // limits (RFC 9773 5); a CA that refuses the hint gets a plain order.
                Some(id) => match account
                    .new_order(&NewOrder::new(&identifiers).replaces(id))
                    .await
                {
                    Ok(order) => Ok(order),
                    Err(e) => {
                        log::info!("ACME {host}: order naming the replaced certificate refused ({e}); ordering without");
                        account.new_order(&NewOrder::new(&identifiers)).await
                    }
                },
                None => account.new_order(&NewOrder::new(&identifiers)).await,
            };
            let order = placed.map_err(|e| on("placing the order", e))?;
            (order, new_private_key(issuer.key_type)?)
        }
    };
    store
        .save_pending_order(
            host,
            &PendingOrder {
                issuer: issuer.name.clone(),
                order_url: order.url().to_string(),
                key_pem: key_pem.clone(),
            },
        )
        .map_err(Failure::new)?;
    if order.state().status == OrderStatus::Pending {
        let published = answer_challenges(host, issuer, http, &mut order, store, challenges).await;
        let status = match published {
            Ok(()) => order
                .poll_ready(&polling())
                .await
                .map_err(|e| on("waiting for validation", e)),
            Err(e) => Err(e),
        };
        challenges.withdraw(host, store);
        let status = status?;
        if status != OrderStatus::Ready {
            store.remove_pending_order(host);
            return Err(Failure::new(format!(
                "validation failed: {}",
                order_problem(&mut order).await
            )));
        }
    }
    if order.state().status == OrderStatus::Ready {
        let csr = csr(host, &key_pem)?;
        order
            .finalize_csr(&csr)
            .await
            .map_err(|e| on("finalizing", e))?;
    }
    let chain_pem = order
        .poll_certificate(&polling())
        .await
        .map_err(|e| on("downloading the certificate", e))?;
    let meta = check_issued(host, issuer, &chain_pem, &key_pem).map_err(|message| {
        // The CA's answer is unusable; the same order would give the same answer.
        store.remove_pending_order(host);
        Failure::new(message)
    })?;
    // The pending order stays until the certificate is stored: if storing fails, the next
    // attempt downloads it again instead of ordering another.
    Ok(Issued {
        chain_pem,
        key_pem,
        meta,
    })
}

fn polling() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(VALIDATION_TIMEOUT)
}

/// Publishes the answer to each pending authorization's challenge and tells the CA to look.
async fn answer_challenges(
    host: &str,
    issuer: &AcmeIssuer,
    http: &AcmeHttp,
    order: &mut Order,
    store: &Store,
    challenges: &Challenges,
) -> Result<(), Failure> {
    let kind = match issuer.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization
            .map_err(|e| failure(http, format!("fetching authorizations: {e}"), &e))?;
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(Failure::new(format!(
                    "authorization for {host} is {other:?}"
                )))
            }
        }
        let mut challenge = authorization.challenge(kind.clone()).ok_or_else(|| {
            Failure::new(format!(
                "the CA offers no {kind:?} challenge for {host} (change the issuer's `challenge`)"
            ))
        })?;
        let key_authorization = challenge.key_authorization();
        match issuer.challenge {
            AcmeChallenge::Http01 => {
                challenges.publish_http(host, &challenge.token, key_authorization.as_str(), store)
            }
            AcmeChallenge::TlsAlpn01 => {
                challenges.publish_tls_alpn(host, key_authorization.as_str(), store)
            }
        }
        .map_err(Failure::new)?;
        challenge
            .set_ready()
            .await
            .map_err(|e| failure(http, format!("announcing the challenge: {e}"), &e))?;
    }
    Ok(())
}

/// What the CA says went wrong with an order (the first authorization error, else the order's).
async fn order_problem(order: &mut Order) -> String {
    if let Some(problem) = &order.state().error {
        return problem.to_string();
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(authorization)) = authorizations.next().await {
        for challenge in &authorization.challenges {
            if let Some(problem) = &challenge.error {
                return problem.to_string();
            }
        }
    }
    "the order is invalid".to_string()
}

/// A fresh private key for one certificate, as PKCS#8 PEM.
fn new_private_key(key_type: AcmeKeyType) -> Result<String, Failure> {
    let algorithm = match key_type {
        AcmeKeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        AcmeKeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        AcmeKeyType::Rsa2048 => {
            use rsa::pkcs8::EncodePrivateKey;
            return rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .and_then(|key| {
                    key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                        .map_err(rsa::Error::from)
                })
                .map(|pem| pem.to_string())
                .map_err(|e| Failure::new(format!("generating an RSA key: {e}")));
        }
    };
    rcgen::KeyPair::generate_for(algorithm)
        .map(|key| key.serialize_pem())
        .map_err(|e| Failure::new(format!("generating a private key: {e}")))
}

fn csr(host: &str, key_pem: &str) -> Result<Vec<u8>, Failure> {
    let key = rcgen::KeyPair::from_pem(key_pem)
        .map_err(|e| Failure::new(format!("stored order key is unusable: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| Failure::new(format!("CSR for {host}: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .serialize_request(&key)
        .map(|csr| csr.der().to_vec())
        .map_err(|e| Failure::new(format!("CSR for {host}: {e}")))
}

/// Refuses a chain that does not belong to the key, does not name the host or is not valid now:
/// installing it would break every handshake.
fn check_issued(
    host: &str,
    issuer: &AcmeIssuer,
    chain_pem: &str,
    key_pem: &str,
) -> Result<CertificateMeta, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the CA sent an unreadable chain: {e}"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| "the CA sent an empty chain".to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("order key unreadable: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("order key unusable: {e}"))?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|e| format!("the issued certificate does not match its key ({e})"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the CA sent an invalid certificate: {e}"))?;
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if !names.iter().any(|n| n == host) {
        return Err(format!(
            "the issued certificate does not name {host} (it names {names:?})"
        ));
    }
    let validity = cert.validity();
    let now = unix_now();
    if validity.not_after.timestamp() <= now {
        return Err("the issued certificate has already expired".into());
    }
    if validity.not_before.timestamp() > now + crate::tls::CLOCK_SKEW.as_secs() as i64 {
        return Err(format!(
            "the issued certificate is not valid before {} (is this machine's clock right?)",
            validity.not_before
        ));
    }
    Ok(CertificateMeta {
        issuer: issuer.name.clone(),
        directory_url: issuer.directory_url.clone(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        serial: cert.raw_serial_as_string(),
        issued_at: now,
    })
}
