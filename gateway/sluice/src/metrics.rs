//! Prometheus metrics: one registry, handles created once and held in one struct.
//!
//! Served as text on the admin address at `/metrics`: Sluice's own operational metrics, and request
//! and TCP metrics under Istio's names and labels so Istio's dashboards work unchanged. Request
//! metrics are recorded through [`DestinationSeries`], resolved per destination for each config
//! generation: recording formats no label and takes no global lock.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use rustc_hash::FxBuildHasher;
use sluice_core::model::ServiceKey;
use sluice_core::snapshot::{Snapshot, UpstreamEndpoint};

use crate::tls::CertificateExpiry;

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for request and response sizes (1 B to 100 MB, ×10).
const SIZE_BUCKETS: [f64; 9] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
];
const REQUEST_LABELS: [&str; 9] = [
    "reporter",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_version",
];
const TCP_LABELS: [&str; 7] = [
    "reporter",
    "response_flags",
    "connection_security_policy",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_version",
];

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reload_total: IntCounterVec,
    last_reload_successful: IntGauge,
    generation: IntGauge,
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    pub access_log_dropped: IntCounter,
    certificate_not_after: IntGaugeVec,
    connections_active: IntGaugeVec,
    tls_handshakes: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    acme_orders: IntCounterVec,
    spans: IntCounterVec,
    upstream_endpoints: IntGaugeVec,
    upstream_endpoints_lock: Arc<std::sync::Mutex<()>>,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let reload_total = IntCounterVec::new(
            Opts::new(
                "sluice_config_reload_total",
                "Config reloads by result (success|failure).",
            ),
            &["result"],
        )?;
        let last_reload_successful = IntGauge::new(
            "sluice_config_last_reload_successful",
            "1 if the last config reload was applied, 0 if it was rejected.",
        )?;
        let generation = IntGauge::new(
            "sluice_config_generation",
            "Number of the config generation currently serving.",
        )?;
        registry.register(Box::new(reload_total.clone()))?;
        registry.register(Box::new(last_reload_successful.clone()))?;
        registry.register(Box::new(generation.clone()))?;
        // Both label values exist from the start so rate() queries see zeros, not gaps.
        reload_total.with_label_values(&["success"]);
        reload_total.with_label_values(&["failure"]);
        let requests = IntCounterVec::new(
            Opts::new(
                "istio_requests_total",
                "Requests, by Istio's standard labels.",
            ),
            &REQUEST_LABELS,
        )?;
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &REQUEST_LABELS,
            )
        };
        let duration = histogram(
            "istio_request_duration_milliseconds",
            "Request duration.",
            &DURATION_BUCKETS,
        )?;
        let request_bytes = histogram(
            "istio_request_bytes",
            "Request size: headers and body.",
            &SIZE_BUCKETS,
        )?;
        let response_bytes = histogram(
            "istio_response_bytes",
            "Response size: headers and body.",
            &SIZE_BUCKETS,
        )?;
        let tcp = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &TCP_LABELS);
        let tcp_opened = tcp(
            "istio_tcp_connections_opened_total",
            "TCP connections opened.",
        )?;
        let tcp_closed = tcp(
            "istio_tcp_connections_closed_total",
            "TCP connections closed.",
        )?;
        let tcp_sent = tcp(
            "istio_tcp_sent_bytes_total",
            "Bytes sent to clients over TCP.",
        )?;
        let tcp_received = tcp(
            "istio_tcp_received_bytes_total",
            "Bytes received from clients over TCP.",
        )?;
        let access_log_dropped = IntCounter::new(
            "sluice_access_log_dropped_total",
            "Access log lines dropped because the writer could not keep up.",
        )?;
        let certificate_not_after = IntGaugeVec::new(
            Opts::new(
                "sluice_certificate_not_after_seconds",
                "Expiry (Unix time) of the certificate served for each Gateway host and port.",
            ),
            &["host", "port"],
        )?;
        let connections_active = IntGaugeVec::new(
            Opts::new(
                "sluice_downstream_connections_active",
                "Client connections open, by listener port.",
            ),
            &["port"],
        )?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "sluice_tls_handshakes_total",
                "TLS handshakes completed (terminated by Sluice), by listener port.",
            ),
            &["port"],
        )?;
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "sluice_tls_handshake_failures_total",
                "TLS connections closed before a handshake completed, by listener port and reason.",
            ),
            &["port", "reason"],
        )?;
        let acme_orders = IntCounterVec::new(
            Opts::new(
                "sluice_acme_orders_total",
                "ACME certificate orders finished, by issuer and result (success|failure).",
            ),
            &["issuer", "result"],
        )?;
        let spans = IntCounterVec::new(
            Opts::new(
                "sluice_tracing_spans_total",
                "Sampled request spans, by what became of them (exported|dropped|failed).",
            ),
            &["result"],
        )?;
        // Present from the start, so an alert on a rate of failures has a series to read.
        for result in ["exported", "dropped", "failed"] {
            spans.with_label_values(&[result]);
        }
        let upstream_endpoints = IntGaugeVec::new(
            Opts::new(
                "sluice_upstream_endpoints_healthy",
                "Endpoints each destination can be sent to (resolved; Sluice has no active health \
                 checks yet, so every resolved endpoint counts). 0: requests get 503 UH.",
            ),
            &[
                "destination_service",
                "destination_port",
                "destination_version",
            ],
        )?;
        for collector in [
            Box::new(access_log_dropped.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(upstream_endpoints.clone()),
            Box::new(spans.clone()),
            Box::new(acme_orders.clone()),
            Box::new(certificate_not_after.clone()),
            Box::new(connections_active.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(tls_handshake_failures.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(request_bytes.clone()),
            Box::new(response_bytes.clone()),
            Box::new(tcp_opened.clone()),
            Box::new(tcp_closed.clone()),
            Box::new(tcp_sent.clone()),
            Box::new(tcp_received.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Self {
            registry,
            reload_total,
            last_reload_successful,
            generation,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            access_log_dropped,
            certificate_not_after,
            connections_active,
            tls_handshakes,
            tls_handshake_failures,
            acme_orders,
            spans,
            upstream_endpoints,
            upstream_endpoints_lock: Arc::default(),
        })
    }

    /// The series of one listener port, resolved once when the port is bound.
    pub fn listener(&self, port: u16) -> ListenerSeries {
        let port = port.to_string();
        let failure = |reason: HandshakeFailure| {
            self.tls_handshake_failures
                .with_label_values(&[port.as_str(), reason.as_str()])
        };
        ListenerSeries {
            active: self.connections_active.with_label_values(&[port.as_str()]),
            handshakes: self.tls_handshakes.with_label_values(&[port.as_str()]),
            failures: HandshakeFailure::ALL.map(failure),
        }
    }

    /// Replaces the certificate expiry series with those of the generation now serving, so hosts
    /// removed from the config stop being reported.
    pub fn record_certificates(&self, certificates: &[CertificateExpiry]) {
        self.certificate_not_after.reset();
        for cert in certificates {
            self.certificate_not_after
                .with_label_values(&[cert.host.as_str(), &cert.port.to_string()])
                .set(cert.not_after);
        }
    }
    /// Records a reload attempt. The initial load counts as a successful reload of generation 1.
    pub fn record_reload(&self, success: bool, generation: u64) {
        let result = if success { "success" } else { "failure" };
        self.reload_total.with_label_values(&[result]).inc();
        self.last_reload_successful.set(i64::from(success));
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    pub fn record_acme_order(&self, issuer: &str, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.acme_orders.with_label_values(&[issuer, result]).inc();
    }

    /// Counts, at scrape time, the endpoints each destination of the serving config has now.
    pub fn record_upstream_endpoints(&self, snapshot: &Snapshot, dns: &crate::dns::DnsCache) {
        // Reset and refill as one step: a concurrent scrape must not see the gauge half empty.
        let _one_at_a_time = self.upstream_endpoints_lock.lock();
        self.upstream_endpoints.reset();
        for cluster in snapshot.clusters() {
            let count: usize = cluster
                .endpoints
                .iter()
                .map(|endpoint| match endpoint {
                    UpstreamEndpoint::Addr(_) => 1,
                    UpstreamEndpoint::Dns { slot, .. } => snapshot
                        .dns_names()
                        .get(*slot)
                        .and_then(|name| dns.addresses(name))
                        .map_or(0, |ips| ips.len()),
                })
                .sum();
            let [service, _, _, version] = destination_labels(Some(&cluster.key));
            self.upstream_endpoints
                .with_label_values(&[&service, &cluster.key.port.to_string(), &version])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    pub fn record_spans(&self, result: &str, count: usize) {
        self.spans
            .with_label_values(&[result])
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Why a TLS connection closed before its handshake completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The first bytes were not a readable TLS ClientHello (plain HTTP to a TLS port, scanners).
    MalformedClientHello,
    /// The client closed before sending a whole ClientHello (TCP health checks do this).
    ClosedBeforeClientHello,
    /// No Gateway server or passthrough route serves the requested SNI.
    UnknownServerName,
    /// rustls rejected the handshake: no common version or suite, a bad client certificate, a
    /// client that aborted.
    Handshake,
    /// The PROXY header, ClientHello and handshake did not finish within the deadline.
    Timeout,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 5] = [
        HandshakeFailure::MalformedClientHello,
        HandshakeFailure::ClosedBeforeClientHello,
        HandshakeFailure::UnknownServerName,
        HandshakeFailure::Handshake,
        HandshakeFailure::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::MalformedClientHello => "malformed_client_hello",
            HandshakeFailure::ClosedBeforeClientHello => "closed_before_client_hello",
            HandshakeFailure::UnknownServerName => "unknown_server_name",
            HandshakeFailure::Handshake => "handshake_error",
            HandshakeFailure::Timeout => "timeout",
        }
    }
}

/// A listener port's connection and handshake series (all failure reasons exist from the start, so
/// `rate()` sees zeros rather than gaps).
#[derive(Debug, Clone)]
pub struct ListenerSeries {
    active: IntGauge,
    handshakes: IntCounter,
    failures: [IntCounter; HandshakeFailure::ALL.len()],
}

impl ListenerSeries {
    /// Counts the connection as open until the returned guard is dropped.
    pub fn open_connection(&self) -> ConnectionGuard {
        self.active.inc();
        ConnectionGuard(self.active.clone())
    }

    pub fn handshake_done(&self) {
        self.handshakes.inc();
    }

    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        // `ALL` lists the reasons in declaration order, so the discriminant is the index.
        if let Some(counter) = self.failures.get(reason as usize) {
            counter.inc();
        }
    }
}

/// One open client connection in `sluice_downstream_connections_active`.
#[derive(Debug)]
pub struct ConnectionGuard(IntGauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a request ended, as Envoy's (and so Istio's) `response_flags` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResponseFlag {
    #[default]
    None,
    /// NR: no route.
    NoRoute,
    /// UH: no healthy upstream (no endpoint).
    NoHealthyUpstream,
    /// UF: upstream connection failure.
    UpstreamConnectFailure,
    /// UC: upstream connection termination.
    UpstreamTermination,
    /// UT: upstream request timeout.
    UpstreamTimeout,
    /// DC: downstream connection termination.
    DownstreamTermination,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::UpstreamTermination => "UC",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::DownstreamTermination => "DC",
        }
    }
}

/// The labels of one request that vary per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub grpc: bool,
    pub code: u16,
    pub flag: ResponseFlag,
    pub mutual_tls: bool,
}

