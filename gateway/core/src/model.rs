//! The validated model: what a config means once every rule has passed.
//!
//! Second of the three config types (raw [`crate::config`] → model → [`crate::snapshot`]). Values here
//! are already normalised (lower-case hosts, expanded short names, compiled regexes, resolved
//! references), so compiling a snapshot and matching requests never re-check or re-parse anything.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use regex::Regex;

/// A host pattern as Istio writes it: `example.com`, `*.example.com` or `*`. Stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`, stored as the suffix after `*.` (`example.com`).
    Wildcard(String),
    Any,
}

impl HostPattern {
    pub fn parse(host: &str) -> Result<Self, String> {
        let host = host.to_ascii_lowercase();
        if host == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(suffix) = host.strip_prefix("*.") {
            check_dns_name(suffix)?;
            return Ok(HostPattern::Wildcard(suffix.to_string()));
        }
        if host.contains('*') {
            return Err(format!(
                "`{host}`: a wildcard must be the whole first label (`*.example.com`) or `*`"
            ));
        }
        check_dns_name(&host)?;
        Ok(HostPattern::Exact(host))
    }

    /// Whether a concrete (lower-case) host name is served by this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => name == host,
            HostPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }

    /// The hosts both patterns serve, as one pattern (the more specific one), as Istio intersects a
    /// VirtualService's hosts with a Gateway server's hosts.
    pub fn intersect(&self, other: &HostPattern) -> Option<HostPattern> {
        if self.covers(other) {
            Some(other.clone())
        } else if other.covers(self) {
            Some(self.clone())
        } else {
            None
        }
    }

    /// Whether every host `other` serves is also served by `self`.
    fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Any, _) => true,
            (_, HostPattern::Any) => false,
            (_, HostPattern::Exact(name)) => self.matches(name),
            (HostPattern::Exact(_), HostPattern::Wildcard(_)) => false,
            (HostPattern::Wildcard(mine), HostPattern::Wildcard(theirs)) => {
                mine == theirs || HostPattern::Wildcard(mine.clone()).matches(theirs)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

/// RFC 1123 host name check: letters, digits and hyphens in labels of 1–63, at most 253 in all.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("host name is empty".into());
    }
    if name.len() > 253 {
        return Err(format!("host name `{name}` is longer than 253 characters"));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!(
                "`{name}` is not a valid host name (label `{label}`): use letters, digits and \
                 hyphens, 1-63 characters per label"
            ));
        }
    }
    Ok(())
}

/// Istio's short-name rule: a name without a dot is relative to the namespace of the object that
/// wrote it (`reviews` in `default` → `reviews.default.svc.cluster.local`). Names with a dot, `*`
/// and IP addresses are taken as written.
pub fn expand_short_name(host: &str, namespace: &str) -> String {
    let host = host.to_ascii_lowercase();
    if host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        host
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// A compiled Istio `StringMatch`.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    /// Anchored at both ends: Istio's (Envoy's) regex matches the whole value.
    Regex(Regex),
    /// `{}`: the header or query parameter is present, whatever its value.
    Present,
}

impl StrMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(expected) => value == expected,
            StrMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StrMatch::Regex(regex) => regex.is_match(value),
            StrMatch::Present => true,
        }
    }

    /// Case-insensitive for exact and prefix (Istio's `ignoreUriCase`); regexes keep their case.
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(expected) => value.eq_ignore_ascii_case(expected),
            StrMatch::Prefix(prefix) => value
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
            other => other.matches(value),
        }
    }
}

/// One compiled `HTTPMatchRequest`: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    pub name: Option<String>,
    pub uri: Option<StrMatch>,
    pub ignore_uri_case: bool,
    pub scheme: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub headers: Vec<(HeaderName, StrMatch)>,
    pub without_headers: Vec<(HeaderName, StrMatch)>,
    pub query_params: Vec<(String, StrMatch)>,
    pub port: Option<u16>,
    /// `match.gateways`, resolved to `namespace/name` (or `mesh`).
    pub gateways: Option<Vec<String>>,
}

