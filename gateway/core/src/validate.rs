//! Validation: raw documents → [`Model`], or every reason why not.
//!
//! Each rule reports at the YAML path it is about, so an operator gets `file:line:col` for every
//! mistake in one run. A config with any error yields no model at all: nothing is half-applied.
//! Warnings (Istio accepts the config but it probably does not do what was meant) never block.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use regex::{Regex, RegexBuilder};

use crate::config::istio::{self, StringMatch};
use crate::config::{ConfigSet, Document};
use crate::diag::Diagnostics;
use crate::identity::{address_of, ByAddress};
use crate::model::*;
use crate::source::Origin;

/// Compiled regexes may not exceed this many bytes: a pathological pattern is rejected at load time
/// instead of eating memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Validates a loaded config. Returns the model only when there is no error; `diagnostics` gets every
/// error and warning found.
pub fn validate(set: &ConfigSet, diagnostics: &mut Diagnostics) -> Option<Model> {
    validate_cached(set, diagnostics, &mut ValidateCache::default())
}

/// [`validate`], reusing the VirtualServices `cache` holds from the previous run where neither
/// their documents nor anything they refer to changed; `cache` then holds this run's.
pub fn validate_cached(
    set: &ConfigSet,
    diagnostics: &mut Diagnostics,
    cache: &mut ValidateCache,
) -> Option<Model> {
    let previous = std::mem::take(cache);
    let mut v = Validator {
        set,
        diags: Diagnostics::default(),
        acme_issuers: Vec::new(),
        recording: None,
        dependencies: None,
        validated: ByAddress::with_capacity_and_hasher(
            set.virtual_services.len(),
            Default::default(),
        ),
        previous: previous.virtual_services,
        previous_context: previous.context,
        changes: Changes::default(),
        context: None,
    };
    let model = v.run();
    let failed = v.diags.has_errors();
    *cache = ValidateCache {
        context: v.context.take(),
        virtual_services: v.validated,
    };
    diagnostics.extend(v.diags);
    (!failed).then_some(model)
}

/// What one validation leaves for the next: the VirtualServices it validated, with their
/// diagnostics and what they looked up, and what there was to look up. A reload that edits one of
/// 10,000 VirtualServices then validates one; one that edits a DestinationRule validates those
/// routing to its host. Documents are compared by identity: the
/// [`ParseCache`](crate::config::ParseCache) hands back the same `Arc`s for unchanged text, and
/// the cache holds those `Arc`s, so an address is never reused for other content while cached.
#[derive(Default)]
pub struct ValidateCache {
    context: Option<Context>,
    /// By the address of the document's spec.
    virtual_services: ByAddress<ValidatedVirtualService>,
}

/// Everything a VirtualService's validation reads besides its own document (validated from the
/// other documents): the gateways it may bind to, and per destination host the ServiceEntry, the
/// subsets and the TLS policies.
struct Context {
    gateway_ids: BTreeSet<String>,
    services: BTreeMap<String, Service>,
    subsets: Subsets,
    upstream_tls: UpstreamTlsPolicies,
}

impl Context {
    /// What differs from `before`, entry by entry.
    fn changes_since(&self, before: &Context) -> Changes {
        /// The keys whose entries were added, removed or changed.
        fn differing<K: Ord + Clone + std::hash::Hash, V: PartialEq>(
            before: &BTreeMap<K, V>,
            after: &BTreeMap<K, V>,
        ) -> HashSet<K> {
            let changed = before
                .iter()
                .filter(|(key, value)| after.get(*key) != Some(*value))
                .map(|(key, _)| key);
            let added = after.keys().filter(|key| !before.contains_key(*key));
            changed.chain(added).cloned().collect()
        }
        let subsets = differing(&before.subsets, &self.subsets);
        Changes {
            everything: false,
            services: differing(&before.services, &self.services),
            subset_hosts: subsets.iter().map(|(host, _)| host.clone()).collect(),
            subsets,
            upstream_tls: differing(&before.upstream_tls, &self.upstream_tls),
            gateways: before
                .gateway_ids
                .symmetric_difference(&self.gateway_ids)
                .cloned()
                .collect(),
        }
    }
}

/// Differences between the previous run's [`Context`] and this one's, by entry.
struct Changes {
    /// No previous run to compare with.
    everything: bool,
    services: HashSet<String>,
    subsets: HashSet<(String, String)>,
    /// The hosts of `subsets`.
    subset_hosts: HashSet<String>,
    upstream_tls: HashSet<(String, Option<String>)>,
    /// Gateways added or removed.
    gateways: BTreeSet<String>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            everything: true,
            services: HashSet::new(),
            subsets: HashSet::new(),
            subset_hosts: HashSet::new(),
            upstream_tls: HashSet::new(),
            gateways: BTreeSet::new(),
        }
    }
}

impl Changes {
    /// Whether a VirtualService validated with `dependencies` would be validated the same now.
    fn spare(&self, dependencies: &Dependencies) -> bool {
        let d = dependencies;
        !self.everything
            && !d.services.iter().any(|h| self.services.contains(h))
            && !d.subsets.iter().any(|s| self.subsets.contains(s))
            && !d
                .all_subsets_of
                .iter()
                .any(|h| self.subset_hosts.contains(h))
            && !d.upstream_tls.iter().any(|t| self.upstream_tls.contains(t))
            && !d.gateways.iter().any(|g| self.gateways.contains(g))
            && (!d.all_gateways || self.gateways.is_empty())
    }
}

/// What a VirtualService's validation looked up in the [`Context`]: the entries its result
/// depends on. A VirtualService with a destination `reviews` subset `v1` does not depend on a
/// subset `v2` being added.
#[derive(Default)]
struct Dependencies {
    /// ServiceEntry hosts looked up (present or not).
    services: Vec<String>,
    /// (host, subset) looked up.
    subsets: Vec<(String, String)>,
    /// Hosts whose subset names an error listed.
    all_subsets_of: Vec<String>,
    /// TLS policies looked up: (host, subset) and (host, None).
    upstream_tls: Vec<(String, Option<String>)>,
    /// Gateway ids it binds to.
    gateways: Vec<String>,
    /// It named a gateway that does not exist, and the error lists every gateway.
    all_gateways: bool,
}

/// Adds `item` unless it is there: dependency lists are short (a few per route).
fn add_once<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// A document's parsed parts, equal only to the very same parse (positions aside: they only place
/// diagnostics). Holding them keeps their addresses from being reused.
struct Parsed<T> {
    spec: std::sync::Arc<T>,
    metadata: std::sync::Arc<crate::config::ObjectMeta>,
}

impl<T> Parsed<T> {
    fn of(doc: &Document<T>) -> Self {
        Self {
            spec: doc.spec.clone(),
            metadata: doc.metadata.clone(),
        }
    }

    fn is(&self, doc: &Document<T>) -> bool {
        std::sync::Arc::ptr_eq(&self.spec, &doc.spec)
            && std::sync::Arc::ptr_eq(&self.metadata, &doc.metadata)
    }
}

struct ValidatedVirtualService {
    document: Parsed<istio::VirtualServiceSpec>,
    result: std::sync::Arc<VirtualService>,
    /// Replayed at the document's current position when the result is reused.
    diagnostics: Vec<Recorded>,
    dependencies: Dependencies,
}

/// A diagnostic by YAML path, before it is placed in a file.
#[derive(Clone)]
struct Recorded {
    severity: crate::diag::Severity,
    path: String,
    message: String,
}

struct Validator<'a> {
    set: &'a ConfigSet,
    diags: Diagnostics,
    /// From GatewaySettings, for servers whose `credentialName` is `acme:<issuer>`.
    acme_issuers: Vec<AcmeIssuer>,
    /// While a VirtualService is validated: its diagnostics and lookups, for the cache.
    recording: Option<Vec<Recorded>>,
    dependencies: Option<Dependencies>,
    /// The previous run's results, and what they were validated against.
    previous: ByAddress<ValidatedVirtualService>,
    previous_context: Option<Context>,
    /// Which of the previous results are still valid (set once the context is known).
    changes: Changes,
    /// This run's context, for the next.
    context: Option<Context>,
    /// This run's results, for the next.
    validated: ByAddress<ValidatedVirtualService>,
}

/// Where a value sits: the document and the YAML path inside it.
struct At<'a> {
    origin: &'a Origin,
    path: String,
}

