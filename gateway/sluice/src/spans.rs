//! Distributed tracing: Sluice joins the trace a request arrives with (W3C `traceparent`, or B3),
//! or starts one, sampling new traces at `tracing.sampling` percent and keeping any decision that
//! arrives with the request. It forwards its own span as the parent (`traceparent`, and `x-b3-*`
//! when the request used B3 or the collector is Zipkin) and, for sampled requests, exports one
//! server span per request to a Zipkin (v2 JSON) or OpenTelemetry (OTLP/HTTP JSON) collector.
//!
//! Export never slows a request: spans go through a bounded queue to a sender task that posts
//! batches; a full queue or a failing collector drops spans and counts them in
//! `sluice_tracing_spans_total{result}`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use log::warn;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use sluice_core::model::{Collector, Tracing};
use tokio::sync::mpsc;

use crate::headers::set;
use crate::state::Live;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
/// Most headers `TraceContext::propagate` adds to a request.
pub const PROPAGATED: usize = 5;

/// Spans waiting for the collector before new ones are dropped.
const QUEUE: usize = 8192;
/// Most spans per request to the collector.
const BATCH: usize = 512;
/// How long spans gather before a batch is sent.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// This hop's place in a trace.
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub trace_id: u128,
    /// Sluice's own span.
    pub span_id: u64,
    /// The caller's span, when the request arrived inside a trace.
    pub parent_id: Option<u64>,
    pub sampled: bool,
    /// B3 debug (`x-b3-flags: 1`, `b3: …-d`): sampled, and said so downstream.
    debug: bool,
    /// The request carried B3 headers: answer in kind (and replace them, never forward stale ones).
    b3: bool,
    /// The caller's B3 trace id was 64-bit: keep that width.
    b3_short_trace: bool,
    /// The trace came from a valid `traceparent`, so its `tracestate` belongs to it.
    w3c: bool,
}

/// Exactly `len` lower-case hex digits (W3C allows no other form), not all zero.
fn hex_id(text: &str, len: usize) -> Option<u128> {
    let valid = text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !valid {
        return None;
    }
    u128::from_str_radix(text, 16).ok().filter(|id| *id != 0)
}

fn span_id(text: &str) -> Option<u64> {
    hex_id(text, 16).and_then(|id| u64::try_from(id).ok())
}

/// What the request said about its trace.
#[derive(Default)]
struct Incoming {
    /// `(trace id, caller's span id)` from a valid context.
    ids: Option<(u128, u64)>,
    sampled: Option<bool>,
    debug: bool,
    b3: bool,
    b3_short_trace: bool,
    w3c: bool,
}

/// W3C `traceparent`: `version-traceid-parentid-flags`. One header only; version 00 has exactly
/// four fields, later versions may add more; `ff` is invalid.
fn traceparent(headers: &HeaderMap) -> Option<(u128, u64, bool)> {
    let mut values = headers.get_all("traceparent").iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let fields: Vec<&str> = value.split('-').collect();
    let version = *fields.first()?;
    let version_ok = hex_id(version, 2).is_some() || version == "00";
    if !version_ok || version == "ff" || fields.len() < 4 || (version == "00" && fields.len() != 4)
    {
        return None;
    }
    let trace = hex_id(fields[1], 32)?;
    let parent = span_id(fields[2])?;
    let flags = fields[3];
    if flags.len() != 2
        || !flags
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace, parent, sampled))
}