/// Istio's `Headers` operations for one direction.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    /// `derivePort: FROM_REQUEST_PORT`: the port the request arrived on.
    pub port_from_request: bool,
    pub scheme: Option<String>,
    pub code: u16,
}

#[derive(Debug, Clone)]
pub struct DirectResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub enum UriRewrite {
    /// Envoy's `prefix_rewrite`: the matched prefix (or the whole path for exact/regex matches) is
    /// replaced.
    Prefix(String),
    /// `uriRegexRewrite`, with the replacement already in `regex` crate syntax (`${1}`).
    Regex { pattern: Regex, replacement: String },
}

#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub uri: Option<UriRewrite>,
    /// The Host to send, ready to go on the wire.
    pub authority: Option<HeaderValue>,
}

/// Where one weighted share of a route's traffic goes.
#[derive(Debug, Clone)]
pub struct RouteDestination {
    pub service: ServiceKey,
    pub weight: u32,
    pub headers: HeaderRules,
}

/// How Sluice talks to an upstream port, from the ServiceEntry port's `protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// `HTTP2`, `GRPC`, `GRPC-WEB`: HTTP/2 without TLS (h2c, prior knowledge).
    Http2,
}

/// Identifies an upstream cluster: an FQDN, a service port and an optional subset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)?;
        if let Some(subset) = &self.subset {
            write!(f, " (subset {subset})")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub enum Action {
    Forward(Vec<RouteDestination>),
    Redirect(Redirect),
    Respond(DirectResponse),
}

#[derive(Debug, Clone)]
pub struct HttpRoute {
    /// `namespace/name http[i]` (and the route's `name` if it has one): for logs and warnings.
    pub label: String,
    pub matches: Vec<RouteMatch>,
    pub action: Action,
    pub rewrite: Rewrite,
    pub headers: HeaderRules,
}

/// What a VirtualService is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// `namespace/name` of a Gateway.
    Gateway(String),
    Mesh,
}

#[derive(Debug, Clone)]
pub struct VirtualService {
    pub id: String,
    pub namespace: String,
    pub hosts: Vec<HostPattern>,
    pub bindings: Vec<Binding>,
    pub http: Vec<std::sync::Arc<HttpRoute>>,
    pub tls: Vec<TlsRoute>,
    pub tcp: Vec<TcpRoute>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerProtocol {
    Http,
    Http2,
    Grpc,
    Https,
    Tls,
    Tcp,
}

/// What a listener port speaks first. Servers of one family may share a port; different families
/// never do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerFamily {
    /// HTTP/1.1 and h2c: HTTP, HTTP2, GRPC servers.
    PlainHttp,
    /// A TLS handshake first: HTTPS (terminated) and TLS (passed through) servers.
    Tls,
    /// Raw TCP, routed by port.
    Tcp,
}

impl ServerProtocol {
    pub fn family(self) -> ListenerFamily {
        match self {
            ServerProtocol::Http | ServerProtocol::Http2 | ServerProtocol::Grpc => {
                ListenerFamily::PlainHttp
            }
            ServerProtocol::Https | ServerProtocol::Tls => ListenerFamily::Tls,
            ServerProtocol::Tcp => ListenerFamily::Tcp,
        }
    }

    pub fn is_tls(self) -> bool {
        self.family() == ListenerFamily::Tls
    }
}

/// Where a value was written, for errors found after validation (a certificate that does not load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub file: std::path::PathBuf,
    pub position: crate::source::Position,
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.file.display(),
            self.position.line,
            self.position.column
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    Simple,
    Mutual,
    OptionalMutual,
    Passthrough,
}

/// Where a certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Credential {
    /// `credentialName`: `certsDir/NAME.crt` + `.key`, or `certsDir/NAME/tls.crt` + `tls.key`.
    Name(String),
    /// `credentialName: acme:ISSUER`: one certificate per server host, obtained and renewed by
    /// Sluice, stored as `certsDir/HOST.crt` + `.key`.
    Acme(String),
    Files {
        certificate: std::path::PathBuf,
        private_key: std::path::PathBuf,
    },
}

