//! A small HTTP backend that answers with who it is and what it received, as JSON.
//!
//! `sluice demo` runs two of them (v1, v2) behind the canary split; the end-to-end tests use the same
//! server as their upstream, so what a test asserts is exactly what a demo user sees.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Starts an echo server named `name` on `listener` (HTTP/1.1 and h2c) and serves until the runtime
/// stops.
pub fn spawn(name: String, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let name: std::sync::Arc<str> = name.into();
        // Numbers connections so clients can see whether a proxy reuses them.
        let mut connections = 0u64;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            connections += 1;
            let connection = connections;
            let name = name.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(name.clone(), connection, req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// Binds `addr` and starts an echo server there; returns the bound address.
pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    spawn(name.to_string(), listener);
    Ok(local)
}

async fn answer(
    name: std::sync::Arc<str>,
    connection: u64,
    req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let (parts, body) = req.into_parts();
    // `?sleep_ms=N` delays the answer (at most 10 s): a slow upstream for shutdown tests and demos.
    let sleep_ms = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sleep_ms=")))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |ms| ms.min(10_000));
    if sleep_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(sleep_ms)).await;
    }
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let report = serde_json::json!({
        "backend": &*name,
        "connection": connection,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        // Over HTTP/1.1, set only for an absolute-form request target (`GET http://host/path`).
        "target_authority": parts.uri.authority().map(|a| a.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body.len(),
    });
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return Ok(grpc_echo(&name, body));
    }
    let mut text = report.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = http::HeaderValue::from_str(&name) {
        response.headers_mut().insert("x-backend", value);
    }
    Ok(response)
}

/// A gRPC call: the request's (already length-prefixed) message comes back unchanged, and the
/// status travels in trailers, as gRPC over HTTP/2 requires.
fn grpc_echo(name: &str, message: Bytes) -> Response<BoxBody<Bytes, Infallible>> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    if let Ok(value) = http::HeaderValue::from_str(&format!("echo from {name}")) {
        trailers.insert("grpc-message", value);
    }
    let body = Full::new(message)
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}