impl Validator<'_> {
    fn error(&mut self, at: At<'_>, message: impl Into<String>) {
        self.report(crate::diag::Severity::Error, at, message.into());
    }

    fn warning(&mut self, at: At<'_>, message: impl Into<String>) {
        self.report(crate::diag::Severity::Warning, at, message.into());
    }

    fn report(&mut self, severity: crate::diag::Severity, at: At<'_>, message: String) {
        if let Some(recording) = &mut self.recording {
            recording.push(Recorded {
                severity,
                path: at.path.clone(),
                message: message.clone(),
            });
        }
        self.replay(at.origin, severity, &at.path, message);
    }

    fn replay(
        &mut self,
        origin: &Origin,
        severity: crate::diag::Severity,
        path: &str,
        message: String,
    ) {
        match severity {
            crate::diag::Severity::Error => self.diags.error(origin, path, message),
            crate::diag::Severity::Warning => self.diags.warning(origin, path, message),
        }
    }

    /// [`Validator::virtual_service`], or its result from the previous run when that is still
    /// valid (see [`ValidateCache`]).
    fn virtual_service_cached(
        &mut self,
        doc: &Document<istio::VirtualServiceSpec>,
        gateway_ids: &BTreeSet<String>,
        services: &BTreeMap<String, Service>,
        subsets: &Subsets,
        upstream_tls: &UpstreamTlsPolicies,
    ) -> std::sync::Arc<VirtualService> {
        let key = address_of(&doc.spec);
        // The same text twice (a duplicate, reported as such) is the same parse: validated once.
        if let Some(twin) = self.validated.get(&key).filter(|t| t.document.is(doc)) {
            let (result, diagnostics) = (twin.result.clone(), twin.diagnostics.clone());
            for d in diagnostics {
                self.replay(&doc.origin, d.severity, &d.path, d.message);
            }
            return result;
        }
        let cached = match self.previous.remove(&key) {
            Some(cached) if cached.document.is(doc) && self.changes.spare(&cached.dependencies) => {
                Some(cached)
            }
            _ => None,
        };
        let validated = match cached {
            Some(cached) => {
                for d in &cached.diagnostics {
                    self.replay(&doc.origin, d.severity, &d.path, d.message.clone());
                }
                cached
            }
            None => {
                self.recording = Some(Vec::new());
                self.dependencies = Some(Dependencies::default());
                let result =
                    self.virtual_service(doc, gateway_ids, services, subsets, upstream_tls);
                ValidatedVirtualService {
                    document: Parsed::of(doc),
                    result: std::sync::Arc::new(result),
                    diagnostics: self.recording.take().unwrap_or_default(),
                    dependencies: self.dependencies.take().unwrap_or_default(),
                }
            }
        };
        let result = validated.result.clone();
        self.validated.insert(key, validated);
        result
    }

    fn run(&mut self) -> Model {
        let settings = self.settings();
        self.acme_issuers = settings.acme_issuers.clone();
        self.duplicates();
        let gateways = self.gateways();
        let services = self.service_entries();
        let (subsets, upstream_tls) = self.destination_rules();
        let gateway_ids: BTreeSet<String> = gateways.iter().map(|g| g.id.clone()).collect();
        let now = Context {
            gateway_ids: gateway_ids.clone(),
            services: services.clone(),
            subsets: subsets.clone(),
            upstream_tls: upstream_tls.clone(),
        };
        if let Some(before) = self.previous_context.take() {
            self.changes = now.changes_since(&before);
        }
        self.context = Some(now);
        let virtual_services = self
            .set
            .virtual_services
            .iter()
            .map(|vs| {
                self.virtual_service_cached(vs, &gateway_ids, &services, &subsets, &upstream_tls)
            })
            .collect();
        if let (Some(mesh_port), Some(doc)) = (settings.mesh_port, self.set.settings.first()) {
            if let Some(gateway) = gateways
                .iter()
                .find(|g| g.servers.iter().any(|s| s.port == mesh_port))
            {
                let message = format!(
                    "meshListener port {mesh_port} is also a server port of Gateway `{}`: use another port",
                    gateway.id
                );
                self.error(
                    At {
                        origin: &doc.origin,
                        path: "spec.meshListener.port".into(),
                    },
                    message,
                );
            }
        }
        let model = Model {
            settings,
            gateways,
            virtual_services,
            services,
            subsets,
            upstream_tls,
            files: self.set.files.clone(),
        };
        self.binding_warnings(&model);
        model
    }

    // ------------------------------------------------------------ GatewaySettings

    fn settings(&mut self) -> Settings {
        let mut settings = Settings::default();
        let docs = &self.set.settings;
        for extra in docs.iter().skip(1) {
            let first = &docs[0].origin;
            self.error(
                At {
                    origin: &extra.origin,
                    path: "kind".into(),
                },
                format!("only one GatewaySettings document is allowed; the first is at {first}"),
            );
        }
        let Some(doc) = docs.first() else {
            return settings;
        };
        let spec = &doc.spec;
        let at = |path: &str| At {
            origin: &doc.origin,
            path: path.into(),
        };
        if let Some(addr) = &spec.bind_address {
            match addr.parse::<IpAddr>() {
                Ok(ip) => settings.bind_address = ip,
                Err(_) => self.error(
                    at("spec.bindAddress"),
                    format!("`{addr}` is not an IP address (example: 0.0.0.0 or 127.0.0.1)"),
                ),
            }
        }
        if let Some(address) = spec.admin.as_ref().and_then(|a| a.address.as_ref()) {
            match address.parse::<SocketAddr>() {
                Ok(a) => settings.admin_address = a,
                Err(_) => self.error(
                    at("spec.admin.address"),
                    format!("`{address}` is not an IP:port address (example: 127.0.0.1:9901)"),
                ),
            }
        }
        if let Some(dir) = &spec.certs_dir {
            settings.certs_dir = dir.into();
        }
        if let Some(mesh) = &spec.mesh_listener {
            settings.mesh_port = self.port(mesh.port, at("spec.meshListener.port"));
        }
        if let Some(rate) = &spec.dns_refresh_rate {
            match parse_duration(rate) {
                Some(d) if d >= Duration::from_millis(100) => settings.dns_refresh = d,
                _ => self.error(
                    at("spec.dnsRefreshRate"),
                    format!("`{rate}` is not a duration of at least 100ms (examples: 5s, 1m)"),
                ),
            }
        }
        if let Some(threads) = spec.threads {
            match usize::try_from(threads) {
                Ok(n @ 1..=256) => settings.threads = n,
                _ => self.error(at("spec.threads"), "threads must be between 1 and 256"),
            }
        }
        if let Some(token_file) = spec.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
            settings.admin_token_file = Some(token_file.into());
        }
        if let Some(pp) = &spec.proxy_protocol {
            let mut trusted = Vec::new();
            for (i, cidr) in pp.trusted_cidrs.iter().enumerate() {
                let parsed = cidr
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| cidr.parse::<IpAddr>().map(ipnet::IpNet::from));
                match parsed {
                    Ok(net) => trusted.push(net),
                    Err(_) => self.error(
                        at(&format!("spec.proxyProtocol.trustedCidrs[{i}]")),
                        format!(
                            "`{cidr}` is not a CIDR (examples: 10.0.0.0/8, 127.0.0.1/32, ::1/128)"
                        ),
                    ),
                }
            }
            if pp.trusted_cidrs.is_empty() {
                self.error(
                    at("spec.proxyProtocol"),
                    "`trustedCidrs` is required: PROXY headers are only believed from these sources",
                );
            }
            let ports = pp.ports.as_ref().map(|list| {
                list.iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        self.port(*p, at(&format!("spec.proxyProtocol.ports[{i}]")))
                    })
                    .collect()
            });
            settings.proxy_protocol = Some(ProxyProtocolSettings {
                trusted,
                allow_without_header: pp.allow_without_header,
                ports,
            });
        }
        if let Some(n) = spec.num_trusted_proxies {
            match u32::try_from(n) {
                Ok(n @ 0..=16) => settings.num_trusted_proxies = n,
                _ => self.error(
                    at("spec.numTrustedProxies"),
                    "numTrustedProxies must be between 0 and 16",
                ),
            }
        }
        for (field, value, slot, max) in [
            (
                "spec.drainSeconds",
                spec.drain_seconds,
                &mut settings.drain,
                3600,
            ),
            (
                "spec.shutdownTimeoutSeconds",
                spec.shutdown_timeout_seconds,
                &mut settings.shutdown_timeout,
                3600,
            ),
        ] {
            if let Some(seconds) = value {
                match u64::try_from(seconds) {
                    Ok(s) if s <= max => *slot = Duration::from_secs(s),
                    _ => self.error(at(field), format!("must be between 0 and {max} seconds")),
                }
            }
        }
        if let Some(port) = spec.health_port {
            settings.health_port = self.port(port, at("spec.healthPort"));
        }
        if let Some(socket) = &spec.upgrade_socket {
            settings.upgrade_socket = socket.into();
        }
        if let Some(log) = &spec.access_log {
            if log.path.is_empty() {
                self.error(
                    at("spec.accessLog.path"),
                    "`path` is required (`/dev/stdout` for the output)",
                );
            }
            if let Some(format) = &log.format {
                // Every `%NAME%` must be a known field, so a typo is an error, not an empty column.
                let mut rest = format.as_str();
                while let Some(start) = rest.find('%') {
                    let after = &rest[start + 1..];
                    let Some(end) = after.find('%') else {
                        self.error(at("spec.accessLog.format"), "a `%` has no closing `%`");
                        break;
                    };
                    let name = &after[..end];
                    if !ACCESS_LOG_FIELDS.contains(&name) {
                        self.error(
                            at("spec.accessLog.format"),
                            format!(
                                "unknown field `%{name}%` (fields: {})",
                                ACCESS_LOG_FIELDS.join(", ")
                            ),
                        );
                    }
                    rest = &after[end + 1..];
                }
            }
            settings.access_log = Some(AccessLog {
                path: log.path.clone().into(),
                format: log.format.clone(),
            });
        }
        if let Some(tracing) = &spec.tracing {
            settings.tracing = self.tracing(tracing, &doc.origin);
        }
        if let Some(acme) = &spec.acme {
            for (i, issuer) in acme.issuers.iter().enumerate() {
                let base = format!("spec.acme.issuers[{i}]");
                if let Some(issuer) = self.acme_issuer(issuer, &base, &doc.origin) {
                    if settings.acme_issuer(&issuer.name).is_some() {
                        self.error(
                            at(&format!("{base}.name")),
                            format!("issuer `{}` is defined twice", issuer.name),
                        );
                    }
                    settings.acme_issuers.push(issuer);
                }
            }
        }
        settings
    }

    fn tracing(
        &mut self,
        spec: &crate::config::settings::TracingSettings,
        origin: &Origin,
    ) -> Option<Tracing> {
        let at = |field: &str| At {
            origin,
            path: format!("spec.tracing{field}"),
        };
        let sampling = spec.sampling.unwrap_or(1.0);
        if !(0.0..=100.0).contains(&sampling) {
            self.error(
                at(".sampling"),
                format!("sampling {sampling} is a percentage: between 0 and 100"),
            );
        }
        let collector = match (&spec.zipkin, &spec.opentelemetry) {
            (Some(zipkin), None) => self
                .collector_endpoint(&zipkin.endpoint, at(".zipkin.endpoint"))
                .map(Collector::Zipkin),
            (None, Some(otel)) => self
                .collector_endpoint(&otel.endpoint, at(".opentelemetry.endpoint"))
                .map(Collector::OpenTelemetry),
            _ => {
                self.error(
                    at(""),
                    "tracing needs exactly one collector: `zipkin` or `opentelemetry` (each with \
                     an `endpoint`)",
                );
                None
            }
        };
        if spec
            .service_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            self.error(at(".serviceName"), "serviceName is empty");
        }
        Some(Tracing {
            sampling: sampling.clamp(0.0, 100.0) / 100.0,
            service_name: spec
                .service_name
                .clone()
                .unwrap_or_else(|| "sluice".to_string()),
            collector: collector?,
        })
    }

    fn collector_endpoint(&mut self, endpoint: &str, at: At<'_>) -> Option<http::Uri> {
        match endpoint.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some()
                    && uri.path() != "/" =>
            {
                Some(uri)
            }
            _ => {
                self.error(
                    at,
                                        format!(
                        "`{endpoint}` is not an http(s) URL with the collector's path (Zipkin: \
                         http://zipkin:9411/api/v2/spans, OpenTelemetry: http://otel:4318/v1/traces)"
                    ),
                );
                None
            }
        }
    }

    fn acme_issuer(
        &mut self,
        spec: &crate::config::settings::AcmeIssuerSpec,
        base: &str,
        origin: &Origin,
    ) -> Option<AcmeIssuer> {
        let at = |field: &str| At {
            origin,
            path: format!("{base}.{field}"),
        };
        let errors_before = self.diags.error_count();
        if check_credential_name(&spec.name).is_err() {
            self.error(
                at("name"),
                format!(
                    "`{}` is not a valid issuer name (lower-case letters, digits, `-` and `.`)",
                    spec.name
                ),
            );
        }
        match http::Uri::try_from(spec.directory_url.as_str()) {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {}
            _ => self.error(
                at("directoryUrl"),
                format!(
                    "`{}` is not an https:// URL (Let's Encrypt: \
                     https://acme-v02.api.letsencrypt.org/directory)",
                    spec.directory_url
                ),
            ),
        }
        if let Some(email) = &spec.email {
            let plausible = email.split_once('@').is_some_and(|(user, domain)| {
                !user.is_empty() && domain.contains('.') && !email.contains([' ', ',', '\n'])
            });
            if !plausible {
                self.error(at("email"), format!("`{email}` is not an email address"));
            }
        }
        let challenge = match spec.challenge.as_deref() {
            None | Some("http-01") => AcmeChallenge::Http01,
            Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
            Some(other) => {
                self.error(
                    at("challenge"),
                    format!("unknown challenge `{other}`: use http-01 or tls-alpn-01"),
                );
                AcmeChallenge::Http01
            }
        };
        let key_type = match spec.key_type.as_deref() {
            None | Some("ECDSA_P256") => AcmeKeyType::EcdsaP256,
            Some("ECDSA_P384") => AcmeKeyType::EcdsaP384,
            Some("RSA_2048") => AcmeKeyType::Rsa2048,
            Some(other) => {
                self.error(
                    at("keyType"),
                    format!("unknown keyType `{other}`: use ECDSA_P256, ECDSA_P384 or RSA_2048"),
                );
                AcmeKeyType::EcdsaP256
            }
        };
        const DAY: u64 = 86_400;
        let mut duration =
            |field: &str, value: &Option<String>, default: Duration, max_days: u64| match value {
                None => default,
                Some(text) => match parse_duration(text) {
                    Some(d)
                        if d >= Duration::from_secs(1)
                            && d <= Duration::from_secs(max_days * DAY) =>
                    {
                        d
                    }
                    _ => {
                        self.error(
                            at(field),
                            format!(
                            "`{text}` is not a duration between 1s and {}h (examples: 30s, 720h)",
                            max_days * 24
                        ),
                        );
                        default
                    }
                },
            };
        let renew_before = spec
            .renew_before
            .as_ref()
            .map(|_| duration("renewBefore", &spec.renew_before, Duration::ZERO, 365));
        let min_retry_interval = duration(
            "minRetryInterval",
            &spec.min_retry_interval,
            Duration::from_secs(60),
            30,
        );
        let max_retry_interval = duration(
            "maxRetryInterval",
            &spec.max_retry_interval,
            Duration::from_secs(6 * 3600),
            30,
        );
        if max_retry_interval < min_retry_interval {
            self.error(
                at("maxRetryInterval"),
                "maxRetryInterval is shorter than minRetryInterval",
            );
        }
        let eab = spec.eab.as_ref().map(|eab| AcmeEab {
            kid: eab.kid.clone(),
            hmac_key_file: eab.hmac_key_file.clone().into(),
        });
        if spec.eab.as_ref().is_some_and(|e| e.kid.is_empty()) {
            self.error(at("eab.kid"), "`kid` is required (the CA's key identifier)");
        }
        (self.diags.error_count() == errors_before).then(|| AcmeIssuer {
            name: spec.name.clone(),
            directory_url: spec.directory_url.clone(),
            email: spec.email.clone(),
            ca_bundle: spec.ca_bundle.clone().map(Into::into),
            challenge,
            eab,
            renew_before,
            key_type,
            min_retry_interval,
            max_retry_interval,
        })
    }

    fn port(&mut self, number: i64, at: At<'_>) -> Option<u16> {
        match u16::try_from(number) {
            Ok(port) if port > 0 => Some(port),
            _ => {
                self.error(at, format!("port {number} is out of range 1-65535"));
                None
            }
        }
    }

    // ------------------------------------------------------------ duplicates

    fn duplicates(&mut self) {
        fn check<T>(v: &mut Validator<'_>, kind: &str, docs: &[Document<T>]) {
            let mut seen: HashMap<(&str, &str), &Origin> = HashMap::with_capacity(docs.len());
            for doc in docs {
                if doc.metadata.name.is_empty() {
                    continue;
                }
                let id = (doc.metadata.namespace(), doc.metadata.name.as_str());
                if let Some(first) = seen.get(&id) {
                    let message = format!(
                        "duplicate {kind} `{}`: already defined at {first}",
                        doc.id()
                    );
                    v.error(
                        At {
                            origin: &doc.origin,
                            path: "metadata.name".into(),
                        },
                        message,
                    );
                } else {
                    seen.insert(id, &doc.origin);
                }
            }
        }
        let set = self.set;
        check(self, "Gateway", &set.gateways);
        check(self, "VirtualService", &set.virtual_services);
        check(self, "DestinationRule", &set.destination_rules);
        check(self, "ServiceEntry", &set.service_entries);
    }

    // ------------------------------------------------------------ Gateway

    fn gateways(&mut self) -> Vec<Gateway> {
        let set = self.set;
        let mut protocols_by_port: HashMap<u16, (ServerProtocol, String)> = HashMap::new();
        // On a TLS port a name chooses the certificate (or passthrough): it must be unambiguous.
        let mut tls_names: HashMap<(u16, HostPattern), String> = HashMap::new();
        let mut out = Vec::new();
        for doc in &set.gateways {
            let mut servers = Vec::new();
            if doc.spec.servers.is_empty() {
                self.error(
                    At {
                        origin: &doc.origin,
                        path: "spec".into(),
                    },
                    "a Gateway needs at least one entry in `spec.servers`",
                );
            }
            for (i, server) in doc.spec.servers.iter().enumerate() {
                let base = format!("spec.servers[{i}]");
                if let Some(server) = self.server(doc, server, &base) {
                    match protocols_by_port.get(&server.port) {
                        Some((protocol, first))
                            if protocol.family() != server.protocol.family() =>
                        {
                            let message = format!(
                                "port {} is already served by {first} with {protocol:?}: plaintext HTTP, \
                                 TLS and TCP servers cannot share a port",
                                server.port
                            );
                            self.error(
                                At {
                                    origin: &doc.origin,
                                    path: format!("{base}.port.protocol"),
                                },
                                message,
                            );
                        }
                        _ => {
                            protocols_by_port.insert(server.port, (server.protocol, doc.id()));
                        }
                    }
                    if server.protocol.is_tls() {
                        for (j, host) in server.hosts.iter().enumerate() {
                            let key = (server.port, host.host.clone());
                            let here = format!("{} {base}", doc.id());
                            if let Some(first) = tls_names.get(&key) {
                                let message = format!(
                                    "`{}` on TLS port {} is already served by {first}: a TLS name can \
                                     belong to one server only",
                                    host.host, server.port
                                );
                                self.error(
                                    At {
                                        origin: &doc.origin,
                                        path: format!("{base}.hosts[{j}]"),
                                    },
                                    message,
                                );
                            } else {
                                tls_names.insert(key, here);
                            }
                        }
                    }
                    servers.push(server);
                }
            }
            out.push(Gateway {
                id: doc.id(),
                servers,
            });
        }
        out
    }

    fn server(
        &mut self,
        doc: &Document<istio::GatewaySpec>,
        server: &istio::Server,
        base: &str,
    ) -> Option<Server> {
        let origin = &doc.origin;
        let port_path = format!("{base}.port.number");
        let port = self.port(
            server.port.number,
            At {
                origin,
                path: port_path.clone(),
            },
        );
        let protocol_path = format!("{base}.port.protocol");
        let protocol = match server.port.protocol.to_ascii_uppercase().as_str() {
            "HTTP" => Some(ServerProtocol::Http),
            "HTTP2" => Some(ServerProtocol::Http2),
            "GRPC" => Some(ServerProtocol::Grpc),
            "HTTPS" => Some(ServerProtocol::Https),
            "TLS" => Some(ServerProtocol::Tls),
            "TCP" => Some(ServerProtocol::Tcp),
            "GRPC-WEB" | "MONGO" => {
                self.error(
                    At {
                        origin,
                        path: protocol_path.clone(),
                    },
                    format!(
                        "`{base}.port.protocol` {} is not supported yet (supported: HTTP, HTTP2, GRPC, HTTPS, TLS, TCP)",
                        server.port.protocol
                    ),
                );
                None
            }
            other => {
                self.error(
                    At {
                        origin,
                        path: protocol_path.clone(),
                    },
                    format!(
                        "unknown protocol `{other}`: Istio's protocols are HTTP, HTTPS, HTTP2, GRPC, \
                         GRPC-WEB, TCP, TLS, MONGO"
                    ),
                );
                None
            }
        };
        let (tls, https_redirect) = match protocol {
            Some(protocol) => self.server_tls(origin, server, base, protocol),
            None => (None, false),
        };
        if server.hosts.is_empty() {
            self.error(
                At {
                    origin,
                    path: base.into(),
                },
                "a server needs at least one entry in `hosts` (use `*` for every host)",
            );
        }
        let mut hosts = Vec::new();
        for (j, raw) in server.hosts.iter().enumerate() {
            let path = format!("{base}.hosts[{j}]");
            let (namespaces, host) = match raw.split_once('/') {
                Some(("*", host)) => (NamespaceFilter::Any, host),
                Some((".", host)) => (
                    NamespaceFilter::Only(doc.metadata.namespace().to_string()),
                    host,
                ),
                Some(("", _)) => {
                    self.error(
                        At {
                            origin,
                            path: path.clone(),
                        },
                        format!(
                            "`{raw}`: the namespace before `/` is empty (use `*/`, `./` or a name)"
                        ),
                    );
                    continue;
                }
                Some((ns, host)) => (NamespaceFilter::Only(ns.to_string()), host),
                None => (NamespaceFilter::Any, raw.as_str()),
            };
            match HostPattern::parse(host) {
                Ok(host) => hosts.push(ServerHost { namespaces, host }),
                Err(e) => self.error(
                    At {
                        origin,
                        path: path.clone(),
                    },
                    e,
                ),
            }
        }
        Some(Server {
            port: port?,
            protocol: protocol?,
            hosts,
            tls,
            https_redirect,
        })
    }

    /// Checks a server's `tls` block against its protocol. Returns the validated settings for
    /// HTTPS/TLS servers and whether a plaintext server redirects to https.
    fn server_tls(
        &mut self,
        origin: &Origin,
        server: &istio::Server,
        base: &str,
        protocol: ServerProtocol,
    ) -> (Option<ServerTls>, bool) {
        let at = |p: &str| At {
            origin,
            path: p.into(),
        };
        let tls_path = format!("{base}.tls");
        let Some(tls) = &server.tls else {
            if protocol.is_tls() {
                let what = if protocol == ServerProtocol::Https {
                    "an HTTPS"
                } else {
                    "a TLS"
                };
                self.error(
                    at(base),
                    format!(
                        "{what} server needs `tls` (`mode: SIMPLE` with `credentialName`, or \
                         `mode: PASSTHROUGH`)"
                    ),
                );
            }
            return (None, false);
        };
        if !protocol.is_tls() {
            let only_redirect = tls.mode.is_none()
                && tls.server_certificate.is_none()
                && tls.private_key.is_none()
                && tls.credential_name.is_none()
                && tls.ca_certificates.is_none()
                && tls.min_protocol_version.is_none()
                && tls.max_protocol_version.is_none()
                && tls.cipher_suites.is_none();
            if !only_redirect {
                self.error(
                    at(&tls_path),
                    "a plaintext server accepts only `tls.httpsRedirect`; certificates belong to an \
                     HTTPS server",
                );
            }
            return (None, tls.https_redirect);
        }
        if tls.https_redirect {
            self.error(
                at(&format!("{tls_path}.httpsRedirect")),
                "`httpsRedirect` belongs on the plaintext (HTTP) server that should redirect",
            );
        }
        // Istio's default mode is PASSTHROUGH (the enum's zero value).
        let mode = match tls.mode.as_deref().unwrap_or("PASSTHROUGH") {
            "SIMPLE" => TlsMode::Simple,
            "MUTUAL" => TlsMode::Mutual,
            "OPTIONAL_MUTUAL" => TlsMode::OptionalMutual,
            "PASSTHROUGH" => TlsMode::Passthrough,
            "ISTIO_MUTUAL" | "AUTO_PASSTHROUGH" => {
                self.error(
                    at(&format!("{tls_path}.mode")),
                    format!(
                        "`{tls_path}.mode` {} is not supported yet (mesh mTLS)",
                        tls.mode.as_deref().unwrap_or("")
                    ),
                );
                return (None, false);
            }
            other => {
                self.error(
                    at(&format!("{tls_path}.mode")),
                    format!("unknown TLS mode `{other}`: use SIMPLE, MUTUAL, OPTIONAL_MUTUAL or PASSTHROUGH"),
                );
                return (None, false);
            }
        };
        if protocol == ServerProtocol::Tls && mode != TlsMode::Passthrough {
            self.error(
                at(&format!("{tls_path}.mode")),
                "terminating TLS on a `TLS` server (to route TCP) is not supported yet: use \
                 PASSTHROUGH, or protocol HTTPS to route HTTP",
            );
            return (None, false);
        }
        let credential = match (
            &tls.credential_name,
            &tls.server_certificate,
            &tls.private_key,
        ) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                self.error(
                    at(&tls_path),
                    "use either `credentialName` or `serverCertificate` + `privateKey`, not both",
                );
                return (None, false);
            }
            (Some(name), None, None) if name.starts_with(ACME_CREDENTIAL) => {
                let issuer = &name[ACME_CREDENTIAL.len()..];
                if self.acme_issuers.iter().all(|i| i.name != issuer) {
                    let known: Vec<&str> =
                        self.acme_issuers.iter().map(|i| i.name.as_str()).collect();
                    self.error(
                        at(&format!("{tls_path}.credentialName")),
                        format!(
                            "no ACME issuer `{issuer}` in GatewaySettings spec.acme.issuers \
                             (defined: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                    return (None, false);
                }
                for (j, host) in server.hosts.iter().enumerate() {
                    let name = host.rsplit('/').next().unwrap_or(host);
                    if !matches!(HostPattern::parse(name), Ok(HostPattern::Exact(_))) {
                        self.error(
                            at(&format!("{base}.hosts[{j}]")),
                            format!(
                                "`{host}`: ACME certificates (http-01, tls-alpn-01) cover exact \
                                 names only; list each name, or use a credentialName for a \
                                 wildcard certificate"
                            ),
                        );
                    }
                }
                Some(Credential::Acme(issuer.to_string()))
            }
            (Some(name), None, None) => {
                if let Err(e) = check_credential_name(name) {
                    self.error(at(&format!("{tls_path}.credentialName")), e);
                    return (None, false);
                }
                Some(Credential::Name(name.clone()))
            }
            (None, Some(cert), Some(key)) => Some(Credential::Files {
                certificate: cert.into(),
                private_key: key.into(),
            }),
            (None, Some(_), None) | (None, None, Some(_)) => {
                self.error(
                    at(&tls_path),
                    "`serverCertificate` and `privateKey` go together",
                );
                return (None, false);
            }
            (None, None, None) => None,
        };
        if mode == TlsMode::Passthrough {
            if credential.is_some() || tls.ca_certificates.is_some() {
                self.error(
                    at(&tls_path),
                    "PASSTHROUGH does not terminate TLS: remove the certificate fields (or use SIMPLE)",
                );
            }
        } else if credential.is_none() {
            self.error(
                at(&tls_path),
                "a terminating server needs `credentialName` (files under certsDir) or \
                 `serverCertificate` + `privateKey`",
            );
            return (None, false);
        }
        let mutual = matches!(mode, TlsMode::Mutual | TlsMode::OptionalMutual);
        if mutual
            && tls.ca_certificates.is_none()
            && !matches!(credential, Some(Credential::Name(_)))
        {
            self.error(
                at(&tls_path),
                "MUTUAL needs `caCertificates` (or a `credentialName` whose CA is stored beside it)",
            );
        }
        if !mutual && tls.ca_certificates.is_some() {
            self.error(
                at(&format!("{tls_path}.caCertificates")),
                "`caCertificates` verifies client certificates: use mode MUTUAL or OPTIONAL_MUTUAL",
            );
        }
        let mut version = |field: &str,
                           value: &Option<String>,
                           default: TlsVersion|
         -> TlsVersion {
            match value.as_deref() {
                None | Some("TLS_AUTO") => default,
                Some("TLSV1_2") => TlsVersion::Tls12,
                Some("TLSV1_3") => TlsVersion::Tls13,
                Some(old @ ("TLSV1_0" | "TLSV1_1")) => {
                    self.error(
                        at(&format!("{tls_path}.{field}")),
                        format!("{old} is refused: Sluice speaks TLS 1.2 and 1.3 only"),
                    );
                    default
                }
                Some(other) => {
                    self.error(
                        at(&format!("{tls_path}.{field}")),
                        format!("unknown TLS version `{other}`: use TLSV1_2, TLSV1_3 or TLS_AUTO"),
                    );
                    default
                }
            }
        };
        let min_version = version(
            "minProtocolVersion",
            &tls.min_protocol_version,
            TlsVersion::Tls12,
        );
        let max_version = version(
            "maxProtocolVersion",
            &tls.max_protocol_version,
            TlsVersion::Tls13,
        );
        if min_version > max_version {
            self.error(
                at(&format!("{tls_path}.minProtocolVersion")),
                "minProtocolVersion is above maxProtocolVersion",
            );
        }
        let mut cipher_suites = Vec::new();
        for (i, suite) in tls.cipher_suites.iter().flatten().enumerate() {
            if CIPHER_SUITES.contains(&suite.as_str()) {
                cipher_suites.push(suite.clone());
            } else {
                self.error(
                    at(&format!("{tls_path}.cipherSuites[{i}]")),
                    format!(
                        "cipher suite `{suite}` is not offered (TLS 1.2 suites available: {})",
                        CIPHER_SUITES.join(", ")
                    ),
                );
            }
        }
        let position = origin.position_of(&tls_path);
        (
            Some(ServerTls {
                mode,
                credential,
                ca_certificates: tls.ca_certificates.as_ref().map(Into::into),
                min_version,
                max_version,
                cipher_suites,
                written: Written {
                    file: origin.file_name().to_path_buf(),
                    position,
                },
            }),
            false,
        )
    }

    // ------------------------------------------------------------ ServiceEntry

    fn service_entries(&mut self) -> BTreeMap<String, Service> {
        let set = self.set;
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut defined_at: HashMap<String, &Origin> = HashMap::new();
        for doc in &set.service_entries {
            let origin = &doc.origin;
            let spec = &doc.spec;
            let at = |path: &str| At {
                origin,
                path: path.into(),
            };
            let resolution = spec.resolution.unwrap_or(istio::Resolution::None);
            if resolution == istio::Resolution::None {
                self.error(
                    at("spec.resolution"),
                    "`spec.resolution` must be STATIC or DNS: NONE (Istio's default) forwards to the \
                     address the client dialed, which a gateway does not have",
                );
            }
            if spec.hosts.is_empty() {
                self.error(
                    at("spec"),
                    "a ServiceEntry needs at least one entry in `hosts`",
                );
            }
            let mut ports = Vec::new();
            if spec.ports.is_empty() {
                self.error(
                    at("spec"),
                    "a ServiceEntry needs at least one entry in `ports`",
                );
            }
            for (i, p) in spec.ports.iter().enumerate() {
                let number = self.port(p.number, at(&format!("spec.ports[{i}].number")));
                let target_port = p
                    .target_port
                    .and_then(|t| self.port(t, at(&format!("spec.ports[{i}].targetPort"))));
                let http = match p
                    .protocol
                    .as_deref()
                    .map(str::to_ascii_uppercase)
                    .as_deref()
                {
                    None | Some("HTTP") => Ok(UpstreamProtocol::Http1),
                    Some("HTTP2" | "GRPC" | "GRPC-WEB") => Ok(UpstreamProtocol::Http2),
                    Some("HTTPS" | "TLS") => Ok(UpstreamProtocol::Http1),
                    Some(other @ ("TCP" | "MONGO" | "MYSQL" | "REDIS" | "UDP")) => {
                        Err(format!("protocol {other} cannot carry HTTP routes"))
                    }
                    Some(other) => {
                        self.error(
                            at(&format!("spec.ports[{i}].protocol")),
                            format!(
                                "unknown protocol `{other}`: Istio's protocols are HTTP, HTTPS, \
                                 HTTP2, GRPC, GRPC-WEB, TCP, TLS, MONGO, MYSQL, REDIS, UDP"
                            ),
                        );
                        continue;
                    }
                };
                let tls = matches!(
                    p.protocol
                        .as_deref()
                        .map(str::to_ascii_uppercase)
                        .as_deref(),
                    Some("HTTPS" | "TLS")
                );
                if let Some(number) = number {
                    ports.push(ServicePortModel {
                        number,
                        name: p.name.clone(),
                        target_port,
                        http,
                        tls,
                    });
                }
            }
            let mut endpoints = Vec::new();
            for (i, e) in spec.endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}].address");
                let Some(address) = e.address.as_deref() else {
                    self.error(
                        at(&format!("spec.endpoints[{i}]")),
                        "endpoint needs an `address`",
                    );
                    continue;
                };
                let address = match (address.parse::<IpAddr>(), resolution) {
                    (Ok(ip), _) => EndpointAddress::Ip(ip),
                    (Err(_), istio::Resolution::Static) => {
                        self.error(
                            at(&path),
                            format!(
                                "`{address}` is not an IP address: resolution STATIC needs IP \
                                 endpoints (use resolution: DNS for host names)"
                            ),
                        );
                        continue;
                    }
                    (Err(_), _) => match check_dns_name(address) {
                        Ok(()) => EndpointAddress::Dns(address.to_ascii_lowercase()),
                        Err(e) => {
                            self.error(at(&path), e);
                            continue;
                        }
                    },
                };
                let mut endpoint_ports = BTreeMap::new();
                for (name, number) in &e.ports {
                    let port_path = format!("spec.endpoints[{i}].ports.{name}");
                    if !ports.iter().any(|p| p.name.as_deref() == Some(name)) {
                        self.error(
                            at(&port_path),
                            format!("no entry in `spec.ports` is named `{name}`"),
                        );
                    }
                    if let Some(port) = self.port(*number, at(&port_path)) {
                        endpoint_ports.insert(name.clone(), port);
                    }
                }
                endpoints.push(WorkloadEndpoint {
                    address,
                    ports: endpoint_ports,
                    labels: e.labels.0.clone(),
                });
            }
            if spec.endpoints.is_empty() && resolution == istio::Resolution::Static {
                self.error(
                    at("spec"),
                    "resolution STATIC needs `endpoints` (IP addresses of the service's instances)",
                );
            }
            for (i, raw) in spec.hosts.iter().enumerate() {
                let path = format!("spec.hosts[{i}]");
                let host = raw.to_ascii_lowercase();
                if let Err(e) = check_dns_name(&host) {
                    let hint = if host.contains('*') {
                        "wildcard hosts need resolution NONE, which a gateway cannot use"
                            .to_string()
                    } else {
                        e
                    };
                    self.error(at(&path), hint);
                    continue;
                }
                if let Some(first) = defined_at.get(&host) {
                    let message =
                        format!("host `{host}` is already defined by the ServiceEntry at {first}");
                    self.error(at(&path), message);
                    continue;
                }
                defined_at.insert(host.clone(), origin);
                let endpoints = if endpoints.is_empty() {
                    // DNS resolution without endpoints resolves the host itself.
                    vec![WorkloadEndpoint {
                        address: EndpointAddress::Dns(host.clone()),
                        ports: BTreeMap::new(),
                        labels: BTreeMap::new(),
                    }]
                } else {
                    endpoints.clone()
                };
                services.insert(
                    host.clone(),
                    Service {
                        host,
                        ports: ports.clone(),
                        endpoints,
                    },
                );
            }
        }
        services
    }

    // ------------------------------------------------------------ DestinationRule

    fn destination_rules(&mut self) -> (Subsets, UpstreamTlsPolicies) {
        let set = self.set;
        let mut subsets = BTreeMap::new();
        let mut policies = BTreeMap::new();
        let mut rule_for_host: HashMap<String, &Origin> = HashMap::new();
        for doc in &set.destination_rules {
            let origin = &doc.origin;
            let at = |path: &str| At {
                origin,
                path: path.into(),
            };
            let host = expand_short_name(&doc.spec.host, doc.metadata.namespace());
            if let Err(e) = check_dns_name(&host) {
                self.error(at("spec.host"), e);
                continue;
            }
            if let Some(first) = rule_for_host.get(&host) {
                let message = format!("host `{host}` already has a DestinationRule, at {first}");
                self.error(at("spec.host"), message);
                continue;
            }
            rule_for_host.insert(host.clone(), origin);
            if let Some(policy) = &doc.spec.traffic_policy {
                if let Some(tls) = self.upstream_tls(origin, policy, "spec.trafficPolicy") {
                    policies.insert((host.clone(), None), tls);
                }
            }
            for (i, subset) in doc.spec.subsets.iter().enumerate() {
                if let Some(policy) = &subset.traffic_policy {
                    let base = format!("spec.subsets[{i}].trafficPolicy");
                    if let Some(tls) = self.upstream_tls(origin, policy, &base) {
                        policies.insert((host.clone(), Some(subset.name.clone())), tls);
                    }
                }
                let path = format!("spec.subsets[{i}].name");
                if subset.name.is_empty() {
                    self.error(at(&path), "subset needs a `name`");
                    continue;
                }
                let key = (host.clone(), subset.name.clone());
                if subsets.contains_key(&key) {
                    let message = format!("duplicate subset `{}`", subset.name);
                    self.error(at(&path), message);
                    continue;
                }
                subsets.insert(key, subset.labels.0.clone());
            }
        }
        (subsets, policies)
    }

    /// `trafficPolicy.tls`. Returns `Some(None)` for an explicit DISABLE, `None` when absent or
    /// invalid.
    fn upstream_tls(
        &mut self,
        origin: &Origin,
        policy: &istio::TrafficPolicy,
        base: &str,
    ) -> Option<Option<UpstreamTls>> {
        let tls = policy.tls.as_ref()?;
        let at = |p: &str| At {
            origin,
            path: p.into(),
        };
        let path = format!("{base}.tls");
        let mode = tls.mode.as_deref().unwrap_or("DISABLE");
        let client_certificate = match (&tls.client_certificate, &tls.private_key) {
            (Some(cert), Some(key)) => Some((cert.into(), key.into())),
            (None, None) => None,
            _ => {
                self.error(
                    at(&path),
                    "`clientCertificate` and `privateKey` go together",
                );
                return None;
            }
        };
        match mode {
            "DISABLE" => Some(None),
            "SIMPLE" | "MUTUAL" => {
                if mode == "MUTUAL" && client_certificate.is_none() {
                    self.error(
                        at(&path),
                        "MUTUAL needs `clientCertificate` and `privateKey`",
                    );
                    return None;
                }
                if mode == "SIMPLE" && client_certificate.is_some() {
                    self.error(
                        at(&path),
                        "SIMPLE sends no client certificate: remove `clientCertificate`/`privateKey` or use MUTUAL",
                    );
                    return None;
                }
                if let Some(sni) = &tls.sni {
                    if let Err(e) = check_dns_name(sni) {
                        self.error(at(&format!("{path}.sni")), e);
                        return None;
                    }
                }
                Some(Some(UpstreamTls {
                    sni: tls.sni.clone(),
                    ca_certificates: tls.ca_certificates.as_ref().map(Into::into),
                    client_certificate,
                    insecure_skip_verify: tls.insecure_skip_verify.unwrap_or(false),
                }))
            }
            "ISTIO_MUTUAL" => {
                self.error(
                    at(&format!("{path}.mode")),
                    format!("`{path}.mode` ISTIO_MUTUAL is not supported yet (mesh mTLS)"),
                );
                None
            }
            other => {
                self.error(
                    at(&format!("{path}.mode")),
                    format!("unknown TLS mode `{other}`: use DISABLE, SIMPLE or MUTUAL"),
                );
                None
            }
        }
    }

    // ------------------------------------------------------------ VirtualService

    fn virtual_service(
        &mut self,
        doc: &Document<istio::VirtualServiceSpec>,
        gateway_ids: &BTreeSet<String>,
        services: &BTreeMap<String, Service>,
        subsets: &Subsets,
        upstream_tls: &UpstreamTlsPolicies,
    ) -> VirtualService {
        let origin = &doc.origin;
        let namespace = doc.metadata.namespace().to_string();
        let at = |path: &str| At {
            origin,
            path: path.into(),
        };
        if doc.spec.hosts.is_empty() {
            self.error(
                at("spec"),
                "a VirtualService needs at least one entry in `hosts`",
            );
        }
        let mut hosts = Vec::new();
        for (i, raw) in doc.spec.hosts.iter().enumerate() {
            match HostPattern::parse(&expand_short_name(raw, &namespace)) {
                Ok(h) => hosts.push(h),
                Err(e) => self.error(at(&format!("spec.hosts[{i}]")), e),
            }
        }
        let bindings = if doc.spec.gateways.is_empty() {
            vec![Binding::Mesh]
        } else {
            let mut bindings = Vec::new();
            for (i, name) in doc.spec.gateways.iter().enumerate() {
                if let Some(b) = self.gateway_ref(
                    name,
                    &namespace,
                    gateway_ids,
                    at(&format!("spec.gateways[{i}]")),
                ) {
                    bindings.push(b);
                }
            }
            bindings
        };
        let mut http = Vec::new();
        let mut catch_all_at: Option<usize> = None;
        for (i, route) in doc.spec.http.iter().enumerate() {
            let base = format!("spec.http[{i}]");
            if let Some(first) = catch_all_at {
                self.warning(
                    at(&base),
                    format!(
                        "`{base}` is unreachable: `spec.http[{first}]` before it matches every \
                         request, and the first matching route wins"
                    ),
                );
            }
            let ctx = RouteCtx {
                origin,
                base: &base,
                namespace: &namespace,
                gateway_ids,
                services,
                subsets,
                upstream_tls,
            };
            if let Some(compiled) = self.http_route(&ctx, route, &doc.id(), i) {
                http.push(std::sync::Arc::new(compiled));
            }
            if catch_all_at.is_none() && matches_everything(route) {
                catch_all_at = Some(i);
            }
        }
        let l4_ctx = RouteCtx {
            origin,
            base: "",
            namespace: &namespace,
            gateway_ids,
            services,
            subsets,
            upstream_tls,
        };
        let tls = doc
            .spec
            .tls
            .iter()
            .enumerate()
            .filter_map(|(i, route)| self.tls_route(&l4_ctx, &hosts, route, &doc.id(), i))
            .collect();
        let tcp = doc
            .spec
            .tcp
            .iter()
            .enumerate()
            .filter_map(|(i, route)| self.tcp_route(&l4_ctx, route, &doc.id(), i))
            .collect();
        for (i, route) in doc.spec.http.iter().enumerate() {
            for (j, m) in route.matches.iter().enumerate() {
                for (k, name) in m.gateways.iter().flatten().enumerate() {
                    let binding = if name == "mesh" {
                        Binding::Mesh
                    } else if name.contains('/') {
                        Binding::Gateway(name.clone())
                    } else {
                        Binding::Gateway(format!("{namespace}/{name}"))
                    };
                    if !bindings.contains(&binding) {
                        self.warning(
                            at(&format!("spec.http[{i}].match[{j}].gateways[{k}]")),
                            format!(
                                "`{name}` is not in this VirtualService's `gateways`, so this match \
                                 block never applies"
                            ),
                        );
                    }
                }
            }
        }
        VirtualService {
            id: doc.id(),
            namespace,
            hosts,
            bindings,
            http,
            tls,
            tcp,
        }
    }

    fn tls_route(
        &mut self,
        ctx: &RouteCtx<'_>,
        vs_hosts: &[HostPattern],
        route: &istio::TlsRoute,
        vs_id: &str,
        index: usize,
    ) -> Option<TlsRoute> {
        let origin = ctx.origin;
        let base = format!("spec.tls[{index}]");
        let at = |p: &str| At {
            origin,
            path: p.into(),
        };
        if route.matches.is_empty() {
            self.error(
                at(&base),
                "a TLS route needs `match` with `sniHosts` (the names it routes)",
            );
            return None;
        }
        let mut ok = true;
        let mut matches = Vec::with_capacity(route.matches.len());
        for (j, m) in route.matches.iter().enumerate() {
            let path = format!("{base}.match[{j}]");
            if m.sni_hosts.is_empty() {
                self.error(at(&path), "`sniHosts` is required in a TLS route match");
                ok = false;
            }
            let mut sni_hosts = Vec::new();
            for (k, raw) in m.sni_hosts.iter().enumerate() {
                let sni_path = format!("{path}.sniHosts[{k}]");
                // Istio: every SNI host must be within the VirtualService's hosts (equal or
                // more specific), so a route cannot claim names another team's service owns.
                match HostPattern::parse(&expand_short_name(raw, ctx.namespace)) {
                    Ok(sni)
                        if vs_hosts
                            .iter()
                            .any(|h| h.intersect(&sni).as_ref() == Some(&sni)) =>
                    {
                        sni_hosts.push(sni)
                    }
                    Ok(sni) => {
                        self.error(
                            at(&sni_path),
                            format!("SNI host `{sni}` is not one of this VirtualService's `hosts`"),
                        );
                        ok = false;
                    }
                    Err(e) => {
                        self.error(at(&sni_path), e);
                        ok = false;
                    }
                }
            }
            let port = match m.port {
                Some(p) => {
                    let port = self.port(p, at(&format!("{path}.port")));
                    ok &= port.is_some();
                    port
                }
                None => None,
            };
            matches.push(TlsMatch {
                sni_hosts,
                port,
                gateways: self.match_gateways(ctx, m.gateways.as_ref(), &path),
            });
        }
        let destinations = self.l4_destinations(ctx, &route.route, &base)?;
        ok.then(|| TlsRoute {
            label: format!("{vs_id} tls[{index}]"),
            matches,
            destinations,
        })
    }

    fn tcp_route(
        &mut self,
        ctx: &RouteCtx<'_>,
        route: &istio::TcpRoute,
        vs_id: &str,
        index: usize,
    ) -> Option<TcpRoute> {
        let origin = ctx.origin;
        let base = format!("spec.tcp[{index}]");
        let mut ok = true;
        let mut matches = Vec::with_capacity(route.matches.len());
        for (j, m) in route.matches.iter().enumerate() {
            let path = format!("{base}.match[{j}]");
            let port = match m.port {
                Some(p) => {
                    let port = self.port(
                        p,
                        At {
                            origin,
                            path: format!("{path}.port"),
                        },
                    );
                    ok &= port.is_some();
                    port
                }
                None => None,
            };
            matches.push(L4Match {
                port,
                gateways: self.match_gateways(ctx, m.gateways.as_ref(), &path),
            });
        }
        let destinations = self.l4_destinations(ctx, &route.route, &base)?;
        ok.then(|| TcpRoute {
            label: format!("{vs_id} tcp[{index}]"),
            matches,
            destinations,
        })
    }

    fn match_gateways(
        &mut self,
        ctx: &RouteCtx<'_>,
        gateways: Option<&Vec<String>>,
        path: &str,
    ) -> Option<Vec<String>> {
        let list = gateways?;
        let mut refs = Vec::new();
        for (i, name) in list.iter().enumerate() {
            let at = At {
                origin: ctx.origin,
                path: format!("{path}.gateways[{i}]"),
            };
            match self.gateway_ref(name, ctx.namespace, ctx.gateway_ids, at) {
                Some(Binding::Gateway(id)) => refs.push(id),
                Some(Binding::Mesh) => refs.push("mesh".to_string()),
                None => {}
            }
        }
        Some(refs)
    }

    /// Destinations of a TLS or TCP route: weighted like HTTP ones, without header rules.
    fn l4_destinations(
        &mut self,
        ctx: &RouteCtx<'_>,
        route: &[istio::L4RouteDestination],
        base: &str,
    ) -> Option<Vec<RouteDestination>> {
        if route.is_empty() {
            self.error(
                At {
                    origin: ctx.origin,
                    path: base.into(),
                },
                format!("`{base}` needs `route` with at least one destination"),
            );
            return None;
        }
        let as_http: Vec<istio::HttpRouteDestination> = route
            .iter()
            .map(|d| istio::HttpRouteDestination {
                destination: d.destination.clone(),
                weight: d.weight,
                headers: None,
            })
            .collect();
        let l4 = RouteCtx { base, ..*ctx };
        self.weighted_destinations(&l4, &as_http, true)
    }

    fn gateway_ref(
        &mut self,
        name: &str,
        namespace: &str,
        gateway_ids: &BTreeSet<String>,
        at: At<'_>,
    ) -> Option<Binding> {
        if name == "mesh" {
            return Some(Binding::Mesh);
        }
        let id = if name.contains('/') {
            name.to_string()
        } else {
            format!("{namespace}/{name}")
        };
        if let Some(dependencies) = &mut self.dependencies {
            dependencies.all_gateways |= !gateway_ids.contains(&id);
            add_once(&mut dependencies.gateways, id.clone());
        }
        if gateway_ids.contains(&id) {
            return Some(Binding::Gateway(id));
        }
        let known: Vec<&str> = gateway_ids.iter().map(String::as_str).collect();
        self.error(
            at,
            format!(
                "gateway `{id}` is not defined (known: {}); a Gateway in another namespace is \
                 referenced as `namespace/name`",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        );
        None
    }

    fn http_route(
        &mut self,
        ctx: &RouteCtx<'_>,
        route: &istio::HttpRoute,
        vs_id: &str,
        index: usize,
    ) -> Option<HttpRoute> {
        let base = ctx.base;
        let at = |path: &str| At {
            origin: ctx.origin,
            path: path.into(),
        };
        let actions = [
            (!route.route.is_empty(), "route"),
            (route.redirect.is_some(), "redirect"),
            (route.direct_response.is_some(), "directResponse"),
        ];
        let chosen: Vec<&str> = actions.iter().filter(|a| a.0).map(|a| a.1).collect();
        if chosen.len() != 1 {
            let message = if chosen.is_empty() {
                format!("`{base}` needs one of `route`, `redirect` or `directResponse`")
            } else {
                format!(
                    "`{base}` has conflicting actions {}: use exactly one of `route`, `redirect`, \
                     `directResponse`",
                    chosen.join(" + ")
                )
            };
            self.error(at(base), message);
        }
        if route.rewrite.is_some() && route.route.is_empty() {
            self.error(
                at(&format!("{base}.rewrite")),
                "`rewrite` only applies to `route`; it cannot be combined with `redirect` or \
                 `directResponse`",
            );
        }
        let mut matches = Vec::with_capacity(route.matches.len());
        for (j, m) in route.matches.iter().enumerate() {
            let path = format!("{base}.match[{j}]");
            if let Some(m) = self.route_match(ctx, m, &path) {
                matches.push(m);
            }
        }
        let headers = self.headers(
            ctx.origin,
            route.headers.as_ref(),
            &format!("{base}.headers"),
        );
        let rewrite = self.rewrite(
            ctx.origin,
            route.rewrite.as_ref(),
            &format!("{base}.rewrite"),
        );

        let action = if let Some(redirect) = &route.redirect {
            self.redirect(ctx.origin, redirect, &format!("{base}.redirect"))
                .map(Action::Redirect)
        } else if let Some(direct) = &route.direct_response {
            self.direct_response(ctx.origin, direct, &format!("{base}.directResponse"))
                .map(Action::Respond)
        } else {
            self.weighted_destinations(ctx, &route.route, false)
                .map(Action::Forward)
        };
        let label = match &route.name {
            Some(name) => format!("{vs_id} http[{index}] ({name})"),
            None => format!("{vs_id} http[{index}]"),
        };
        Some(HttpRoute {
            label,
            matches,
            action: action?,
            rewrite: rewrite?,
            headers: headers?,
        })
    }

    fn route_match(
        &mut self,
        ctx: &RouteCtx<'_>,
        m: &istio::HttpMatchRequest,
        base: &str,
    ) -> Option<RouteMatch> {
        let origin = ctx.origin;
        let mut ok = true;
        let mut single =
            |v: &mut Self, field: &str, sm: &Option<StringMatch>| -> Option<StrMatch> {
                let sm = sm.as_ref()?;
                let path = format!("{base}.{field}");
                let compiled = v.string_match(origin, sm, &path, false, false);
                if compiled.is_none() {
                    ok = false;
                }
                compiled
            };
        let uri = single(self, "uri", &m.uri);
        let scheme = single(self, "scheme", &m.scheme);
        let method = single(self, "method", &m.method);
        let authority = single(self, "authority", &m.authority);
        let mut header_list = |v: &mut Self, field: &str, map: &istio::UniqueMap<StringMatch>| {
            let mut out = Vec::new();
            for (name, sm) in map {
                let path = format!("{base}.{field}.{name}");
                let header = v.header_name(origin, name, &path, true);
                let value = v.string_match(origin, sm, &path, true, false);
                match (header, value) {
                    (Some(h), Some(sm)) => out.push((h, sm)),
                    _ => ok = false,
                }
            }
            out
        };
        let headers = header_list(self, "headers", &m.headers);
        let without_headers = header_list(self, "withoutHeaders", &m.without_headers);
        let mut query_params = Vec::new();
        for (name, sm) in &m.query_params {
            let path = format!("{base}.queryParams.{name}");
            match self.string_match(origin, sm, &path, true, true) {
                Some(sm) => query_params.push((name.clone(), sm)),
                None => ok = false,
            }
        }
        let port = match m.port {
            Some(p) => {
                let port = self.port(
                    p,
                    At {
                        origin,
                        path: format!("{base}.port"),
                    },
                );
                ok &= port.is_some();
                port
            }
            None => None,
        };
        let gateways = self.match_gateways(ctx, m.gateways.as_ref(), base);
        ok &= gateways
            .as_ref()
            .zip(m.gateways.as_ref())
            .is_none_or(|(resolved, written)| resolved.len() == written.len());
        ok.then(|| RouteMatch {
            name: m.name.clone(),
            uri,
            ignore_uri_case: m.ignore_uri_case,
            scheme,
            method,
            authority,
            headers,
            without_headers,
            query_params,
            port,
            gateways,
        })
    }

    fn string_match(
        &mut self,
        origin: &Origin,
        sm: &StringMatch,
        path: &str,
        allow_presence: bool,
        is_query: bool,
    ) -> Option<StrMatch> {
        let at = |p: &str| At {
            origin,
            path: p.into(),
        };
        let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()];
        // Istio's route translation reads a regex of `*` (not valid RE2) as "any value":
        // presence. (Its validation accepts it under `withoutHeaders` only; Sluice is lenient.)
        let any_value = allow_presence && sm.regex.as_deref() == Some("*");
        match set.iter().filter(|b| **b).count() {
            0 if allow_presence => return Some(StrMatch::Present),
            1 if any_value => return Some(StrMatch::Present),
            0 => {
                self.error(
                    at(path),
                    "a match needs one of `exact`, `prefix` or `regex`",
                );
                return None;
            }
            1 => {}
            _ => {
                self.error(
                    at(path),
                    "use only one of `exact`, `prefix` or `regex` in one match",
                );
                return None;
            }
        }
        if let Some(exact) = &sm.exact {
            return Some(StrMatch::Exact(exact.clone()));
        }
        if let Some(prefix) = &sm.prefix {
            if is_query {
                self.error(
                    at(&format!("{path}.prefix")),
                    "`prefix` is not supported for queryParams (Istio supports `exact` and `regex` there)",
                );
                return None;
            }
            return Some(StrMatch::Prefix(prefix.clone()));
        }
        let pattern = sm.regex.as_deref().unwrap_or_default();
        match full_match_regex(pattern) {
            Ok(re) => Some(StrMatch::Regex(re)),
            Err(e) => {
                self.error(at(&format!("{path}.regex")), format!("invalid regex: {e}"));
                None
            }
        }
    }

    fn header_name(
        &mut self,
        origin: &Origin,
        name: &str,
        path: &str,
        warn_uppercase: bool,
    ) -> Option<HeaderName> {
        // Istio accepts any case and Envoy matches names case-insensitively (`HeaderName` lowers
        // them too); the reference writes them in lower case, so a match in another case is
        // likely a copy from elsewhere and worth a word.
        if warn_uppercase && name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.warning(
                At {
                    origin,
                    path: path.into(),
                },
                format!(
                    "header name `{name}` is matched as `{}`: header names are case-insensitive",
                    name.to_ascii_lowercase()
                ),
            );
        }
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(
                    At {
                        origin,
                        path: path.into(),
                    },
                    format!("`{name}` is not a valid HTTP header name"),
                );
                None
            }
        }
    }

    fn headers(
        &mut self,
        origin: &Origin,
        headers: Option<&istio::Headers>,
        base: &str,
    ) -> Option<HeaderRules> {
        let Some(headers) = headers else {
            return Some(HeaderRules::default());
        };
        let request = self.header_ops(origin, headers.request.as_ref(), &format!("{base}.request"));
        let response = self.header_ops(
            origin,
            headers.response.as_ref(),
            &format!("{base}.response"),
        );
        Some(HeaderRules {
            request: request?,
            response: response?,
        })
    }

    fn header_ops(
        &mut self,
        origin: &Origin,
        ops: Option<&istio::HeaderOperations>,
        base: &str,
    ) -> Option<HeaderOps> {
        let Some(ops) = ops else {
            return Some(HeaderOps::default());
        };
        let mut ok = true;
        let mut pairs = |v: &mut Self, field: &str, map: &istio::UniqueMap<String>| {
            let mut out = Vec::new();
            for (name, value) in map {
                let path = format!("{base}.{field}.{name}");
                let header = v.header_name(origin, name, &path, false);
                let value =
                    match HeaderValue::from_str(value) {
                        Ok(value) => Some(value),
                        Err(_) => {
                            v.error(
                            At { origin, path: path.clone() },
                            "header value has characters HTTP does not allow (control characters)",
                        );
                            None
                        }
                    };
                match (header, value) {
                    (Some(h), Some(val)) => out.push((h, val)),
                    _ => ok = false,
                }
            }
            out
        };
        let set = pairs(self, "set", &ops.set);
        let add = pairs(self, "add", &ops.add);
        let mut remove = Vec::new();
        for (i, name) in ops.remove.iter().enumerate() {
            match self.header_name(origin, name, &format!("{base}.remove[{i}]"), false) {
                Some(h) => remove.push(h),
                None => ok = false,
            }
        }
        ok.then_some(HeaderOps { set, add, remove })
    }

    fn rewrite(
        &mut self,
        origin: &Origin,
        rewrite: Option<&istio::HttpRewrite>,
        base: &str,
    ) -> Option<Rewrite> {
        let Some(rewrite) = rewrite else {
            return Some(Rewrite::default());
        };
        let at = |path: &str| At {
            origin,
            path: path.into(),
        };
        let uri = match (&rewrite.uri, &rewrite.uri_regex_rewrite) {
            (Some(_), Some(_)) => {
                self.error(at(base), "use only one of `uri` and `uriRegexRewrite`");
                return None;
            }
            (Some(uri), None) => {
                if !uri.starts_with('/') || uri.parse::<http::uri::PathAndQuery>().is_err() {
                    self.error(
                        at(&format!("{base}.uri")),
                        format!(
                            "`{uri}` is not a path: it must start with `/` and use URI characters"
                        ),
                    );
                    return None;
                }
                Some(UriRewrite::Prefix(uri.clone()))
            }
            (None, Some(rr)) => match compile_regex(&rr.pattern) {
                Ok(pattern) => {
                    let replacement =
                        match envoy_substitution_to_rust(&rr.rewrite, pattern.captures_len()) {
                            Ok(r) => r,
                            Err(e) => {
                                self.error(at(&format!("{base}.uriRegexRewrite.rewrite")), e);
                                return None;
                            }
                        };
                    Some(UriRewrite::Regex {
                        pattern,
                        replacement,
                    })
                }
                Err(e) => {
                    self.error(
                        at(&format!("{base}.uriRegexRewrite.match")),
                        format!("invalid regex: {e}"),
                    );
                    return None;
                }
            },
            (None, None) => None,
        };
        if rewrite.uri.is_none()
            && rewrite.uri_regex_rewrite.is_none()
            && rewrite.authority.is_none()
        {
            self.error(
                at(base),
                "`rewrite` needs `uri`, `uriRegexRewrite` or `authority`",
            );
            return None;
        }
        let authority = match &rewrite.authority {
            Some(authority) => match HeaderValue::from_str(authority) {
                Ok(value) if !authority.is_empty() => Some(value),
                _ => {
                    self.error(at(&format!("{base}.authority")), "not a valid authority");
                    return None;
                }
            },
            None => None,
        };
        Some(Rewrite { uri, authority })
    }

    fn redirect(
        &mut self,
        origin: &Origin,
        redirect: &istio::HttpRedirect,
        base: &str,
    ) -> Option<Redirect> {
        let at = |path: &str| At {
            origin,
            path: path.into(),
        };
        let mut ok = true;
        let code = match redirect.redirect_code {
            None => 301,
            Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
            Some(c) => {
                self.error(
                    at(&format!("{base}.redirectCode")),
                    format!("redirectCode {c} is not a redirect: use 301, 302, 303, 307 or 308"),
                );
                ok = false;
                0
            }
        };
        let port = match redirect.port {
            Some(p) => {
                let port = self.port(p, at(&format!("{base}.port")));
                ok &= port.is_some();
                port
            }
            None => None,
        };
        // Istio: FROM_PROTOCOL_DEFAULT leaves the port as if none were set (the scheme's default
        // unless the request named another); FROM_REQUEST_PORT is the port the request came to.
        let port_from_request = match redirect.derive_port.as_deref() {
            None | Some("FROM_PROTOCOL_DEFAULT") => false,
            Some("FROM_REQUEST_PORT") => true,
            Some(other) => {
                self.error(
                    at(&format!("{base}.derivePort")),
                    format!(
                        "unknown derivePort `{other}`: use FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"
                    ),
                );
                ok = false;
                false
            }
        };
        if redirect.port.is_some() && redirect.derive_port.is_some() {
            self.error(
                at(&format!("{base}.derivePort")),
                "set `port` or `derivePort`, not both",
            );
            ok = false;
        }
        if let Some(scheme) = &redirect.scheme {
            if !matches!(scheme.as_str(), "http" | "https") {
                self.error(
                    at(&format!("{base}.scheme")),
                    format!("scheme `{scheme}`: use http or https"),
                );
                ok = false;
            }
        }
        if let Some(uri) = &redirect.uri {
            if !uri.starts_with('/') || uri.parse::<http::uri::PathAndQuery>().is_err() {
                self.error(
                    at(&format!("{base}.uri")),
                    format!("`{uri}` is not a path: it must start with `/` and use URI characters"),
                );
                ok = false;
            }
        }
        for (field, value) in [("uri", &redirect.uri), ("authority", &redirect.authority)] {
            if let Some(value) = value {
                if HeaderValue::from_str(value).is_err() {
                    self.error(
                        at(&format!("{base}.{field}")),
                        "has characters a Location header cannot carry",
                    );
                    ok = false;
                }
            }
        }
        ok.then(|| Redirect {
            uri: redirect.uri.clone(),
            authority: redirect.authority.clone(),
            port,
            port_from_request,
            scheme: redirect.scheme.clone(),
            code,
        })
    }

    fn direct_response(
        &mut self,
        origin: &Origin,
        direct: &istio::HttpDirectResponse,
        base: &str,
    ) -> Option<DirectResponse> {
        let body = match direct.body.as_ref() {
            None => Some(Vec::new()),
            Some(istio::HttpBody {
                string: Some(_),
                bytes: Some(_),
            }) => {
                self.error(
                    At {
                        origin,
                        path: format!("{base}.body.bytes"),
                    },
                    "set `string` or `bytes`, not both",
                );
                None
            }
            Some(istio::HttpBody {
                bytes: Some(encoded),
                ..
            }) => match base64_bytes(encoded) {
                Some(bytes) => Some(bytes),
                None => {
                    self.error(
                        At {
                            origin,
                            path: format!("{base}.body.bytes"),
                        },
                        "not base64 (protobuf `bytes` are written in base64 in YAML and JSON)",
                    );
                    None
                }
            },
            Some(istio::HttpBody { string, .. }) => {
                Some(string.clone().unwrap_or_default().into_bytes())
            }
        };
        match u16::try_from(direct.status) {
            Ok(status @ 200..=599) => Some(DirectResponse {
                status,
                body: body?,
            }),
            _ => {
                self.error(
                    At {
                        origin,
                        path: format!("{base}.status"),
                    },
                    format!(
                        "status {} is not an HTTP status between 200 and 599",
                        direct.status
                    ),
                );
                None
            }
        }
    }

    fn weighted_destinations(
        &mut self,
        ctx: &RouteCtx<'_>,
        route: &[istio::HttpRouteDestination],
        layer4: bool,
    ) -> Option<Vec<RouteDestination>> {
        let origin = ctx.origin;
        let mut ok = true;
        let mut out = Vec::with_capacity(route.len());
        let mut total: i64 = 0;
        for (k, dest) in route.iter().enumerate() {
            let base = format!("{}.route[{k}]", ctx.base);
            let weight = dest.weight.unwrap_or(0);
            if !(0..=i64::from(i32::MAX)).contains(&weight) {
                self.error(
                    At {
                        origin,
                        path: format!("{base}.weight"),
                    },
                    format!("weight {weight} must be between 0 and 2147483647"),
                );
                ok = false;
            }
            total += weight.max(0);
            let service = self.destination(
                ctx,
                &dest.destination,
                &format!("{base}.destination"),
                layer4,
            );
            let headers = self.headers(origin, dest.headers.as_ref(), &format!("{base}.headers"));
            match (service, headers) {
                (Some(service), Some(headers)) => out.push(RouteDestination {
                    service,
                    // A single destination takes all traffic, whatever its weight says.
                    weight: if route.len() == 1 {
                        1
                    } else {
                        u32::try_from(weight).unwrap_or(0)
                    },
                    headers,
                }),
                _ => ok = false,
            }
        }
        if total > i64::from(u32::MAX) {
            self.error(
                At {
                    origin,
                    path: format!("{}.route", ctx.base),
                },
                "the weights of these destinations add up to more than 4294967295",
            );
            ok = false;
        }
        if route.len() > 1 && total == 0 && ok {
            self.error(
                At {
                    origin,
                    path: format!("{}.route", ctx.base),
                },
                "the weights of these destinations add up to 0: give at least one a positive weight",
            );
            ok = false;
        }
        ok.then_some(out)
    }

    fn destination(
        &mut self,
        ctx: &RouteCtx<'_>,
        dest: &istio::Destination,
        base: &str,
        layer4: bool,
    ) -> Option<ServiceKey> {
        let origin = ctx.origin;
        let at = |path: &str| At {
            origin,
            path: path.into(),
        };
        let host = expand_short_name(&dest.host, ctx.namespace);
        if let Some(dependencies) = &mut self.dependencies {
            add_once(&mut dependencies.services, host.clone());
            add_once(&mut dependencies.upstream_tls, (host.clone(), None));
            if let Some(subset) = &dest.subset {
                add_once(&mut dependencies.subsets, (host.clone(), subset.clone()));
                add_once(
                    &mut dependencies.upstream_tls,
                    (host.clone(), Some(subset.clone())),
                );
            }
        }
        let host_path = format!("{base}.host");
        if host.contains('*') {
            self.error(at(&host_path), "a destination host cannot be a wildcard");
            return None;
        }
        if let Err(e) = check_dns_name(&host) {
            self.error(at(&host_path), e);
            return None;
        }
        let requested_port = match &dest.port {
            Some(p) => Some(self.port(p.number, at(&format!("{base}.port.number")))?),
            None => None,
        };
        let port = match (ctx.services.get(&host), requested_port) {
            (Some(service), Some(port)) => {
                if !service.ports.iter().any(|p| p.number == port) {
                    let known: Vec<String> =
                        service.ports.iter().map(|p| p.number.to_string()).collect();
                    self.error(
                        at(&format!("{base}.port.number")),
                        format!(
                            "ServiceEntry host `{host}` has no port {port} (its ports: {})",
                            known.join(", ")
                        ),
                    );
                    return None;
                }
                port
            }
            (Some(service), None) => match service.ports.as_slice() {
                [only] => only.number,
                _ => {
                    self.error(
                        at(base),
                        format!("host `{host}` has several ports: set `port.number` to choose one"),
                    );
                    return None;
                }
            },
            (None, Some(port)) => port,
            (None, None) => {
                self.error(
                    at(base),
                    format!(
                        "`port.number` is required: `{host}` is not a ServiceEntry host, so Sluice \
                         resolves it by DNS and cannot look up its ports (or add a ServiceEntry \
                         listing its ports and endpoints)"
                    ),
                );
                return None;
            }
        };
        let service_port = ctx
            .services
            .get(&host)
            .and_then(|service| service.ports.iter().find(|p| p.number == port));
        if let (Some(service_port), false) = (service_port, layer4) {
            if let Err(reason) = &service_port.http {
                self.error(at(base), format!("port {port} of `{host}`: {reason}"));
                return None;
            }
            let originates =
                upstream_tls_for(ctx.upstream_tls, &host, dest.subset.as_deref()).is_some();
            if service_port.tls && !originates {
                self.error(
                    at(base),
                    format!(
                        "port {port} of `{host}` speaks TLS: add a DestinationRule for it with \
                         `trafficPolicy.tls.mode: SIMPLE` so Sluice originates TLS"
                    ),
                );
                return None;
            }
        }
        if let Some(subset) = &dest.subset {
            let subset_path = format!("{base}.subset");
            if !ctx.subsets.contains_key(&(host.clone(), subset.clone())) {
                if let Some(dependencies) = &mut self.dependencies {
                    add_once(&mut dependencies.all_subsets_of, host.clone());
                }
                let known: Vec<&str> = ctx
                    .subsets
                    .keys()
                    .filter(|(h, _)| *h == host)
                    .map(|(_, s)| s.as_str())
                    .collect();
                let message = if known.is_empty() {
                    format!(
                        "subset `{subset}`: no DestinationRule defines subsets for host `{host}`"
                    )
                } else {
                    format!(
                        "subset `{subset}` is not defined for host `{host}` (defined: {})",
                        known.join(", ")
                    )
                };
                self.error(at(&subset_path), message);
                return None;
            }
            if !ctx.services.contains_key(&host) {
                self.error(
                    at(&subset_path),
                    format!(
                        "subset `{subset}` selects endpoints by label, but no ServiceEntry lists \
                         endpoints for `{host}`"
                    ),
                );
                return None;
            }
        }
        Some(ServiceKey {
            host,
            port,
            subset: dest.subset.clone(),
        })
    }

    // ------------------------------------------------------------ bindings

    fn binding_warnings(&mut self, model: &Model) {
        let set = self.set;
        for (doc, vs) in set.virtual_services.iter().zip(&model.virtual_services) {
            let origin = &doc.origin;
            let mesh_only = vs.bindings.iter().all(|b| *b == Binding::Mesh);
            if mesh_only && !vs.bindings.is_empty() && model.settings.mesh_port.is_none() {
                self.warning(
                    At {
                        origin,
                        path: "spec.hosts".into(),
                    },
                    format!(
                        "VirtualService `{}` is not bound to any Gateway server: without `gateways` \
                         Istio binds it to `mesh`, which Sluice serves only on \
                         GatewaySettings `meshListener`; add `gateways:` to serve it on a Gateway",
                        vs.id
                    ),
                );
                continue;
            }
            for (i, host) in vs.hosts.iter().enumerate() {
                let served = vs.bindings.iter().any(|b| match b {
                    Binding::Mesh => model.settings.mesh_port.is_some(),
                    Binding::Gateway(id) => model
                        .gateways
                        .iter()
                        .filter(|g| &g.id == id)
                        .flat_map(|g| &g.servers)
                        .flat_map(|s| &s.hosts)
                        .any(|sh| sh.admits(&vs.namespace) && sh.host.intersect(host).is_some()),
                });
                if !served {
                    self.warning(
                        At {
                            origin,
                            path: format!("spec.hosts[{i}]"),
                        },
                        format!(
                            "host `{host}` is not served by any server of the bound gateways, so it \
                             gets no traffic (Istio ignores it too)"
                        ),
                    );
                }
            }
        }
        for ((host, subset), labels) in &model.subsets {
            if let Some(service) = model.services.get(host) {
                if !service
                    .endpoints
                    .iter()
                    .any(|e| labels_match(labels, &e.labels))
                {
                    if let Some(doc) = set
                        .destination_rules
                        .iter()
                        .find(|d| expand_short_name(&d.spec.host, d.metadata.namespace()) == *host)
                    {
                        let index = doc
                            .spec
                            .subsets
                            .iter()
                            .position(|s| &s.name == subset)
                            .unwrap_or(0);
                        self.warning(
                            At {
                                origin: &doc.origin,
                                path: format!("spec.subsets[{index}].labels"),
                            },
                            format!(
                                "subset `{subset}` selects no endpoint of `{host}`: requests routed \
                                 to it get 503"
                            ),
                        );
                    }
                }
            }
        }
    }
}