/// A Gateway server's `tls` block, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub mode: TlsMode,
    /// `None` only for PASSTHROUGH.
    pub credential: Option<Credential>,
    /// `caCertificates` for MUTUAL/OPTIONAL_MUTUAL (else the credential's `-cacert`/`ca.crt`).
    pub ca_certificates: Option<std::path::PathBuf>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// OpenSSL-style names, already checked against what Sluice can offer. Empty: the defaults.
    pub cipher_suites: Vec<String>,
    pub written: Written,
}

/// The TLS 1.2 suites Sluice (rustls) offers, by the OpenSSL names Istio's `cipherSuites` uses.
/// TLS 1.3 suites are not configurable, as in Envoy.
pub const CIPHER_SUITES: [&str; 6] = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
];

/// `DestinationRule.trafficPolicy.tls`: how Sluice speaks TLS to an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// `sni`, else the destination host.
    pub sni: Option<String>,
    /// `caCertificates`, else the system roots.
    pub ca_certificates: Option<std::path::PathBuf>,
    /// MUTUAL: `clientCertificate` and `privateKey`.
    pub client_certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub insecure_skip_verify: bool,
}

/// Which VirtualService namespaces may attach to a server host (`ns/host`, `./host`, `*/host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceFilter {
    Any,
    Only(String),
}

#[derive(Debug, Clone)]
pub struct ServerHost {
    pub namespaces: NamespaceFilter,
    pub host: HostPattern,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub port: u16,
    pub protocol: ServerProtocol,
    pub hosts: Vec<ServerHost>,
    pub tls: Option<ServerTls>,
    /// `tls.httpsRedirect` on a plaintext server: every request is sent to https.
    pub https_redirect: bool,
}

/// One `match` block of a TLS route.
#[derive(Debug, Clone)]
pub struct TlsMatch {
    pub sni_hosts: Vec<HostPattern>,
    pub port: Option<u16>,
    pub gateways: Option<Vec<String>>,
}