fn incoming(headers: &HeaderMap) -> Incoming {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mut found = Incoming {
        b3: headers
            .keys()
            .any(|k| k.as_str().starts_with("x-b3-") || k == "b3"),
        ..Incoming::default()
    };
    if let Some((trace, parent, sampled)) = traceparent(headers) {
        found.ids = Some((trace, parent));
        found.sampled = Some(sampled);
        found.w3c = true;
        return found;
    }
    let b3_trace = |text: &str| hex_id(text, 32).or_else(|| hex_id(text, 16));
    let decision = |value: &str| match value {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    };
    if header("x-b3-flags") == Some("1") {
        found.debug = true;
        found.sampled = Some(true);
    } else {
        found.sampled = header("x-b3-sampled").and_then(decision);
    }
    if let (Some(trace), Some(span)) = (header("x-b3-traceid"), header("x-b3-spanid")) {
        if let (Some(trace_id), Some(span)) = (b3_trace(trace), span_id(span)) {
            found.ids = Some((trace_id, span));
            found.b3_short_trace = trace.len() == 16;
        }
        return found;
    }
    // Single header: `0` | `1` | `d`, or `{trace}-{span}[-{sampling}[-{parent}]]`.
    if let Some(single) = header("b3") {
        let fields: Vec<&str> = single.split('-').collect();
        let sampling = match fields.len() {
            1 => fields.first().copied(),
            _ => fields.get(2).copied(),
        };
        match sampling {
            Some("d") => {
                found.debug = true;
                found.sampled = Some(true);
            }
            Some(value) => found.sampled = decision(value),
            None => {}
        }
        if fields.len() >= 2 {
            if let (Some(trace_id), Some(span)) = (b3_trace(fields[0]), span_id(fields[1])) {
                found.ids = Some((trace_id, span));
                found.b3_short_trace = fields[0].len() == 16;
            }
        }
    }
    found
}

