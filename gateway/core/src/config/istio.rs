//! Raw `networking.istio.io` objects, field for field as in Istio's API reference.
//!
//! These structs only describe what a user may write; they hold no resolved references and no defaults
//! beyond "absent". Fields Istio has but Sluice does not implement yet are typed [`NotSupported`], so
//! writing them fails loudly at the exact line instead of being silently ignored.

use std::collections::BTreeMap;

use serde::de::{Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

/// A field that exists in Istio's API but that Sluice does not implement yet. Deserializing one is an
/// error that names the field's path and position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotSupported;

pub const NOT_SUPPORTED: &str = "is not supported yet";

impl<'de> Deserialize<'de> for NotSupported {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(deserializer)?;
        Err(D::Error::custom(NOT_SUPPORTED))
    }
}

/// A field Istio has that means nothing for a standalone gateway (for example `exportTo`). It is
/// accepted so that configs written for Istio load unchanged; the README lists each one. It is read
/// as a YAML value (and dropped) rather than skipped, so serde_yaml's nesting and alias-expansion
/// limits apply to it like to every other field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoEffect;

impl<'de> Deserialize<'de> for NoEffect {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_yaml::Value::deserialize(deserializer)?;
        Ok(NoEffect)
    }
}

/// A list read to its exact length. YAML sequences come with no length, so a deserialized `Vec`
/// grows to 4 slots or more; parsed VirtualServices stay in the parse cache for the life of the
/// process, and at 10,000 hosts × 10 routes the spare slots of their route lists were a third of
/// the gateway's memory (an HTTP match is ~430 bytes).
fn exact_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    let mut list = Vec::<T>::deserialize(deserializer)?;
    list.shrink_to_fit();
    Ok(list)
}

/// A string-keyed map that refuses a key written twice. A plain map would keep the last value
/// silently, and a header rule or a label written twice is almost always a mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueMap<V>(pub BTreeMap<String, V>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<V> std::ops::Deref for UniqueMap<V> {
    type Target = BTreeMap<String, V>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a, V> IntoIterator for &'a UniqueMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = std::collections::btree_map::Iter<'a, String, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UniqueVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueVisitor<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut map = BTreeMap::new();
                while let Some(key) = access.next_key::<String>()? {
                    if map.contains_key(&key) {
                        return Err(A::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value = access.next_value()?;
                    map.insert(key, value);
                }
                Ok(UniqueMap(map))
            }
        }
        deserializer.deserialize_map(UniqueVisitor(std::marker::PhantomData))
    }
}

pub type Labels = UniqueMap<String>;

// ---------------------------------------------------------------- Gateway

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Which gateway pods a Gateway applies to in Kubernetes. Sluice serves every Gateway it loads.
    #[serde(default)]
    pub selector: Option<NoEffect>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Server {
    pub port: Port,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub tls: Option<ServerTlsSettings>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub bind: Option<NotSupported>,
    #[serde(default)]
    pub default_endpoint: Option<NotSupported>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    pub number: i64,
    pub protocol: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<NotSupported>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerTlsSettings {
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub server_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Option<NotSupported>,
    #[serde(default)]
    pub verify_certificate_spki: Option<NotSupported>,
    #[serde(default)]
    pub verify_certificate_hash: Option<NotSupported>,
    #[serde(default)]
    pub min_protocol_version: Option<String>,
    #[serde(default)]
    pub max_protocol_version: Option<String>,
    #[serde(default)]
    pub cipher_suites: Option<Vec<String>>,
    #[serde(default)]
    pub ca_crl: Option<NotSupported>,
    #[serde(default)]
    pub credential_names: Option<NotSupported>,
    #[serde(default)]
    pub tls_certificates: Option<NotSupported>,
}

// ---------------------------------------------------------------- VirtualService

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default, deserialize_with = "exact_list")]
    pub http: Vec<HttpRoute>,
    #[serde(default, deserialize_with = "exact_list")]
    pub tls: Vec<TlsRoute>,
    #[serde(default, deserialize_with = "exact_list")]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub export_to: Option<NoEffect>,
}

/// Istio's `TLSRoute`: routes a TLS stream by SNI without decrypting it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(default, rename = "match", deserialize_with = "exact_list")]
    pub matches: Vec<TlsMatchAttributes>,
    #[serde(default, deserialize_with = "exact_list")]
    pub route: Vec<L4RouteDestination>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsMatchAttributes {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub gateways: Option<Vec<String>>,
    #[serde(default)]
    pub destination_subnets: Option<NotSupported>,
    #[serde(default)]
    pub source_labels: Option<NotSupported>,
    #[serde(default)]
    pub source_namespace: Option<NotSupported>,
}