/// One resolved set of request series.
#[derive(Debug)]
struct RequestSeries {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The metrics of one destination (or of requests that reached none), for one config generation.
#[derive(Debug)]
pub struct DestinationSeries {
    /// destination_service, _name, _namespace, _version.
    labels: [String; 4],
    series: ArcSwap<HashMap<RequestKey, Arc<RequestSeries>, FxBuildHasher>>,
    tcp: [IntCounter; 4],
}

impl DestinationSeries {
    /// The series of `destination` (`None`: requests that matched no destination).
    pub fn new(metrics: &Metrics, destination: Option<&ServiceKey>) -> Self {
        let labels = destination_labels(destination);
        let values = [
            "source",
            "-",
            "none",
            labels[0].as_str(),
            labels[1].as_str(),
            labels[2].as_str(),
            labels[3].as_str(),
        ];
        let tcp = [
            metrics.tcp_opened.with_label_values(&values),
            metrics.tcp_closed.with_label_values(&values),
            metrics.tcp_sent.with_label_values(&values),
            metrics.tcp_received.with_label_values(&values),
        ];
        Self {
            labels,
            series: ArcSwap::from_pointee(HashMap::default()),
            tcp,
        }
    }

    /// Records one request. The first request of a label combination resolves its series; later
    /// ones only look them up.
    pub fn record(
        &self,
        metrics: &Metrics,
        key: RequestKey,
        millis: f64,
        request_bytes: usize,
        response_bytes: usize,
    ) {
        let known = self.series.load();
        let resolved;
        let series = match known.get(&key) {
            Some(series) => series,
            None => {
                resolved = self.resolve(metrics, key);
                &resolved
            }
        };
        series.requests.inc();
        series.duration.observe(millis);
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(response_bytes as f64);
    }