type Subsets = BTreeMap<(String, String), BTreeMap<String, String>>;
type UpstreamTlsPolicies = BTreeMap<(String, Option<String>), Option<UpstreamTls>>;

#[derive(Clone, Copy)]
struct RouteCtx<'a> {
    origin: &'a Origin,
    base: &'a str,
    namespace: &'a str,
    gateway_ids: &'a BTreeSet<String>,
    services: &'a BTreeMap<String, Service>,
    subsets: &'a Subsets,
    upstream_tls: &'a UpstreamTlsPolicies,
}

impl ServerHost {
    /// Whether a VirtualService in `namespace` may attach to this server host.
    pub fn admits(&self, namespace: &str) -> bool {
        match &self.namespaces {
            NamespaceFilter::Any => true,
            NamespaceFilter::Only(ns) => ns == namespace,
        }
    }
}

/// A route without `match`, or with a `match` block that has no condition, takes every request that
/// reaches it.
fn matches_everything(route: &istio::HttpRoute) -> bool {
    route.matches.is_empty()
        || route.matches.iter().any(|m| {
            m.uri.is_none()
                && m.scheme.is_none()
                && m.method.is_none()
                && m.authority.is_none()
                && m.headers.is_empty()
                && m.without_headers.is_empty()
                && m.query_params.is_empty()
                && m.port.is_none()
                && m.gateways.is_none()
        })
}