/// Istio's `TCPRoute`: forwards a TCP connection by port.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(default, rename = "match", deserialize_with = "exact_list")]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default, deserialize_with = "exact_list")]
    pub route: Vec<L4RouteDestination>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L4MatchAttributes {
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub gateways: Option<Vec<String>>,
    #[serde(default)]
    pub destination_subnets: Option<NotSupported>,
    #[serde(default)]
    pub source_labels: Option<NotSupported>,
    #[serde(default)]
    pub source_namespace: Option<NotSupported>,
}

/// `RouteDestination` of TLS and TCP routes (no header rules at layer 4).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L4RouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match", deserialize_with = "exact_list")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default, deserialize_with = "exact_list")]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    #[serde(default)]
    pub direct_response: Option<HttpDirectResponse>,
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    #[serde(default)]
    pub headers: Option<Headers>,
    #[serde(default)]
    pub delegate: Option<NotSupported>,
    #[serde(default)]
    pub timeout: Option<NotSupported>,
    #[serde(default)]
    pub retries: Option<NotSupported>,
    #[serde(default)]
    pub fault: Option<NotSupported>,
    #[serde(default)]
    pub mirror: Option<NotSupported>,
    #[serde(default)]
    pub mirrors: Option<NotSupported>,
    #[serde(default)]
    pub mirror_percentage: Option<NotSupported>,
    #[serde(default)]
    pub mirror_percent: Option<NotSupported>,
    #[serde(default)]
    pub cors_policy: Option<NotSupported>,
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex`. An empty one (`{}`) means "present".
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: UniqueMap<StringMatch>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub gateways: Option<Vec<String>>,
    #[serde(default)]
    pub query_params: UniqueMap<StringMatch>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    #[serde(default)]
    pub without_headers: UniqueMap<StringMatch>,
    #[serde(default)]
    pub source_labels: Option<NotSupported>,
    #[serde(default)]
    pub source_namespace: Option<NotSupported>,
    #[serde(default)]
    pub stat_prefix: Option<NoEffect>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelector {
    pub number: i64,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: UniqueMap<String>,
    #[serde(default)]
    pub add: UniqueMap<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRedirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub redirect_code: Option<i64>,
    #[serde(default)]
    pub derive_port: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpDirectResponse {
    pub status: i64,
    #[serde(default)]
    pub body: Option<HttpBody>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBody {
    #[serde(default)]
    pub string: Option<String>,
    /// Base64, as protobuf's `bytes` read from YAML or JSON.
    #[serde(default)]
    pub bytes: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

// ---------------------------------------------------------------- DestinationRule

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub export_to: Option<NoEffect>,
    #[serde(default)]
    pub workload_selector: Option<NotSupported>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Istio's `TrafficPolicy`; Sluice implements `tls` (origination) so far.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    #[serde(default)]
    pub load_balancer: Option<NotSupported>,
    #[serde(default)]
    pub connection_pool: Option<NotSupported>,
    #[serde(default)]
    pub outlier_detection: Option<NotSupported>,
    #[serde(default)]
    pub port_level_settings: Option<NotSupported>,
    #[serde(default)]
    pub tunnel: Option<NotSupported>,
    #[serde(default)]
    pub proxy_protocol: Option<NotSupported>,
}

/// Istio's `ClientTLSSettings`: TLS from Sluice to the upstream.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTlsSettings {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default)]
    pub subject_alt_names: Option<NotSupported>,
    #[serde(default)]
    pub credential_name: Option<NotSupported>,
    #[serde(default)]
    pub ca_crl: Option<NotSupported>,
}

// ---------------------------------------------------------------- ServiceEntry

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub location: Option<Location>,
    #[serde(default)]
    pub resolution: Option<Resolution>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default)]
    pub addresses: Option<NotSupported>,
    #[serde(default)]
    pub workload_selector: Option<NotSupported>,
    #[serde(default)]
    pub export_to: Option<NoEffect>,
    #[serde(default)]
    pub subject_alt_names: Option<NotSupported>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub number: i64,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<i64>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEntry {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: UniqueMap<i64>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub network: Option<NotSupported>,
    #[serde(default)]
    pub locality: Option<NotSupported>,
    #[serde(default)]
    pub weight: Option<NotSupported>,
    #[serde(default)]
    pub service_account: Option<NoEffect>,
}
