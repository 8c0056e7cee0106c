//! The Pingora `ProxyHttp` implementation: one instance per listener port.
//!
//! Deliberately thin: `request_filter` asks the snapshot which route matches and answers 404,
//! redirects and direct responses itself; `upstream_peer` picks the weighted target and an endpoint;
//! the upstream/response filters apply the route's rewrite and header rules. Policy lives in
//! `sluice-core`, not here. Each request loads one generation into its context and keeps it.

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use log::warn;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::ALPN;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy};
use pingora::{ErrorSource, ErrorType};
use sluice_core::model::{Action, HeaderOps, UpstreamProtocol};
use sluice_core::snapshot::{redirect_location, rewrite_path, RequestInfo, Route, RouteLookup};

use crate::headers::{
    self, apply_ops, X_ENVOY_EXTERNAL_ADDRESS, X_FORWARDED_CLIENT_CERT, X_FORWARDED_FOR,
    X_FORWARDED_PROTO, X_REQUEST_ID,
};
use crate::metrics::{RequestKey, ResponseFlag};
use crate::state::{Generation, Live};

pub struct GatewayProxy {
    pub port: u16,
    pub live: Arc<Live>,
    /// The listener terminates TLS: the scheme is https.
    pub tls: bool,
}

/// The type of Sluice's own bodies: what Envoy sends with a direct response's or a local reply's.
const PLAIN_TEXT: HeaderValue = HeaderValue::from_static("text/plain");

/// Longest client-supplied value put in a span tag (Envoy's default `max_path_tag_length`).
const MAX_TAG_LENGTH: usize = 256;

/// Per-request state: the generation this request uses from start to end, and what routing chose.
#[derive(Default)]
pub struct RequestCtx {
    /// Held for the whole request so shutdown can wait for it.
    _in_flight: Option<crate::state::InFlight>,
    generation: Option<Arc<Generation>>,
    route: Option<Arc<Route>>,
    matched: Option<usize>,
    target: Option<usize>,
    /// Why Sluice itself failed the request, for the error body.
    failure: Option<&'static str>,
    started: Option<std::time::Instant>,
    flag: ResponseFlag,
    mutual_tls: bool,
    /// `x-request-id`, as received or generated; echoed to the client.
    request_id: Option<HeaderValue>,
    /// The endpoint the request was sent to.
    upstream: Option<std::net::SocketAddr>,
    /// This hop in the request's trace, when tracing is configured.
    trace: Option<crate::spans::TraceContext>,
    /// Wall-clock start, for the span.
    started_at: Option<std::time::SystemTime>,
}

impl RequestCtx {
    fn target(&self) -> Option<&sluice_core::snapshot::Target> {
        self.route.as_ref()?.targets.get(self.target?)
    }
}

/// The parts of Pingora's request header that routing reads.
fn request_info<'a>(req: &'a RequestHeader, port: u16, scheme: &'static str) -> RequestInfo<'a> {
    let authority = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    RequestInfo {
        method: req.method.as_str(),
        scheme,
        authority,
        path: req.uri.path(),
        query: req.uri.query(),
        headers: &req.headers,
        port,
    }
}

/// Answers a request from Sluice itself, keeping the connection open. `rules` are the matched
/// route's response header rules, which apply to redirects and direct responses too.
async fn respond(
    session: &mut Session,
    status: u16,
    extra: Option<(header::HeaderName, HeaderValue)>,
    body: Bytes,
    request_id: Option<&HeaderValue>,
    rules: Option<&HeaderOps>,
    live: &Live,
) -> Result<()> {
    // Content type and length, `extra`, the request id, a draining close; and the route's rules.
    let capacity = 5 + headers::ADDED_WHEN_WRITTEN + headers::added_by(rules);
    let mut parts = headers::new_response(status, capacity)?;
    let out = &mut parts.headers;
    // As from Envoy: a redirect or an empty direct response has no type.
    if !body.is_empty() {
        headers::set(out, &header::CONTENT_TYPE, PLAIN_TEXT)?;
    }
    headers::set(out, &header::CONTENT_LENGTH, HeaderValue::from(body.len()))?;
    if let Some((name, value)) = extra {
        headers::set(out, &name, value)?;
    }
    if let Some(id) = request_id {
        headers::set(out, &X_REQUEST_ID, id.clone())?;
    }
    if let Some(rules) = rules {
        apply_ops(out, rules)?;
    }
    close_if_draining(session, out, live)?;
    let resp = ResponseHeader::from(parts);
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), body.is_empty() || head_only)
        .await?;
    if !body.is_empty() && !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Answers a failed request as Pingora's error responses do (closing the connection: what was
