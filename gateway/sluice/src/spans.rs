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
use http::HeaderMap;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use log::{debug, warn};
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use sluice_core::model::{Collector, Tracing};
use tokio::sync::mpsc;

use crate::state::Live;

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
    pub trace_id: [u8; 16],
    /// Sluice's own span.
    pub span_id: [u8; 8],
    /// The caller's span, when the request arrived inside a trace.
    pub parent_id: Option<[u8; 8]>,
    pub sampled: bool,
    /// The request carried B3 headers: answer in kind.
    b3: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from exactly `2N` hex digits (B3 allows a 64-bit trace id: left-padded with zeros).
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() > 2 * N || text.len() & 1 == 1 || text.is_empty() {
        return None;
    }
    let mut out = [0u8; N];
    let offset = N - text.len() / 2;
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[offset + i] = u8::from_str_radix(pair, 16).ok()?;
    }
    // All-zero ids are invalid in both W3C and B3.
    out.iter().any(|b| *b != 0).then_some(out)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for byte in &mut out {
        *byte = fastrand::u8(..);
    }
    if out.iter().all(|b| *b == 0) {
        out[N - 1] = 1;
    }
    out
}

/// The trace context a request arrived with.
struct Incoming {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    /// The caller's sampling decision, if it sent one.
    sampled: Option<bool>,
    b3: bool,
}

fn incoming(headers: &HeaderMap) -> Option<Incoming> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(parent) = header("traceparent") {
        let parts: Vec<&str> = parent.trim().split('-').collect();
        if let [version, trace, span, flags, ..] = parts[..] {
            let flags = u8::from_str_radix(flags, 16).ok();
            if version.len() == 2 && version != "ff" && trace.len() == 32 && span.len() == 16 {
                if let (Some(trace), Some(span), Some(flags)) = (unhex(trace), unhex(span), flags) {
                    return Some(Incoming {
                        trace_id: trace,
                        parent_id: span,
                        sampled: Some(flags & 1 == 1),
                        b3: false,
                    });
                }
            }
        }
    }
    let sampled = |value: &str| match value {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    };
    if let (Some(trace), Some(span)) = (header("x-b3-traceid"), header("x-b3-spanid")) {
        let decision = if header("x-b3-flags") == Some("1") {
            Some(true)
        } else {
            header("x-b3-sampled").and_then(sampled)
        };
        return Some(Incoming {
            trace_id: unhex(trace)?,
            parent_id: unhex(span)?,
            sampled: decision,
            b3: true,
        });
    }
    // Single-header B3: `{trace}-{span}[-{sampled}[-{parent}]]`.
    let single: Vec<&str> = header("b3")?.trim().split('-').collect();
    if single.len() >= 2 {
        let decision = single.get(2).and_then(|s| sampled(s));
        return Some(Incoming {
            trace_id: unhex(single[0])?,
            parent_id: unhex(single[1])?,
            sampled: decision,
            b3: true,
        });
    }
    None
}

impl TraceContext {
    /// Joins the request's trace, or starts one; `sampling` (0–1) decides where no decision
    /// arrived.
    pub fn from_request(headers: &HeaderMap, sampling: f64) -> Self {
        let decide = || fastrand::f64() < sampling;
        match incoming(headers) {
            Some(incoming) => Self {
                trace_id: incoming.trace_id,
                span_id: random(),
                parent_id: Some(incoming.parent_id),
                sampled: incoming.sampled.unwrap_or_else(decide),
                b3: incoming.b3,
            },
            None => Self {
                trace_id: random(),
                span_id: random(),
                parent_id: None,
                sampled: decide(),
                b3: false,
            },
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Tells the upstream that Sluice's span is its parent.
    pub fn propagate(&self, request: &mut RequestHeader, zipkin: bool) -> pingora::Result<()> {
        let flags = if self.sampled { "01" } else { "00" };
        request.insert_header(
            "traceparent",
            format!("00-{}-{}-{flags}", hex(&self.trace_id), hex(&self.span_id)),
        )?;
        if self.b3 || zipkin {
            request.remove_header("b3");
            request.insert_header("x-b3-traceid", hex(&self.trace_id))?;
            request.insert_header("x-b3-spanid", hex(&self.span_id))?;
            match self.parent_id {
                Some(parent) => request.insert_header("x-b3-parentspanid", hex(&parent))?,
                None => {
                    request.remove_header("x-b3-parentspanid");
                }
            }
            request.insert_header("x-b3-sampled", if self.sampled { "1" } else { "0" })?;
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
                "traceId": hex(&span.context.trace_id),
                "id": hex(&span.context.span_id),
                "name": span.name,
                "kind": "SERVER",
                "timestamp": micros(span.start) as u64,
                "duration": span.duration.as_micros().max(1) as u64,
                "localEndpoint": {"serviceName": service},
                "tags": tags,
            });
            if let Some(parent) = span.context.parent_id {
                value["parentId"] = json!(hex(&parent));
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
                "traceId": hex(&span.context.trace_id),
                "spanId": hex(&span.context.span_id),
                "name": span.name,
                "kind": 2,
                "startTimeUnixNano": start.to_string(),
                "endTimeUnixNano": end.to_string(),
                "attributes": span.tags.iter().map(|(k, v)| string(k, v)).collect::<Vec<_>>(),
                // ERROR for 5xx, as Envoy marks them; UNSET otherwise.
                "status": {"code": if span.status >= 500 { 2 } else { 0 }},
            });
            if let Some(parent) = span.context.parent_id {
                value["parentSpanId"] = json!(hex(&parent));
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
        let client: Client = HyperClient::builder(TokioExecutor::new()).build(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(crate::tls::client_config(None).unwrap_or_else(|e| {
                    debug!("tracing: {e}");
                    crate::tls::client_config_with_roots(rustls::RootCertStore::empty())
                }))
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
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
                _ = shutdown.changed() => break,
            }
        }
        // What is left goes out in one last batch, if the collector answers in time.
        while let Ok(span) = receiver.try_recv() {
            batch.push(span);
        }
        if !batch.is_empty() {
            self.send(&client, &batch).await;
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
        assert_eq!(
            w3c.parent_id.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
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
    }
}
