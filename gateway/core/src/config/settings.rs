//! Sluice's own document, `kind: GatewaySettings` (`apiVersion: sluice.dev/v1alpha1`): process-wide
//! settings that Istio's objects have no place for. Every key is optional.

use serde::Deserialize;

pub const KIND: &str = "GatewaySettings";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySettingsSpec {
    /// Address every Gateway server port binds on. Default `0.0.0.0`.
    #[serde(default)]
    pub bind_address: Option<String>,
    #[serde(default)]
    pub admin: Option<AdminSettings>,
    /// Where certificates live (relative paths are relative to the working directory). Default `certs`.
    #[serde(default)]
    pub certs_dir: Option<String>,
    /// A plain-HTTP listener for VirtualServices bound to `mesh` (no `gateways`): what in-cluster
    /// clients would reach through their sidecar in Istio. Off unless set.
    #[serde(default)]
    pub mesh_listener: Option<MeshListener>,
    /// How often DNS endpoints are resolved again, as an Istio duration (`5s`, `1m`). Default `5s`.
    #[serde(default)]
    pub dns_refresh_rate: Option<String>,
    /// Worker threads per listener. Default: the number of CPUs.
    #[serde(default)]
    pub threads: Option<i64>,
    /// PROXY protocol (v1 and v2) from the L4 load balancer in front. Off unless set.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Istio's `gatewayTopology.numTrustedProxies`: how many proxies in front of Sluice append to
    /// X-Forwarded-For, so the client address is taken that many entries from the right. Default 0.
    #[serde(default)]
    pub num_trusted_proxies: Option<i64>,
    /// After SIGTERM, how long `/readyz` says 503 while listeners still accept, so the balancer
    /// notices. Default 5.
    #[serde(default)]
    pub drain_seconds: Option<i64>,
    /// After draining, how long in-flight requests may take before the process exits. Default 30.
    #[serde(default)]
    pub shutdown_timeout_seconds: Option<i64>,
    /// A plain-HTTP port serving only `/healthz` and `/readyz`, for balancers that cannot reach the
    /// admin address. Off unless set.
    #[serde(default)]
    pub health_port: Option<i64>,
    /// Unix socket a new Sluice process uses to take over the listening sockets during a graceful
    /// upgrade (`sluice run --upgrade`). Default `/tmp/sluice-upgrade.sock`.
    #[serde(default)]
    pub upgrade_socket: Option<String>,
    /// One line per request. Off unless set (as Istio's `accessLogFile`).
    #[serde(default)]
    pub access_log: Option<AccessLogSettings>,
    /// Certificate issuers for Gateway servers whose `credentialName` is `acme:<issuer>`.
    #[serde(default)]
    pub acme: Option<AcmeSettings>,
    /// Spans for sampled requests, sent to a Zipkin or OpenTelemetry collector. Off unless set.
    #[serde(default)]
    pub tracing: Option<TracingSettings>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSettings {
    /// Percentage of new traces sampled, as Istio's `tracing.sampling` (0–100). Default 1.
    /// A sampling decision that arrives with the request (`traceparent`, `x-b3-sampled`) is kept.
    #[serde(default)]
    pub sampling: Option<f64>,
    /// `service.name` of the spans. Default `sluice`.
    #[serde(default)]
    pub service_name: Option<String>,
    #[serde(default)]
    pub zipkin: Option<CollectorSettings>,
    #[serde(default)]
    pub opentelemetry: Option<CollectorSettings>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CollectorSettings {
    /// Zipkin: `http://HOST:9411/api/v2/spans`; OpenTelemetry (OTLP/HTTP, JSON):
    /// `http://HOST:4318/v1/traces`.
    pub endpoint: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AcmeSettings {
    #[serde(default)]
    pub issuers: Vec<AcmeIssuerSpec>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AcmeIssuerSpec {
    pub name: String,
    /// The ACME directory (Let's Encrypt: `https://acme-v02.api.letsencrypt.org/directory`).
    pub directory_url: String,
    /// Contact address for the account (expiry notices).
    #[serde(default)]
    pub email: Option<String>,
    /// PEM file of CAs that verify the ACME server (a private CA). Default: the Mozilla roots.
    #[serde(default)]
    pub ca_bundle: Option<String>,
    /// `http-01` (default) or `tls-alpn-01`.
    #[serde(default)]
    pub challenge: Option<String>,
    /// External account binding, for CAs that require one.
    #[serde(default)]
    pub eab: Option<AcmeEabSpec>,
    /// Renew this long before expiry (a duration: `720h`). Default: when a third of the lifetime is left.
    #[serde(default)]
    pub renew_before: Option<String>,
    /// `ECDSA_P256` (default), `ECDSA_P384` or `RSA_2048` (for clients without ECDSA).
    #[serde(default)]
    pub key_type: Option<String>,
    /// First wait after a failed order (doubling up to `maxRetryInterval`). Default `1m`.
    #[serde(default)]
    pub min_retry_interval: Option<String>,
    /// Longest wait between failed orders. Default `6h`.
    #[serde(default)]
    pub max_retry_interval: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AcmeEabSpec {
    pub kid: String,
    /// File holding the base64url HMAC key the CA gave out.
    pub hmac_key_file: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLogSettings {
    /// File to append to; `/dev/stdout` for the process's output.
    pub path: String,
    /// `%FIELD%` placeholders (see the README); default: one JSON object per line.
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyProtocol {
    /// Sources allowed to send a PROXY header (`10.0.0.0/8`, `127.0.0.1/32`, `::1/128`).
    #[serde(default)]
    pub trusted_cidrs: Vec<String>,
    /// Whether a trusted source may also connect without a header (Envoy's
    /// `allow_requests_without_proxy_protocol`). Default false.
    #[serde(default)]
    pub allow_without_header: bool,
    /// Listener ports that expect the header. Default: every Gateway port.
    #[serde(default)]
    pub ports: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminSettings {
    #[serde(default)]
    pub address: Option<String>,
    /// File holding the bearer token the admin API requires. Default `<certsDir>/admin.token`,
    /// created with a random token (mode 0600) when missing.
    #[serde(default)]
    pub token_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshListener {
    pub port: i64,
}