impl TraceContext {
    /// Joins the request's trace, or starts one; `sampling` (0–1) decides where the caller did
    /// not.
    pub fn from_request(headers: &HeaderMap, sampling: f64) -> Self {
        let found = incoming(headers);
        let sampled = found.sampled.unwrap_or_else(|| fastrand::f64() < sampling);
        let (trace_id, parent_id) = match found.ids {
            Some((trace, parent)) => (trace, Some(parent)),
            None => (fastrand::u128(1..), None),
        };
        Self {
            trace_id,
            span_id: fastrand::u64(1..),
            parent_id,
            sampled,
            debug: found.debug,
            b3: found.b3,
            b3_short_trace: found.b3_short_trace && found.ids.is_some(),
            w3c: found.w3c,
        }
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    pub fn parent_id_hex(&self) -> Option<String> {
        self.parent_id.map(|p| format!("{p:016x}"))
    }

    /// Tells the upstream that Sluice's span is its parent.
    pub fn propagate(&self, request: &mut HeaderMap, zipkin: bool) -> pingora::Result<()> {
        let text = |text: String| {
            HeaderValue::try_from(text).map_err(|_| {
                pingora::Error::explain(pingora::ErrorType::InternalError, "trace header")
            })
        };
        let flags = if self.sampled { "01" } else { "00" };
        let traceparent = format!("00-{}-{}-{flags}", self.trace_id_hex(), self.span_id_hex());
        set(request, &TRACEPARENT, text(traceparent)?)?;
        // A tracestate without the traceparent it belonged to must not travel (W3C 3.3.1.1).
        if !self.w3c {
            request.remove(&TRACESTATE);
        }
        if self.b3 || zipkin {
            request.remove(&B3);
            let trace = if self.b3_short_trace {
                format!("{:016x}", self.trace_id as u64)
            } else {
                self.trace_id_hex()
            };
            set(request, &X_B3_TRACEID, text(trace)?)?;
            set(request, &X_B3_SPANID, text(self.span_id_hex())?)?;
            match self.parent_id_hex() {
                Some(parent) => set(request, &X_B3_PARENTSPANID, text(parent)?)?,
                None => {
                    request.remove(&X_B3_PARENTSPANID);
                }
            }
            if self.debug {
                // Debug implies sampled; B3 says not to send both.
                set(request, &X_B3_FLAGS, HeaderValue::from_static("1"))?;
                request.remove(&X_B3_SAMPLED);
            } else {
                request.remove(&X_B3_FLAGS);
                let sampled = HeaderValue::from_static(if self.sampled { "1" } else { "0" });
                set(request, &X_B3_SAMPLED, sampled)?;
            }
        }
        Ok(())
    }
}

/// One finished server span.
#[derive(Debug, Clone)]
pub struct Span {
    pub context: TraceContext,
    pub name: String,
    pub start: SystemTime,
    pub duration: Duration,
    pub status: u16,
    /// `(key, value)` tags, by the names Envoy's spans use (`http.method`, `http.status_code`…).
    pub tags: Vec<(&'static str, String)>,
}

fn micros(time: SystemTime) -> u128 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// Zipkin API v2 JSON: a list of spans.
fn zipkin_json(spans: &[Span], service: &str) -> Vec<u8> {
    let list: Vec<serde_json::Value> = spans
        .iter()
        .map(|span| {
            let tags: serde_json::Map<String, serde_json::Value> = span
                .tags
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            let mut value = json!({
                "traceId": span.context.trace_id_hex(),
                "id": span.context.span_id_hex(),
                "name": span.name,
                "kind": "SERVER",
                "timestamp": micros(span.start) as u64,
                "duration": span.duration.as_micros().max(1) as u64,
                "localEndpoint": {"serviceName": service},
                "tags": tags,
            });
            if let Some(parent) = span.context.parent_id_hex() {
                value["parentId"] = json!(parent);
            }
            value
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

/// OTLP/HTTP JSON (`ExportTraceServiceRequest`): ids as hex, times as nanosecond strings.
fn otlp_json(spans: &[Span], service: &str) -> Vec<u8> {
    let string = |key: &str, value: &str| json!({"key": key, "value": {"stringValue": value}});
    let list: Vec<serde_json::Value> = spans
        .iter()
        .map(|span| {
            let start = micros(span.start) * 1000;
            let end = start + span.duration.as_nanos();
            let mut value = json!({
                "traceId": span.context.trace_id_hex(),
                "spanId": span.context.span_id_hex(),
                "name": span.name,
                "kind": 2,
                "startTimeUnixNano": start.to_string(),
                "endTimeUnixNano": end.to_string(),
                "attributes": span.tags.iter().map(|(k, v)| string(k, v)).collect::<Vec<_>>(),
                // ERROR for 5xx, as Envoy marks them; UNSET otherwise.
                "status": {"code": if span.status >= 500 { 2 } else { 0 }},
            });
            if let Some(parent) = span.context.parent_id_hex() {
                value["parentSpanId"] = json!(parent);
            }
            value
        })
        .collect();
    let body = json!({"resourceSpans": [{
        "resource": {"attributes": [string("service.name", service)]},
        "scopeSpans": [{"scope": {"name": "sluice"}, "spans": list}],
    }]});
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Where request handling hands sampled spans over.
#[derive(Debug)]
pub struct SpanQueue {
    sender: mpsc::Sender<Span>,
}

impl SpanQueue {
    /// The queue and the service that sends its spans to the configured collector.
    pub fn new(live: Arc<Live>) -> (Arc<Self>, SpanSender) {
        let (sender, receiver) = mpsc::channel(QUEUE);
        (
            Arc::new(Self { sender }),
            SpanSender {
                live,
                receiver: tokio::sync::Mutex::new(receiver),
            },
        )
    }

    /// Queues a span for export; drops it (counted) when the queue is full or export has stopped.
    pub fn submit(&self, span: Span, live: &Live) {
        if self.sender.try_send(span).is_err() {
            live.metrics.record_spans("dropped", 1);
        }
    }
}

pub struct SpanSender {
    live: Arc<Live>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Span>>,
}

type Client = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

impl SpanSender {
    /// Sends one batch to the collector the current config names (it may change on reload).
    async fn send(&self, client: &Client, spans: &[Span]) {
        let Some(tracing) = self.live.current().snapshot.settings.tracing.clone() else {
            // Tracing was switched off by a reload: these spans have nowhere to go.
            self.live.metrics.record_spans("dropped", spans.len());
            return;
        };
        let body = encode(&tracing, spans);
        let request = http::Request::post(tracing.collector.endpoint().clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else {
            self.live.metrics.record_spans("failed", spans.len());
            return;
        };
        let result = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await;
        match result {
            Ok(Ok(response)) if response.status().is_success() => {
                self.live.metrics.record_spans("exported", spans.len());
                // Read to the end so the connection goes back to the pool.
                let body = http_body_util::BodyExt::collect(response.into_body());
                let _ = tokio::time::timeout(EXPORT_TIMEOUT, body).await;
            }
            Ok(Ok(response)) => self.failed(
                &tracing,
                spans.len(),
                &format!("status {}", response.status()),
            ),
            Ok(Err(e)) => self.failed(&tracing, spans.len(), &e.to_string()),
            Err(_) => self.failed(&tracing, spans.len(), "timed out"),
        }
    }

    fn failed(&self, tracing: &Tracing, count: usize, reason: &str) {
        self.live.metrics.record_spans("failed", count);
        warn!(
            "tracing: {count} spans not accepted by {}: {reason}",
            tracing.collector.endpoint()
        );
    }
}

fn encode(tracing: &Tracing, spans: &[Span]) -> Vec<u8> {
    match tracing.collector {
        Collector::Zipkin(_) => zipkin_json(spans, &tracing.service_name),
        Collector::OpenTelemetry(_) => otlp_json(spans, &tracing.service_name),
    }
}

#[async_trait]
impl BackgroundService for SpanSender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let tls = match crate::tls::client_config(None) {
            Ok(tls) => tls,
            Err(e) => {
                warn!("tracing: no TLS client ({e}); spans are not exported");
                return;
            }
        };
        let client: Client = HyperClient::builder(TokioExecutor::new()).build(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build(),
        );
        let mut receiver = self.receiver.lock().await;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let received = tokio::select! {
                n = receiver.recv_many(&mut batch, BATCH) => n,
                _ = shutdown.changed() => 0,
            };
            if received == 0 {
                break;
            }
            self.send(&client, &batch).await;
            batch.clear();
            // A full batch means more are waiting: send again at once. Otherwise let spans gather.
            if received < BATCH {
                tokio::select! {
                    _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
        // What is left goes out in batches, if the collector answers in time.
        receiver.close();
        while receiver.recv_many(&mut batch, BATCH).await > 0 {
            self.send(&client, &batch).await;
            batch.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn joins_w3c_and_b3_traces_and_keeps_their_decision() {
        let w3c = TraceContext::from_request(
            &headers(&[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )]),
            0.0,
        );
        assert_eq!(w3c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(w3c.parent_id_hex().as_deref(), Some("00f067aa0ba902b7"));
        assert!(w3c.sampled && !w3c.b3);
        let b3 = TraceContext::from_request(
            &headers(&[
                ("x-b3-traceid", "e457b5a2e4d86bd1"),
                ("x-b3-spanid", "05e3ac9a4f6e3b90"),
                ("x-b3-sampled", "0"),
            ]),
            1.0,
        );
        assert_eq!(b3.trace_id_hex(), "0000000000000000e457b5a2e4d86bd1");
        assert!(!b3.sampled && b3.b3);
        let single = TraceContext::from_request(
            &headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]),
            0.0,
        );
        assert!(single.sampled);
        // Broken context: a new trace, decided by the rate.
        for bad in [
            "00-0000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let fresh = TraceContext::from_request(&headers(&[("traceparent", bad)]), 0.0);
            assert!(fresh.parent_id.is_none() && !fresh.sampled, "{bad}");
        }
        assert!(TraceContext::from_request(&HeaderMap::new(), 1.0).sampled);
        // W3C is lower-case hex, four fields in version 00, one header.
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let fresh = TraceContext::from_request(&headers(&[("traceparent", bad)]), 0.0);
            assert!(fresh.parent_id.is_none(), "{bad}");
        }
        // A later version may add fields.
        let future = TraceContext::from_request(
            &headers(&[(
                "traceparent",
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later",
            )]),
            0.0,
        );
        assert!(future.parent_id.is_some());
    }

    #[test]
    fn b3_sampling_decisions_count_without_ids() {
        let deny = TraceContext::from_request(&headers(&[("b3", "0")]), 1.0);
        assert!(!deny.sampled && deny.parent_id.is_none() && deny.b3);
        let accept = TraceContext::from_request(&headers(&[("x-b3-sampled", "1")]), 0.0);
        assert!(accept.sampled);
        let debug = TraceContext::from_request(&headers(&[("b3", "d")]), 0.0);
        assert!(debug.sampled && debug.debug);
        // Both formats: W3C wins for the ids, and the B3 headers are rewritten, not forwarded.
        let both = TraceContext::from_request(
            &headers(&[
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ]),
            0.0,
        );
        assert!(both.b3 && both.w3c);
        // B3 ids have exact lengths.
        let short = TraceContext::from_request(
            &headers(&[
                ("x-b3-traceid", "e457b5a2e4d86bd1"),
                ("x-b3-spanid", "05e3ac9a"),
            ]),
            0.0,
        );
        assert!(short.parent_id.is_none());
    }
}