/// read of the request is unknown), with a short reason and the request's `x-request-id`.
async fn respond_error(
    session: &mut Session,
    code: u16,
    reason: &'static str,
    ctx: &RequestCtx,
) -> Result<()> {
    let mut resp = pingora::protocols::http::ServerSession::generate_error(code);
    // Content type and length, the request id.
    headers::edit_response(&mut resp, 3 + headers::ADDED_WHEN_WRITTEN, |parts| {
        let out = &mut parts.headers;
        headers::set(out, &header::CONTENT_TYPE, PLAIN_TEXT)?;
        headers::set(
            out,
            &header::CONTENT_LENGTH,
            HeaderValue::from(reason.len()),
        )?;
        match &ctx.request_id {
            Some(id) => headers::set(out, &X_REQUEST_ID, id.clone()),
            None => Ok(()),
        }
    })?;
    session
        .as_downstream_mut()
        .write_error_response(resp, Bytes::from_static(reason.as_bytes()))
        .await
}

/// While draining, HTTP/1.1 responses say `Connection: close` so clients move to new connections
/// (on other replicas, or the upgraded process) before listeners stop, instead of racing a close
/// with their next request on an idle keep-alive connection. This is what Envoy does when draining.
fn close_if_draining(session: &mut Session, out: &mut HeaderMap, live: &Live) -> Result<()> {
    if live.is_closing() && !session.is_http2() {
        headers::set(out, &header::CONNECTION, HeaderValue::from_static("close"))?;
        session.set_keepalive(None);
    }
    Ok(())
}

/// The `x-request-id` the client sent, if any (an empty one counts as none).
fn client_request_id(request: &HeaderMap) -> Option<&HeaderValue> {
    request.get(X_REQUEST_ID).filter(|v| !v.is_empty())
}

/// Keeps the client's `x-request-id`, or sets a new random (version 4) UUID, so a request can be
/// followed through logs and upstreams. Set before routing, as Envoy does: routes may match on it.
fn ensure_request_id(request: &mut HeaderMap) -> Result<HeaderValue> {
    if let Some(id) = client_request_id(request) {
        return Ok(id.clone());
    }
    let value = HeaderValue::from_bytes(&uuid_v4(fastrand::u128(..)))
        .map_err(|_| fail("request id", 500))?;
    headers::set(request, &X_REQUEST_ID, value.clone())?;
    Ok(value)
}

/// `uri` with another path, its query, scheme and authority kept: an HTTP/2 request's authority is
/// in its URI, and an HTTP/2 upstream needs it. `None` if the result is not a valid URI.
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// `bits` as a version 4, RFC 4122 variant UUID in its 36-character text form. Written digit by
/// digit: this runs for every request without an id, and `format!` costs several times more.
fn uuid_v4(bits: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Version 4 and the RFC 4122 variant, in their fixed places.
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let mut text = [b'-'; 36];
    let mut nibble = 32;
    for (at, byte) in text.iter_mut().enumerate() {
        if matches!(at, 8 | 13 | 18 | 23) {
            continue;
        }
        nibble -= 1;
        *byte = HEX[((bits >> (nibble * 4)) & 0xf) as usize];
    }
    text
}