    fn resolve(&self, metrics: &Metrics, key: RequestKey) -> Arc<RequestSeries> {
        let code = key.code.to_string();
        let values = [
            "source",
            if key.grpc { "grpc" } else { "http" },
            code.as_str(),
            key.flag.as_str(),
            if key.mutual_tls { "mutual_tls" } else { "none" },
            self.labels[0].as_str(),
            self.labels[1].as_str(),
            self.labels[2].as_str(),
            self.labels[3].as_str(),
        ];
        let series = Arc::new(RequestSeries {
            requests: metrics.requests.with_label_values(&values),
            duration: metrics.duration.with_label_values(&values),
            request_bytes: metrics.request_bytes.with_label_values(&values),
            response_bytes: metrics.response_bytes.with_label_values(&values),
        });
        self.series.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.entry(key).or_insert_with(|| series.clone());
            next
        });
        series
    }

    /// A forwarded (TLS passthrough or TCP) connection opened.
    pub fn tcp_opened(&self) {
        self.tcp[0].inc();
    }

    /// A forwarded connection closed after `sent` bytes to the client and `received` from it.
    pub fn tcp_closed(&self, sent: u64, received: u64) {
        self.tcp[1].inc();
        self.tcp[2].inc_by(sent);
        self.tcp[3].inc_by(received);
    }
}

/// Istio's destination labels for a service: `reviews.shop.svc.cluster.local` → name `reviews`,
/// namespace `shop`; other hosts keep their full name and namespace `unknown`.
fn destination_labels(destination: Option<&ServiceKey>) -> [String; 4] {
    let Some(key) = destination else {
        return [
            "unknown".into(),
            "unknown".into(),
            "unknown".into(),
            "unknown".into(),
        ];
    };
    let (name, namespace) = match key
        .host
        .strip_suffix(".svc.cluster.local")
        .and_then(|s| s.split_once('.'))
    {
        Some((name, namespace)) => (name.to_string(), namespace.to_string()),
        None => (key.host.clone(), "unknown".to_string()),
    };
    [
        key.host.clone(),
        name,
        namespace,
        key.subset.clone().unwrap_or_else(|| "unknown".into()),
    ]
}
