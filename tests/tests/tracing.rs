//! Span export: Sluice joins or starts traces, forwards its span as the parent, and posts sampled
//! spans to a collector (Zipkin v2 JSON or OTLP/HTTP JSON). The collector here is a real HTTP
//! server on loopback that records what it is sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sluice_tests::*;

/// What a collector received: `(path, content type, body)` per POST.
type Received = Arc<Mutex<Vec<(String, String, Value)>>>;

async fn collector() -> Result<(SocketAddr, Received)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let received: Received = Arc::default();
    let store = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        let kind = request
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = request.into_body().collect().await?.to_bytes();
                        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        if let Ok(mut all) = store.lock() {
                            all.push((path, kind, json));
                        }
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(
                            b"{}",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, received))
}

/// Waits until the collector holds `count` spans (as counted by `spans_of`).
async fn wait_for_spans(
    received: &Received,
    count: usize,
    spans_of: fn(&Value) -> Vec<Value>,
) -> Result<Vec<Value>> {
    let started = Instant::now();
    loop {
        let spans: Vec<Value> = received
            .lock()
            .map(|all| all.iter().flat_map(|(_, _, body)| spans_of(body)).collect())
            .unwrap_or_default();
        if spans.len() >= count {
            return Ok(spans);
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!(
                "collector got {} spans, expected {count}: {spans:?}",
                spans.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn config(port: u16, tracing: &str) -> Result<String> {
    let app = echo("app").await?;
    Ok(format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n\
         \x20 - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: app}}\n\
         spec:\n  hosts: [app.test]\n  gateways: [gw]\n  http:\n  - route: [{{destination: {{host: app.svc}}}}]\n",
        settings_yaml(tracing),
        service_entry_yaml("app", "app.svc", &[(app, "")])
    ))
}

fn zipkin_spans(body: &Value) -> Vec<Value> {
    body.as_array().cloned().unwrap_or_default()
}

fn otlp_spans(body: &Value) -> Vec<Value> {
    body["resourceSpans"][0]["scopeSpans"][0]["spans"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn get_with(port: u16, host: &str, headers: &[(&str, &str)]) -> Result<Echoed> {
    let mut request = client()
        .get(format!("http://127.0.0.1:{port}/items?q=1"))
        .header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request).await
}

const PARENT: &str = "00f067aa0ba902b7";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "current_thread")]
async fn zipkin_spans_join_the_callers_trace_and_keep_its_sampling_decision() -> Result<()> {
    let (collector, received) = collector().await?;
    let port = free_port();
    let tracing = format!(
        "  tracing:\n    sampling: 100\n    zipkin: {{endpoint: \"http://{collector}/api/v2/spans\"}}\n"
    );
    let gw = TestGateway::start(&config(port, &tracing).await?, &[port])?;

    // A new trace (100% sampled): Sluice's span is the root, and the upstream's parent.
    let fresh = get_with(port, "app.test", &[]).await?;
    assert_eq!(fresh.status, 200);
    // Inside a sampled W3C trace.
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let joined = get_with(port, "app.test", &[("traceparent", &traceparent)]).await?;
    // The caller decided not to sample: no span, and the upstream hears the same.
    let unsampled = format!("00-{TRACE}-{PARENT}-00");
    let skipped = get_with(port, "app.test", &[("traceparent", &unsampled)]).await?;
    assert!(skipped
        .request_header("traceparent")
        .is_some_and(|t| t.starts_with(&format!("00-{TRACE}-")) && t.ends_with("-00")));
    assert_eq!(skipped.request_header("x-b3-sampled"), Some("0"));
    // No route: Sluice's own 404 is traced too.
    get_with(port, "nothing.test", &[]).await?;

    let spans = wait_for_spans(&received, 3, zipkin_spans).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans_now = wait_for_spans(&received, 3, zipkin_spans).await?;
    assert_eq!(
        spans_now.len(),
        3,
        "the unsampled request was exported: {spans_now:?}"
    );
    let (path, kind, _) = received.lock().map(|r| r[0].clone()).unwrap_or_default();
    assert_eq!(
        (path.as_str(), kind.as_str()),
        ("/api/v2/spans", "application/json")
    );

    let by_trace = |trace: &str| spans.iter().find(|s| s["traceId"] == trace).cloned();
    // The root span: its ids are what the upstream was told.
    let upstream_parent = fresh
        .request_header("traceparent")
        .unwrap_or("")
        .to_string();
    let parts: Vec<&str> = upstream_parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{upstream_parent}");
    let root = by_trace(parts[1]).unwrap_or_default();
    assert_eq!(root["id"], parts[2]);
    assert!(root.get("parentId").is_none(), "{root}");
    assert_eq!(root["name"], "app.svc:80/*");
    assert_eq!(root["kind"], "SERVER");
    assert_eq!(root["localEndpoint"]["serviceName"], "sluice");
    assert_eq!(root["tags"]["http.status_code"], "200");
    assert_eq!(root["tags"]["http.method"], "GET");
    assert_eq!(root["tags"]["http.url"], "http://app.test/items");
    assert_eq!(
        root["tags"]["guid:x-request-id"],
        fresh.request_header("x-request-id").unwrap_or("")
    );
    assert_eq!(fresh.request_header("x-b3-traceid"), Some(parts[1]));
    assert_eq!(fresh.request_header("x-b3-spanid"), Some(parts[2]));
    assert!(root["duration"].as_u64().is_some_and(|d| d > 0));
    // The joined span: child of the caller's span, parent of the upstream's.
    let child = by_trace(TRACE).unwrap_or_default();
    assert_eq!(child["parentId"], PARENT);
    let forwarded = joined.request_header("traceparent").unwrap_or("");
    assert_eq!(
        forwarded,
        format!("00-{TRACE}-{}-01", child["id"].as_str().unwrap_or(""))
    );
    assert_eq!(joined.request_header("x-b3-parentspanid"), Some(PARENT));
    // The 404 span.
    assert!(
        spans
            .iter()
            .any(|s| s["tags"]["http.status_code"] == "404" && s["tags"]["response_flags"] == "NR"),
        "{spans:?}"
    );
    let metrics = gw.metrics().await?;
    assert!(
        metrics.contains("sluice_tracing_spans_total{result=\"exported\"} 3"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn opentelemetry_spans_follow_the_sampling_rate_and_incoming_decisions() -> Result<()> {
    let (collector, received) = collector().await?;
    let port = free_port();
    let tracing = format!(
        "  tracing:\n    sampling: 0\n    serviceName: edge\n    opentelemetry: {{endpoint: \"http://{collector}/v1/traces\"}}\n"
    );
    let _gw = TestGateway::start(&config(port, &tracing).await?, &[port])?;
    // 0%: new traces are not sampled, but still propagated (so the upstream joins one trace).
    for _ in 0..5 {
        let r = get_with(port, "app.test", &[]).await?;
        assert!(r
            .request_header("traceparent")
            .is_some_and(|t| t.ends_with("-00")));
        // W3C only: no B3 headers are invented for an OpenTelemetry collector.
        assert_eq!(r.request_header("x-b3-traceid"), None);
    }
    // `tracestate` travels with the traceparent it belongs to, never with a trace Sluice started.
    let unsampled = format!("00-{TRACE}-{PARENT}-00");
    let r = get_with(
        port,
        "app.test",
        &[("traceparent", &unsampled), ("tracestate", "a=1")],
    )
    .await?;
    assert_eq!(r.request_header("tracestate"), Some("a=1"));
    let r = get_with(port, "app.test", &[("tracestate", "a=1")]).await?;
    assert_eq!(r.request_header("tracestate"), None);
    // A caller's sampled decision wins over the rate; B3 callers are answered in B3.
    let r = get_with(
        port,
        "app.test",
        &[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "1"),
        ],
    )
    .await?;
    assert_eq!(r.request_header("x-b3-traceid"), Some(TRACE));
    let spans = wait_for_spans(&received, 1, otlp_spans).await?;
    assert_eq!(spans.len(), 1, "{spans:?}");
    let span = &spans[0];
    assert_eq!(span["traceId"], TRACE);
    assert_eq!(span["parentSpanId"], PARENT);
    assert_eq!(
        Some(span["spanId"].as_str().unwrap_or("")),
        r.request_header("x-b3-spanid")
    );
    assert_eq!(span["kind"], 2);
    let start: u128 = span["startTimeUnixNano"].as_str().unwrap_or("0").parse()?;
    let end: u128 = span["endTimeUnixNano"].as_str().unwrap_or("0").parse()?;
    assert!(end > start && start > 1_600_000_000_000_000_000, "{span}");
    let attributes = span["attributes"].as_array().cloned().unwrap_or_default();
    assert!(attributes
        .iter()
        .any(|a| a["key"] == "http.status_code" && a["value"]["stringValue"] == "200"));
    let body = received.lock().map(|r| r[0].clone()).unwrap_or_default();
    assert_eq!(body.0, "/v1/traces");
    assert_eq!(
        body.2["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
        "edge"
    );
    Ok(())
}