/// Envoy's response flag for an error Sluice did not classify itself.
fn flag_of(error: &Error) -> ResponseFlag {
    match (error.esource(), error.etype()) {
        (
            _,
            ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::ConnectTimedout
            | ErrorType::TLSHandshakeFailure
            | ErrorType::InvalidCert,
        ) => ResponseFlag::UpstreamConnectFailure,
        (ErrorSource::Upstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => {
            ResponseFlag::UpstreamTimeout
        }
        (ErrorSource::Upstream, _) => ResponseFlag::UpstreamTermination,
        (ErrorSource::Downstream, _) => ResponseFlag::DownstreamTermination,
        _ => ResponseFlag::None,
    }
}

/// Bytes of a header block as sent on HTTP/1.1 (`name: value\r\n` each): Istio's sizes include
/// headers.
fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// Removes `.`/`..` segments before routing (Istio's default path normalization), so the route that
/// matches is the one for the path the upstream will serve.
fn normalize_request_path(uri: &mut http::Uri) -> Result<()> {
    let Some(path) = sluice_core::snapshot::normalize_path(uri.path()) else {
        return Ok(());
    };
    match with_path(uri, &path) {
        Some(normalized) => {
            *uri = normalized;
            Ok(())
        }
        None => Err(Error::explain(ErrorType::HTTPStatus(400), "invalid path")),
    }
}

/// Istio's `numTrustedProxies` (Envoy's `xff_num_trusted_hops`): with N proxies in front that each
/// append to X-Forwarded-For, the client is the N-th address from the right of what arrived. With 0,
/// or too few entries, nothing in the header is believed.
fn trusted_client(forwarded: &str, trusted_hops: u32) -> Option<IpAddr> {
    let hops = usize::try_from(trusted_hops).ok().filter(|n| *n > 0)?;
    let entries: Vec<&str> = forwarded.split(',').map(str::trim).collect();
    let index = entries.len().checked_sub(hops)?;
    entries.get(index)?.parse().ok()
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// An address as a header value. IPv4 is written digit by digit: this runs for every proxied
/// request, and `Display` costs several times more.
fn address_value(ip: IpAddr) -> Result<HeaderValue> {
    let value = match ip {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    text[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    text[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                text[len] = b'0' + octet % 10;
                len += 1;
            }
            HeaderValue::from_bytes(&text[..len])
        }
        IpAddr::V6(v6) => HeaderValue::from_str(&v6.to_string()),
    };
    value.map_err(|_| fail("address", 500))
}

fn fail(failure: &'static str, status: u16) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), failure)
}

impl GatewayProxy {
    /// The key authorization for an HTTP-01 validation request, if this is one Sluice can answer.
    async fn acme_http_answer(&self, session: &Session, generation: &Generation) -> Option<String> {
        let request = session.req_header();
        let token = request
            .uri
            .path()
            .strip_prefix(crate::acme::HTTP_CHALLENGE_PREFIX)?;
        if request.method != http::Method::GET && request.method != http::Method::HEAD {
            return None;
        }
        let certs_dir = &generation.snapshot.settings.certs_dir;
        self.live
            .acme
            .challenges
            .http_answer(certs_dir, token)
            .await
    }

    /// One server span for a sampled request, named as Istio names gateway spans
    /// (`<destination host>:<port>/*`), with Envoy's tags.
    fn export_span(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        trace: &crate::spans::TraceContext,
        status: u16,
        flag: ResponseFlag,
        millis: f64,
    ) {
        let Some(queue) = self.live.spans.get() else {
            return;
        };
        let request = session.req_header();
        let authority = request_info(request, self.port, self.scheme()).authority;
        // Client-controlled values are cut to Envoy's tag length (its max_path_tag_length), so a
        // span stays small whatever the request carried.
        let cut = |text: &str| -> String {
            let mut end = text.len().min(MAX_TAG_LENGTH);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].to_string()
        };
        let name = match ctx.target() {
            Some(target) => format!("{}:{}/*", target.service.host, target.service.port),
            None => cut(&format!("{}/*", authority.to_ascii_lowercase())),
        };
        let mut tags = vec![
            ("component", "proxy".to_string()),
            ("http.method", request.method.to_string()),
            (
                "http.url",
                cut(&format!(
                    "{}://{authority}{}",
                    self.scheme(),
                    request.uri.path()
                )),
            ),
            (
                "http.protocol",
                if session.is_http2() {
                    "HTTP/2"
                } else {
                    "HTTP/1.1"
                }
                .to_string(),
            ),
            ("http.status_code", status.to_string()),
            ("response_flags", flag.as_str().to_string()),
        ];
        if let Some(id) = ctx.request_id.as_ref().and_then(|v| v.to_str().ok()) {
            tags.push(("guid:x-request-id", cut(id)));
        }
        if let Some(target) = ctx.target() {
            tags.push(("upstream_cluster", target.service.to_string()));
        }
        if let Some(upstream) = ctx.upstream {
            tags.push(("upstream_address", upstream.to_string()));
        }
        if status >= 500 {
            tags.push(("error", "true".to_string()));
        }
        let span = crate::spans::Span {
            context: trace.clone(),
            name,
            start: ctx.started_at.unwrap_or_else(std::time::SystemTime::now),
            duration: std::time::Duration::from_secs_f64(millis.max(0.0) / 1000.0),
            status,
            tags,
        };
        queue.submit(span, &self.live);
    }

    /// X-Forwarded-For: every line the client sent, in order, then the address Sluice saw; and
    /// x-envoy-external-address: the client as `numTrustedProxies` says to believe it.
    fn set_forwarded_for(&self, out: &mut HeaderMap, ip: IpAddr, ctx: &RequestCtx) -> Result<()> {
        let mut sent = String::new();
        for value in out.get_all(X_FORWARDED_FOR) {
            if !sent.is_empty() {
                sent.push_str(", ");
            }
            sent.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        let trusted_hops = ctx
            .generation
            .as_ref()
            .map_or(0, |g| g.snapshot.settings.num_trusted_proxies);
        let external = trusted_client(&sent, trusted_hops).unwrap_or(ip);
        // The usual case, a client without X-Forwarded-For, formats its address once for both.
        let client = address_value(ip)?;
        let external = if external == ip {
            client.clone()
        } else {
            address_value(external)?
        };
        let forwarded = if sent.is_empty() {
            client
        } else {
            HeaderValue::from_str(&format!("{sent}, {ip}"))
                .map_err(|_| fail("x-forwarded-for", 400))?
        };
        headers::set(out, &X_FORWARDED_FOR, forwarded)?;
        headers::set(out, &X_ENVOY_EXTERNAL_ADDRESS, external)
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// On a TLS listener, the request's host must belong to the server that accepted the
    /// connection, under that server's current client-certificate policy; otherwise 421 Misdirected
    /// Request (RFC 9110), and the client opens a connection for that name. Returns the session.
    fn check_tls_session(
        &self,
        session: &Session,
        generation: &Generation,
    ) -> std::result::Result<Option<crate::tls::TlsSession>, &'static str> {
        if !self.tls {
            return Ok(None);
        }
        let tls_session = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|ssl| ssl.extension.get::<crate::tls::TlsSession>())
            .cloned()
            .ok_or("misdirected request: no TLS session\n")?;
        let info = request_info(session.req_header(), self.port, "https");
        let host = sluice_core::snapshot::host_of_authority(info.authority);
        let listener = generation
            .snapshot
            .listener(self.port)
            .ok_or("misdirected request: this port no longer serves TLS\n")?;
        match listener.tls.decide(Some(host)) {
            sluice_core::snapshot::TlsDecision::Terminate(_, server)
                if *server.label == *tls_session.server =>
            {
                let needs_certificate = server.tls.mode == sluice_core::model::TlsMode::Mutual;
                if needs_certificate && tls_session.identity.is_none() {
                    return Err(
                        "misdirected request: this host requires a client certificate; reconnect\n",
                    );
                }
                Ok(Some(tls_session))
            }
            _ => Err("misdirected request: the TLS connection was made for another server name\n"),
        }
    }

    /// `x-forwarded-client-cert` carries the verified client certificate (mutual TLS) and nothing
    /// else: whatever a client sent under that name is dropped, so routes can match on it.
    fn set_client_certificate_header(
        &self,
        session: &mut Session,
        tls_session: Option<&crate::tls::TlsSession>,
    ) -> Result<()> {
        let identity = tls_session
            .and_then(|s| s.identity.as_ref())
            .map(|identity| identity.xfcc.clone());
        let req = session.req_header_mut();
        if identity.is_none() && !req.headers.contains_key(X_FORWARDED_CLIENT_CERT) {
            return Ok(());
        }
        headers::edit_request(req, 1, |parts| match identity {
            Some(xfcc) => {
                let value =
                    HeaderValue::try_from(xfcc).map_err(|_| fail("client certificate", 500))?;
                headers::set(&mut parts.headers, &X_FORWARDED_CLIENT_CERT, value)
            }
            None => {
                parts.headers.remove(X_FORWARDED_CLIENT_CERT);
                Ok(())
            }
        })
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::default()
    }

    /// None: Pingora's default adds a response-compression module, disabled, that still builds
    /// its state and runs its filters on every request. Sluice does not compress, as Istio's
    /// gateways do not unless configured to.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx._in_flight = Some(self.live.request_started());
        ctx.started = Some(std::time::Instant::now());
        let generation = self.live.current();
        // First, so every later read and edit of the request is of the plain map (and routing
        // sees the request id).
        let request = session.req_header_mut();
        let new_id = usize::from(client_request_id(&request.headers).is_none());
        let edited = headers::edit_request(request, new_id, |parts| {
            normalize_request_path(&mut parts.uri)?;
            ensure_request_id(&mut parts.headers)
        });
        // A request refused from here on is logged and counted against this generation.
        match edited {
            Ok(id) => ctx.request_id = Some(id),
            Err(e) => {
                ctx.generation = Some(generation);
                return Err(e);
            }
        }
        // Refused before an upstream is chosen (the options are stripped on the way up), with
        // the request id like any answer of Sluice's own.
        if let Err(reason) = headers::check_connection_options(&session.req_header().headers) {
            ctx.generation = Some(generation);
            ctx.failure = Some(reason);
            return Err(fail(reason, 400));
        }
        if let Some(tracing) = &generation.snapshot.settings.tracing {
            ctx.trace = Some(crate::spans::TraceContext::from_request(
                &session.req_header().headers,
                tracing.sampling,
            ));
            ctx.started_at = Some(std::time::SystemTime::now());
        }
        // Before routing and https redirects: the CA validates over plain HTTP, whatever the
        // routes say. A token Sluice does not know falls through to the routes.
        if !self.tls {
            if let Some(answer) = self.acme_http_answer(session, &generation).await {
                ctx.generation = Some(generation);
                let id = ctx.request_id.as_ref();
                respond(
                    session,
                    200,
                    None,
                    Bytes::from(answer),
                    id,
                    None,
                    &self.live,
                )
                .await?;
                return Ok(true);
            }
        }
        let tls_session = match self.check_tls_session(session, &generation) {
            Ok(tls_session) => tls_session,
            Err(reason) => {
                ctx.generation = Some(generation);
                respond(
                    session,
                    421,
                    None,
                    Bytes::from_static(reason.as_bytes()),
                    ctx.request_id.as_ref(),
                    None,
                    &self.live,
                )
                .await?;
                return Ok(true);
            }
        };
        ctx.mutual_tls = tls_session.as_ref().is_some_and(|s| s.identity.is_some());
        self.set_client_certificate_header(session, tls_session.as_ref())?;
        let info = request_info(session.req_header(), self.port, self.scheme());
        let lookup = generation.snapshot.route(&info);
        if matches!(
            lookup,
            RouteLookup::NoListener | RouteLookup::NoHost | RouteLookup::NoRoute
        ) {
            ctx.flag = ResponseFlag::NoRoute;
        }
        let answer = match lookup {
            RouteLookup::NoListener | RouteLookup::NoHost => Some((
                404,
                None,
                Bytes::from_static(b"no route: no virtual host serves this host\n"),
            )),
            RouteLookup::HttpsRedirect => {
                // Envoy's require_tls redirect, which Istio configures: the Host as sent, then the
                // path and query.
                let path = info.path;
                let location = match info.query {
                    Some(q) => format!("https://{}{path}?{q}", info.authority),
                    None => format!("https://{}{path}", info.authority),
                };
                let value = HeaderValue::from_str(&location).map_err(|_| {
                    Error::explain(ErrorType::HTTPStatus(400), "host is not a valid header")
                })?;
                Some((301, Some((header::LOCATION, value)), Bytes::new()))
            }
            RouteLookup::NoRoute => Some((
                404,
                None,
                Bytes::from_static(b"no route: no route matches this request\n"),
            )),
            RouteLookup::Found { route, matched } => {
                ctx.route = Some(route.clone());
                ctx.matched = matched;
                // A forwarding route is the usual case: known without reading its definition.
                if route.forwards() {
                    ctx.target = route.targets.pick();
                    None
                } else {
                    match &route.def.action {
                        Action::Redirect(redirect) => {
                            let location = redirect_location(redirect, &info);
                            let value = HeaderValue::from_str(&location).map_err(|_| {
                                Error::explain(
                                    ErrorType::HTTPStatus(400),
                                    "redirect target is not a valid header",
                                )
                            })?;
                            Some((redirect.code, Some((header::LOCATION, value)), Bytes::new()))
                        }
                        Action::Respond(direct) => {
                            Some((direct.status, None, Bytes::copy_from_slice(&direct.body)))
                        }
                        // `forwards()` said no.
                        Action::Forward(_) => None,
                    }
                }
            }
        };
        ctx.generation = Some(generation);
        match answer {
            Some((status, extra, body)) => {
                let rules = ctx.route.as_ref().and_then(|r| r.response_headers());
                let id = ctx.request_id.as_ref();
                respond(session, status, extra, body, id, rules, &self.live).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let (Some(generation), Some(target)) = (ctx.generation.as_ref(), ctx.target()) else {
            return Err(fail("no route", 404));
        };
        let addr = match crate::upstream::endpoint_address(generation, &self.live, target.cluster) {
            Ok(addr) => addr,
            Err(reason) => {
                ctx.failure = Some(reason);
                ctx.flag = ResponseFlag::NoHealthyUpstream;
                return Err(fail("no healthy upstream", 503));
            }
        };
        let cluster = generation
            .snapshot
            .cluster(target.cluster)
            .ok_or_else(|| fail("no cluster", 503))?;
        let origination = generation.tls.origination(target.cluster);
        let mut peer = match origination {
            Some(tls) => {
                let mut peer = HttpPeer::new(addr, true, tls.sni.clone());
                peer.options.verify_cert = tls.verify;
                peer.options.verify_hostname = tls.verify;
                peer.options.ca = tls.ca.clone();
                peer.client_cert_key = tls.client.clone();
                peer
            }
            None => HttpPeer::new(addr, false, String::new()),
        };
        peer.options.connection_timeout = Some(crate::upstream::CONNECT_TIMEOUT);
        // Hop-by-hop fields are stripped in `upstream_request_filter`, on the plain map.
        peer.options.http_upstream_request_policy = HttpUpstreamRequestPolicy::preserve();
        if cluster.protocol == UpstreamProtocol::Http2 {
            // HTTP/2 only: over TLS by ALPN, in plaintext with prior knowledge (h2c), as gRPC
            // backends expect.
            peer.options.alpn = ALPN::H2;
        }
        ctx.upstream = Some(addr);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let client = client_ip(session);
        // Pingora has set the version the upstream speaks. Between two HTTP/2 hops nothing is
        // stripped, as by Pingora's own policy: HTTP/2 has no connection-specific fields
        // (RFC 9113 §8.2.2), and `te: trailers` is gRPC's.
        let downstream_version = session.req_header().version;
        let upstream_h1 = upstream_request.version != http::Version::HTTP_2;
        let strip = upstream_h1 || downstream_version != http::Version::HTTP_2;
        let websocket_allowed = upstream_h1 && downstream_version == http::Version::HTTP_11;
        let route = ctx.route.as_deref();
        let target_rules = ctx.target().and_then(|t| t.request_headers());
        let route_rules = route.and_then(|r| r.request_headers());
        let one_destination = route.is_some_and(|r| r.targets.is_single());
        // X-Forwarded-For, the external address, the scheme, a rewritten Host; then trace context
        // and the rules.
        let extra = 4
            + usize::from(ctx.trace.is_some()) * crate::spans::PROPAGATED
            + headers::added_by(target_rules)
            + headers::added_by(route_rules);
        headers::edit_request(upstream_request, extra, |request| {
            let out = &mut request.headers;
            if strip {
                headers::strip_hop_by_hop(out, websocket_allowed)?;
            }
            if let Some(ip) = client {
                self.set_forwarded_for(out, ip, ctx)?;
            }
            headers::set(
                out,
                &X_FORWARDED_PROTO,
                HeaderValue::from_static(self.scheme()),
            )?;
            if let (Some(trace), Some(generation)) = (&ctx.trace, &ctx.generation) {
                let zipkin = matches!(
                    generation
                        .snapshot
                        .settings
                        .tracing
                        .as_ref()
                        .map(|t| &t.collector),
                    Some(sluice_core::model::Collector::Zipkin(_))
                );
                trace.propagate(out, zipkin)?;
            }
            // An absolute-form request's authority is its Host by now (`headers::edit_request`).
            let Some(route) = route else {
                return Ok(());
            };
            let rewrite = route.rewrite();
            if let Some(uri_rewrite) = rewrite.and_then(|r| r.uri.as_ref()) {
                let path =
                    rewrite_path(uri_rewrite, request.uri.path(), route.matched(ctx.matched));
                match with_path(&request.uri, &path) {
                    Some(uri) => request.uri = uri,
                    None => {
                        warn!(
                            "{}: rewrite produced an invalid path {path:?}",
                            route.def.label
                        );
                        return Err(fail("rewrite produced an invalid path", 500));
                    }
                }
            }
            let out = &mut request.headers;
            if let Some(authority) = rewrite.and_then(|r| r.authority.as_ref()) {
                headers::set(out, &header::HOST, authority.clone())?;
            }
            headers::apply_route_ops(out, route_rules, target_rules, one_destination)
        })
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let target_rules = ctx.target().and_then(|t| t.response_headers());
        let route_rules = ctx.route.as_ref().and_then(|r| r.response_headers());
        let one_destination = ctx.route.as_ref().is_some_and(|r| r.targets.is_single());
        // The request id, a draining close; then the rules.
        let extra = 1
            + headers::ADDED_WHEN_WRITTEN
            + usize::from(self.live.is_closing())
            + headers::added_by(target_rules)
            + headers::added_by(route_rules);
        headers::edit_response(upstream_response, extra, |response| {
            let out = &mut response.headers;
            close_if_draining(session, out, &self.live)?;
            if let Some(id) = &ctx.request_id {
                headers::set(out, &X_REQUEST_ID, id.clone())?;
            }
            headers::apply_route_ops(out, route_rules, target_rules, one_destination)
        })
    }

    /// Metrics, once per request whatever happened to it.
    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        let Some(generation) = ctx.generation.as_ref() else {
            return;
        };
        let flag = match (ctx.flag, error) {
            (ResponseFlag::None, Some(e)) => flag_of(e),
            (flag, _) => flag,
        };
        let request = session.req_header();
        let grpc = request
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let request_bytes =
            header_bytes(&request.headers) + request.uri.path().len() + session.body_bytes_read();
        let (code, response_bytes) = match session.response_written() {
            Some(response) => (
                response.status.as_u16(),
                header_bytes(&response.headers) + session.body_bytes_sent(),
            ),
            None => (0, 0),
        };
        let millis = ctx
            .started
            .map_or(0.0, |started| started.elapsed().as_secs_f64() * 1000.0);
        let key = RequestKey {
            grpc,
            code,
            flag,
            mutual_tls: ctx.mutual_tls,
        };
        let cluster = ctx.target().map(|t| t.cluster);
        generation.series(cluster).record(
            &self.live.metrics,
            key,
            millis,
            request_bytes,
            response_bytes,
        );
        if let Some(trace) = ctx.trace.as_ref().filter(|t| t.sampled) {
            self.export_span(session, ctx, trace, code, flag, millis);
        }
        if let Some(logger) = self.live.access_log.get() {
            let request = session.req_header();
            let authority = request_info(request, self.port, self.scheme()).authority;
            let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok());
            // W3C `traceparent` is `00-<trace id>-<span id>-<flags>`; B3 carries it alone.
            let own_trace = ctx.trace.as_ref().map(|t| t.trace_id_hex());
            let trace_id = own_trace
                .as_deref()
                .or_else(|| header("traceparent").and_then(|t| t.split('-').nth(1)))
                .or_else(|| header("x-b3-traceid"));
            logger.log(&crate::access_log::Entry {
                client_address: client_ip(session).map(|ip| ip.to_string()),
                method: request.method.as_str(),
                authority,
                path: request.uri.path_and_query().map_or("", |p| p.as_str()),
                protocol: if session.is_http2() {
                    "HTTP/2"
                } else {
                    "HTTP/1.1"
                },
                status: code,
                response_flags: flag.as_str(),
                bytes_received: request_bytes,
                bytes_sent: response_bytes,
                duration_ms: millis,
                upstream_address: ctx.upstream.map(|a| a.to_string()),
                route: ctx.route.as_ref().map(|r| r.def.label.as_str()),
                destination: ctx.target().map(|t| t.service.to_string()),
                request_id: ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
                trace_id,
            });
        }
    }

    /// What a client caused (no route, a refused request, a client gone mid-request) is in the
    /// access log and the metrics, not the error log: a client could otherwise fill it at will.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, error: &Error) -> bool {
        match error.etype() {
            ErrorType::HTTPStatus(code) => *code < 500,
            _ => error.esource() == &ErrorSource::Downstream,
        }
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let (code, reason): (u16, &str) = match e.etype() {
            ErrorType::HTTPStatus(code) => (*code, ctx.failure.unwrap_or("request failed\n")),
            ErrorType::ConnectTimedout => (503, "upstream connect timeout\n"),
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
                (503, "upstream connect error: connection refused\n")
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                (504, "upstream request timeout\n")
            }
            // Envoy reports these as a connect failure (503 UF), not a bad response.
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert => {
                (503, "upstream connect error: TLS handshake failed\n")
            }
            // A reset before the response started is 503 in Envoy ("disconnect/reset before
            // headers"); 502 is kept for responses that are not valid HTTP.
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                if e.esource() == &ErrorSource::Upstream =>
            {
                (
                    503,
                    "upstream connect error or disconnect/reset before headers\n",
                )
            }
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "upstream sent an invalid response\n"),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        (0, "")
                    }
                    _ => (400, "bad request\n"),
                },
                ErrorSource::Internal | ErrorSource::Unset => (500, "internal error\n"),
            },
        };
        if code > 0 {
            if let Err(write_error) = respond_error(session, code, reason, ctx).await {
                log::debug!("could not send error response: {write_error}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.9",
            "127.0.0.1",
            "192.168.20.255",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.1.2.3",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let value = address_value(ip).unwrap();
            assert_eq!(value.to_str().unwrap(), ip.to_string(), "{text}");
        }
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = uuid_v4(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(&id, b"01234567-89ab-4def-8123-456789abcdef");
        let id = uuid_v4(u128::MAX);
        assert_eq!(&id, b"ffffffff-ffff-4fff-bfff-ffffffffffff");
        let id = uuid_v4(0);
        assert_eq!(&id, b"00000000-0000-4000-8000-000000000000");
    }
}