/// `credentialName: acme:<issuer>`: certificates obtained by Sluice itself.
pub const ACME_CREDENTIAL: &str = "acme:";

/// A `credentialName` names files under certsDir, so it must not climb out of it.
fn check_credential_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with('.')
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid credentialName (a Kubernetes secret name: lower-case letters, \
             digits, `-` and `.`)"
        ))
    }
}

/// A subset selects an endpoint when every subset label is on the endpoint.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn full_match_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

fn compile_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// Envoy (RE2) writes capture groups in substitutions as `\1` and a backslash as `\\`; the regex
/// crate writes `${1}`, and a literal `$` must be doubled. A group the pattern does not have is an
/// error, as in Envoy.
fn envoy_substitution_to_rust(substitution: &str, groups: usize) -> Result<String, String> {
    let mut out = String::with_capacity(substitution.len());
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut number = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    number.push(d);
                    chars.next();
                }
                if number.parse::<usize>().map_or(true, |n| n >= groups) {
                    return Err(format!(
                        "`\\{number}` refers to a capture group the `match` pattern does not have"
                    ));
                }
                out.push_str(&format!("${{{number}}}"));
            }
            '\\' if chars.peek() == Some(&'\\') => {
                chars.next();
                out.push('\\');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Istio durations as protobuf's JSON form and Go write them: `5s`, `1.5s`, `100ms`, `1m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "h" => value * 3600.0,
        "m" => value * 60.0,
        "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Protobuf's `bytes` as YAML and JSON carry them: base64, standard or URL-safe alphabet, padding
/// optional (what protojson accepts).
fn base64_bytes(encoded: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::{alphabet, Engine};
    // Go's decoder, which protojson uses, skips line breaks (a YAML block scalar has them) and
    // does not insist that unused trailing bits are zero.
    let joined: String = encoded
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n'))
        .collect();
    let config = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    [alphabet::STANDARD, alphabet::URL_SAFE]
        .iter()
        .find_map(|alphabet| GeneralPurpose::new(alphabet, config).decode(&joined).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutions_translate_capture_groups() {
        assert_eq!(
            envoy_substitution_to_rust(r"/v2/\1/x$", 2).as_deref(),
            Ok("/v2/${1}/x$$")
        );
        assert_eq!(
            envoy_substitution_to_rust(r"a\\b", 1).as_deref(),
            Ok(r"a\b")
        );
        assert!(envoy_substitution_to_rust(r"/\5", 2).is_err());
    }

    #[test]
    fn durations_parse_like_istio() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