/// One `match` block of a TCP route.
#[derive(Debug, Clone)]
pub struct L4Match {
    pub port: Option<u16>,
    pub gateways: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct TlsRoute {
    pub label: String,
    pub matches: Vec<TlsMatch>,
    pub destinations: Vec<RouteDestination>,
}

#[derive(Debug, Clone)]
pub struct TcpRoute {
    pub label: String,
    pub matches: Vec<L4Match>,
    pub destinations: Vec<RouteDestination>,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub id: String,
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointAddress {
    Ip(IpAddr),
    /// Resolved by DNS off the request path and refreshed periodically.
    Dns(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: EndpointAddress,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            EndpointAddress::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            EndpointAddress::Dns(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// A service known from a ServiceEntry: its ports and its labelled endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub host: String,
    pub ports: Vec<ServicePortModel>,
    pub endpoints: Vec<WorkloadEndpoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePortModel {
    pub number: u16,
    pub name: Option<String>,
    pub target_port: Option<u16>,
    /// `Err`: a protocol HTTP routes cannot use, and why (TCP; HTTPS/TLS unless a
    /// DestinationRule originates TLS).
    pub http: Result<UpstreamProtocol, String>,
    /// The port speaks TLS itself (`HTTPS`, `TLS`): HTTP routes need TLS origination.
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadEndpoint {
    pub address: EndpointAddress,
    /// Port name → endpoint port (`endpoints[].ports`).
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub bind_address: IpAddr,
    pub admin_address: SocketAddr,
    /// `None`: `<certs_dir>/admin.token`.
    pub admin_token_file: Option<std::path::PathBuf>,
    pub certs_dir: std::path::PathBuf,
    pub mesh_port: Option<u16>,
    pub dns_refresh: Duration,
    pub threads: usize,
    pub proxy_protocol: Option<ProxyProtocolSettings>,
    pub num_trusted_proxies: u32,
    pub drain: Duration,
    pub shutdown_timeout: Duration,
    pub health_port: Option<u16>,
    pub upgrade_socket: std::path::PathBuf,
    pub access_log: Option<AccessLog>,
    pub acme_issuers: Vec<AcmeIssuer>,
    pub tracing: Option<Tracing>,
}

/// `GatewaySettings.spec.tracing`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// Fraction (0–1) of new traces sampled.
    pub sampling: f64,
    pub service_name: String,
    pub collector: Collector,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collector {
    /// Zipkin v2 JSON.
    Zipkin(http::Uri),
    /// OTLP/HTTP with JSON encoding.
    OpenTelemetry(http::Uri),
}

impl Collector {
    pub fn endpoint(&self) -> &http::Uri {
        match self {
            Collector::Zipkin(uri) | Collector::OpenTelemetry(uri) => uri,
        }
    }
}

/// `GatewaySettings.spec.acme.issuers[]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeIssuer {
    pub name: String,
    pub directory_url: String,
    pub email: Option<String>,
    pub ca_bundle: Option<std::path::PathBuf>,
    pub challenge: AcmeChallenge,
    pub eab: Option<AcmeEab>,
    /// `None`: renew when a third of the certificate's lifetime is left.
    pub renew_before: Option<Duration>,
    pub key_type: AcmeKeyType,
    pub min_retry_interval: Duration,
    pub max_retry_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    Http01,
    TlsAlpn01,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeKeyType {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeEab {
    pub kid: String,
    pub hmac_key_file: std::path::PathBuf,
}

impl Settings {
    pub fn acme_issuer(&self, name: &str) -> Option<&AcmeIssuer> {
        self.acme_issuers.iter().find(|i| i.name == name)
    }
}

/// The fields an access log line can hold, by the names format strings use (`%STATUS%`).
pub const ACCESS_LOG_FIELDS: [&str; 16] = [
    "START_TIME",
    "CLIENT_ADDRESS",
    "METHOD",
    "AUTHORITY",
    "PATH",
    "PROTOCOL",
    "STATUS",
    "RESPONSE_FLAGS",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "DURATION",
    "UPSTREAM_ADDRESS",
    "ROUTE",
    "DESTINATION",
    "REQUEST_ID",
    "TRACE_ID",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    pub path: std::path::PathBuf,
    /// `None`: JSON lines.
    pub format: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolSettings {
    pub trusted: Vec<ipnet::IpNet>,
    pub allow_without_header: bool,
    /// `None`: every listener.
    pub ports: Option<Vec<u16>>,
}

impl ProxyProtocolSettings {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    pub fn applies_to(&self, port: u16) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ports| ports.contains(&port))
    }
}

impl Settings {
    pub fn admin_token_path(&self) -> std::path::PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.certs_dir.join("admin.token"))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bind_address: IpAddr::from([0, 0, 0, 0]),
            admin_address: SocketAddr::from(([127, 0, 0, 1], 9901)),
            admin_token_file: None,
            certs_dir: "certs".into(),
            mesh_port: None,
            dns_refresh: Duration::from_secs(5),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            proxy_protocol: None,
            num_trusted_proxies: 0,
            drain: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            health_port: None,
            upgrade_socket: "/tmp/sluice-upgrade.sock".into(),
            access_log: None,
            acme_issuers: Vec::new(),
            tracing: None,
        }
    }
}

/// The TLS origination for a destination: the subset's policy if it has one, else the rule's.
pub fn upstream_tls_for<'m>(
    policies: &'m BTreeMap<(String, Option<String>), Option<UpstreamTls>>,
    host: &str,
    subset: Option<&str>,
) -> Option<&'m UpstreamTls> {
    if let Some(subset) = subset {
        if let Some(policy) = policies.get(&(host.to_string(), Some(subset.to_string()))) {
            return policy.as_ref();
        }
    }
    policies.get(&(host.to_string(), None))?.as_ref()
}

/// A whole validated config.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub settings: Settings,
    pub gateways: Vec<Gateway>,
    pub virtual_services: Vec<std::sync::Arc<VirtualService>>,
    /// By FQDN.
    pub services: BTreeMap<String, Service>,
    /// (FQDN, subset name) → labels the subset selects.
    pub subsets: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// (FQDN, subset) → TLS origination; `(host, None)` is the DestinationRule's own policy, which a
    /// subset's policy replaces.
    /// `None` values are an explicit `mode: DISABLE`.
    pub upstream_tls: BTreeMap<(String, Option<String>), Option<UpstreamTls>>,
    pub files: Vec<std::path::PathBuf>,
}
