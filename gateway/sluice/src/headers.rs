//! Header edits on plain `http` maps.
//!
//! Pingora's `RequestHeader` and `ResponseHeader` keep, beside the `http::HeaderMap`, a second map
//! with each name's case as it arrived. Each `insert_header` parses the name again and writes both
//! maps, and neither can reserve room, so the few headers Sluice adds to every request cost more
//! than routing it. Sluice writes names as Istio's Envoy does, in lower case (Pingora title-cases
//! the standard ones, `Host`, `Content-Type`, …), so a header is taken apart once, its case map
//! dropped, and edited as `http` parts with names parsed when the config was compiled.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response};
use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use sluice_core::model::HeaderOps;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_ENVOY_EXTERNAL_ADDRESS: HeaderName =
    HeaderName::from_static("x-envoy-external-address");
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Fields about one connection rather than the message (RFC 9110 §7.6.1, with the legacy
/// `Keep-Alive` and `Proxy-Connection`, HTTP/2's upgrade `HTTP2-Settings`, and the client's
/// credentials for a proxy, which are not the upstream's business): not forwarded over an
/// HTTP/1 hop (what Pingora's own policy strips; between two HTTP/2 hops nothing is stripped).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HTTP2_SETTINGS,
];

/// A request may name at most this many `Connection` options, so stripping them is bounded work.
const MAX_CONNECTION_OPTIONS: usize = 9;

/// Fields a `Connection` option may not name: they say where the request goes, where it came
/// from and who the client proved to be, and Sluice sets the request id and the client
/// certificate's before the upstream request is built. Removing them on a client's word would let
/// it strip what the upstream relies on, so such a request is refused instead.
const NOT_NOMINABLE: [HeaderName; 6] = [
    header::HOST,
    X_FORWARDED_FOR,
    HeaderName::from_static("x-forwarded-host"),
    X_FORWARDED_PROTO,
    X_REQUEST_ID,
    X_FORWARDED_CLIENT_CERT,
];

/// The items of a comma-separated list field (RFC 9110 §5.6.1) over all its lines, trimmed,
/// empty ones left out.
fn list_items<'h>(headers: &'h HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'h [u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// The options of a request's `Connection` header(s).
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    list_items(headers, &header::CONNECTION)
}

/// An option that names a field stripped anyway, or `close`, the connection's own option (a
/// field of that name means nothing to anyone): no field name to parse for it.
fn names_no_other_field(option: &[u8]) -> bool {
    option.eq_ignore_ascii_case(b"close")
        || HOP_BY_HOP
            .iter()
            .any(|name| option.eq_ignore_ascii_case(name.as_str().as_bytes()))
}

/// Checks a request's `Connection` options before it is routed; the error is the reason it is
/// refused (400). Each option must be a token (RFC 9110 §5.6.2, which `HeaderName` alone does not
/// insist on: a quoted or `:`-prefixed option would be read as some other field), at most
/// [`MAX_CONNECTION_OPTIONS`] of them, none naming a field in [`NOT_NOMINABLE`].
pub fn check_connection_options(headers: &HeaderMap) -> std::result::Result<(), &'static str> {
    for (count, option) in connection_options(headers).enumerate() {
        if count == MAX_CONNECTION_OPTIONS {
            return Err("too many Connection options\n");
        }
        if names_no_other_field(option) {
            continue;
        }
        if !option.iter().all(|byte| is_tchar(*byte)) {
            return Err("invalid Connection option\n");
        }
        let name = HeaderName::from_bytes(option).map_err(|_| "invalid Connection option\n")?;
        if NOT_NOMINABLE.contains(&name) {
            return Err("Connection names a field the gateway must forward\n");
        }
    }
    Ok(())
}

/// Removes from a request going upstream the hop-by-hop fields and those its `Connection` header
/// names (checked by [`check_connection_options`] when the request came in). Two survive as Envoy
/// forwards them: `te: trailers` (gRPC's; any other transfer coding a client accepts is its hop's)
/// and, when `websocket_allowed` (an HTTP/1.1 client to an HTTP/1.1 upstream), a WebSocket
/// handshake (`Connection: upgrade` and `Upgrade: websocket`), which goes on as `Connection:
/// Upgrade`, `Upgrade: websocket`. Any other upgrade is dropped.
///
/// Pingora does this itself under its standard request policy, through `RequestHeader`'s two
/// maps, most of it removing fields that are not there (BENCHMARKS.md has the cost). Sluice gives
/// its peers Pingora's `preserve` policy and strips here, on the map it edits anyway, after one
/// look at the names (a request rarely carries any of these).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, websocket_allowed: bool) -> Result<()> {
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return Ok(());
    }
    let te_trailers =
        list_items(headers, &header::TE).any(|coding| coding.eq_ignore_ascii_case(b"trailers"));
    let websocket = websocket_allowed
        && headers
            .get(header::UPGRADE)
            .is_some_and(|upgrade| upgrade.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && connection_options(headers).any(|option| option.eq_ignore_ascii_case(b"upgrade"));
    let mut nominated: [Option<HeaderName>; MAX_CONNECTION_OPTIONS] = Default::default();
    let names = connection_options(headers)
        .filter(|option| !names_no_other_field(option))
        .filter_map(|option| HeaderName::from_bytes(option).ok());
    for (slot, name) in nominated.iter_mut().zip(names) {
        *slot = Some(name);
    }
    for name in nominated.iter().flatten().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    if te_trailers {
        set(headers, &header::TE, HeaderValue::from_static("trailers"))?;
    }
    if websocket {
        set(
            headers,
            &header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )?;
        set(
            headers,
            &header::UPGRADE,
            HeaderValue::from_static("websocket"),
        )?;
    }
    Ok(())
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Fields Pingora's HTTP/1 session adds to every response head as it writes it (`Date`,
/// `Connection`): room for them is reserved with Sluice's own, or the map grows once more.
pub const ADDED_WHEN_WRITTEN: usize = 2;

/// Runs `edit` on `req`'s parts with room for `extra` more headers, and leaves `req` without its
/// case map. The request target goes on as it came, with one change: an absolute-form target
/// (`GET http://host/path`, RFC 9112 3.2.2) goes upstream in origin form, as from Envoy. Pingora
/// has already put only its path and query in the URI and checked its authority against any Host
/// header; when no Host came, the authority becomes the Host, so the request routes by it.
pub fn edit_request<T>(
    req: &mut RequestHeader,
    extra: usize,
    edit: impl FnOnce(&mut request::Parts) -> Result<T>,
) -> Result<T> {
    let target = req.raw_path();
    let (host_from_target, kept_target) = match raw_target_authority(target) {
        RawTargetAuthority::Absolute { authority, .. } if req.raw_path_is_utf8() => {
            let host = match req.headers.contains_key(header::HOST) {
                true => None,
                false => Some(HeaderValue::from_bytes(authority).map_err(|_| {
                    Error::explain(ErrorType::InvalidHTTPHeader, "invalid target authority")
                })?),
            };
            (host, None)
        }
        // What the URI does not reproduce (a target that is not UTF-8, an opaque one) is kept.
        _ => {
            let round_trips =
                req.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(target);
            (None, (!round_trips).then(|| target.to_vec()))
        }
    };
    let send_end_stream = req.send_end_stream();
    let mut parts = request::Parts::from(std::mem::replace(req, placeholder_request()));
    let unedited_uri = kept_target.is_some().then(|| parts.uri.clone());
    let result = try_reserve(
        &mut parts.headers,
        extra + usize::from(host_from_target.is_some()),
    )
    .and_then(|()| match host_from_target {
        Some(host) => set(&mut parts.headers, &header::HOST, host),
        None => Ok(()),
    })
    .and_then(|()| edit(&mut parts));
    // A URI `edit` replaced is the target from now on.
    let restore = unedited_uri.is_some_and(|before| before == parts.uri);
    *req = RequestHeader::from(parts);
    if let Some(end) = send_end_stream {
        req.set_send_end_stream(end);
    }
    if let (true, Some(target)) = (restore, kept_target) {
        req.set_raw_path(&target)?;
    }
    result
}

/// As `edit_request`, for a response; a reason phrase other than the status's own is kept.
pub fn edit_response<T>(
    resp: &mut ResponseHeader,
    extra: usize,
    edit: impl FnOnce(&mut response::Parts) -> Result<T>,
) -> Result<T> {
    let own_reason = resp
        .get_reason_phrase()
        .filter(|phrase| Some(*phrase) != resp.status.canonical_reason())
        .map(str::to_owned);
    let mut parts = response::Parts::from(std::mem::replace(
        resp,
        ResponseHeader::from(http::Response::new(()).into_parts().0),
    ));
    let result = try_reserve(&mut parts.headers, extra).and_then(|()| edit(&mut parts));
    *resp = ResponseHeader::from(parts);
    if own_reason.is_some() {
        resp.set_reason_phrase(own_reason.as_deref())?;
    }
    result
}

/// A response of Sluice's own, with room for `capacity` headers.
pub fn new_response(status: u16, capacity: usize) -> Result<response::Parts> {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = http::StatusCode::from_u16(status)
        .map_err(|_| Error::explain(ErrorType::InternalError, "invalid status"))?;
    try_reserve(&mut parts.headers, capacity)?;
    Ok(parts)
}

fn placeholder_request() -> RequestHeader {
    RequestHeader::from(http::Request::new(()).into_parts().0)
}

fn too_many() -> Box<Error> {
    Error::explain(ErrorType::InvalidHTTPHeader, "too many headers")
}

fn try_reserve(headers: &mut HeaderMap, extra: usize) -> Result<()> {
    headers.try_reserve(extra).map_err(|_| too_many())
}

/// Replaces every value of `name`.
pub fn set(headers: &mut HeaderMap, name: &HeaderName, value: HeaderValue) -> Result<()> {
    headers
        .try_insert(name.clone(), value)
        .map(drop)
        .map_err(|_| too_many())
}

/// Adds a value to `name`, keeping those it has.
pub fn add(headers: &mut HeaderMap, name: &HeaderName, value: HeaderValue) -> Result<()> {
    headers
        .try_append(name.clone(), value)
        .map(drop)
        .map_err(|_| too_many())
}

/// Istio's order: remove, then set (replace), then add (append).
pub fn apply_ops(headers: &mut HeaderMap, ops: &HeaderOps) -> Result<()> {
    for name in &ops.remove {
        headers.remove(name);
    }
    set_then_add(headers, ops)
}

fn set_then_add(headers: &mut HeaderMap, ops: &HeaderOps) -> Result<()> {
    for (name, value) in &ops.set {
        set(headers, name, value.clone())?;
    }
    for (name, value) in &ops.add {
        add(headers, name, value.clone())?;
    }
    Ok(())
}

/// A route's header rules and those of the destination it chose, in the order Istio gives Envoy.
/// With one destination Istio appends the destination's rules to the route's in one list, whose
/// removals all run first: the destination's `set` wins, and the route's `remove` does not undo
/// it. With several, each destination's rules run before the route's: the route's win.
pub fn apply_route_ops(
    headers: &mut HeaderMap,
    route: Option<&HeaderOps>,
    destination: Option<&HeaderOps>,
    one_destination: bool,
) -> Result<()> {
    match (route, destination) {
        (Some(route), Some(destination)) if one_destination => {
            for name in route.remove.iter().chain(&destination.remove) {
                headers.remove(name);
            }
            set_then_add(headers, route)?;
            set_then_add(headers, destination)
        }
        _ => {
            for ops in [destination, route].into_iter().flatten() {
                apply_ops(headers, ops)?;
            }
            Ok(())
        }
    }
}

/// How many headers `ops` may add, for the room `edit_request`/`edit_response` reserve.
pub fn added_by(ops: Option<&HeaderOps>) -> usize {
    ops.map_or(0, |ops| ops.set.len() + ops.add.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(target: &[u8]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target, None).unwrap();
        req.insert_header("X-Mixed-Case", "1").unwrap();
        req.insert_header("Host", "from-header").unwrap();
        req
    }

    fn wire(req: &RequestHeader) -> String {
        let mut buf = Vec::new();
        req.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn origin_form_keeps_its_target_and_loses_only_the_case() {
        let mut req = parsed(b"/a/b?c=d");
        edit_request(&mut req, 1, |parts| {
            set(
                &mut parts.headers,
                &X_FORWARDED_PROTO,
                HeaderValue::from_static("http"),
            )
        })
        .unwrap();
        assert_eq!(req.raw_path(), b"/a/b?c=d");
        assert!(!req.has_case());
        assert_eq!(
            wire(&req),
            "x-mixed-case: 1\r\nHost: from-header\r\nx-forwarded-proto: http\r\n"
        );
    }

    #[test]
    fn absolute_form_goes_on_in_origin_form_its_authority_the_host_when_none_came() {
        for (target, origin, host) in [
            (
                &b"http://target.example:8080/p?q=1"[..],
                &b"/p?q=1"[..],
                "target.example:8080",
            ),
            (b"http://target.example?q=1", b"/?q=1", "target.example"),
            (b"http://target.example", b"/", "target.example"),
        ] {
            let mut req = RequestHeader::build("GET", target, None).unwrap();
            edit_request(&mut req, 0, |_| Ok(())).unwrap();
            assert_eq!(req.raw_path(), origin);
            assert_eq!(
                req.uri.authority(),
                None,
                "no scheme or authority in the URI"
            );
            assert_eq!(req.headers["host"], host);
        }
        let mut req = parsed(b"http://target.example/p");
        edit_request(&mut req, 0, |_| Ok(())).unwrap();
        assert_eq!(req.headers["host"], "from-header", "a Host that came stays");
    }

    #[test]
    fn a_target_without_an_absolute_authority_goes_on_as_it_came() {
        let mut req = parsed(b"evil.example:80");
        edit_request(&mut req, 0, |_| Ok(())).unwrap();
        assert_eq!(req.raw_path(), b"evil.example:80");
        assert_eq!(req.uri.authority(), None);
        assert_eq!(req.headers["host"], "from-header");
    }

    #[test]
    fn a_target_the_uri_cannot_hold_goes_on_as_it_came() {
        let mut req = parsed(b"/caf\xe9");
        edit_request(&mut req, 0, |_| Ok(())).unwrap();
        assert_eq!(req.raw_path(), b"/caf\xe9");
        assert!(!req.raw_path_is_utf8());
    }

    #[test]
    fn a_replaced_uri_wins_over_the_kept_target() {
        let mut req = parsed(b"/caf\xe9");
        edit_request(&mut req, 0, |parts| {
            parts.uri = http::Uri::from_static("/new");
            Ok(())
        })
        .unwrap();
        assert_eq!(req.raw_path(), b"/new");
    }

    #[test]
    fn a_failed_edit_still_puts_the_header_back() {
        let mut req = parsed(b"/x");
        let failed = edit_request(&mut req, 0, |parts| -> Result<()> {
            parts.headers.remove("host");
            Err(too_many())
        });
        assert!(failed.is_err());
        assert_eq!(req.raw_path(), b"/x");
        assert_eq!(req.headers.get("x-mixed-case").unwrap(), "1");
        assert!(req.headers.get("host").is_none());
    }

    #[test]
    fn a_response_keeps_its_status_and_its_own_reason_phrase() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.set_reason_phrase(Some("Fine")).unwrap();
        edit_response(&mut resp, 1, |parts| {
            set(
                &mut parts.headers,
                &X_REQUEST_ID,
                HeaderValue::from_static("id"),
            )
        })
        .unwrap();
        assert_eq!(resp.get_reason_phrase(), Some("Fine"));
        assert_eq!(resp.headers.get(X_REQUEST_ID).unwrap(), "id");
        assert_eq!(resp.status, 200);
    }

    fn fields(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    fn listed(headers: &HeaderMap) -> Vec<String> {
        let mut fields: Vec<String> = headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        fields.sort();
        fields
    }

    #[test]
    fn hop_by_hop_fields_go_but_te_trailers_and_a_websocket_handshake() {
        let upgrade = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip, Trailers"),
            ("sec-websocket-key", "k"),
        ];
        let mut headers = fields(&upgrade);
        strip_hop_by_hop(&mut headers, true).unwrap();
        assert_eq!(
            listed(&headers),
            [
                "connection: Upgrade",
                "sec-websocket-key: k",
                "te: trailers",
                "upgrade: websocket"
            ]
        );
        let mut headers = fields(&upgrade);
        strip_hop_by_hop(&mut headers, false).unwrap();
        assert_eq!(listed(&headers), ["sec-websocket-key: k", "te: trailers"]);
        let mut headers = fields(&[("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        strip_hop_by_hop(&mut headers, true).unwrap();
        assert_eq!(
            listed(&headers),
            ["sec-websocket-key: k"],
            "no `upgrade` option: not a handshake"
        );

        let mut headers = fields(&[
            ("connection", "x-b ,, close"),
            ("connection", "x-c"),
            ("x-b", "1"),
            ("x-c", "1"),
            ("x-d", "1"),
            ("close", "1"),
            ("te", "gzip"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ]);
        strip_hop_by_hop(&mut headers, true).unwrap();
        assert_eq!(
            listed(&headers),
            ["close: 1", "x-d: 1"],
            "`close` is the connection's own option"
        );
    }

    #[test]
    fn connection_options_are_tokens_few_and_leave_what_the_upstream_relies_on() {
        let check =
            |value: &'static str| check_connection_options(&fields(&[("connection", value)]));
        for fine in [
            "close",
            "keep-alive, Upgrade",
            "x-a,, x-b ",
            "a,b,c,d,e,f,g,h,i",
        ] {
            assert_eq!(check(fine), Ok(()), "{fine}");
        }
        assert_eq!(check_connection_options(&HeaderMap::new()), Ok(()));
        for (refused, reason) in [
            ("a,b,c,d,e,f,g,h,i,j", "too many Connection options\n"),
            (
                "close, keep-alive, upgrade, te, trailer, close, keep-alive, upgrade, te, te",
                "too many Connection options\n",
            ),
            ("\"x-a\"", "invalid Connection option\n"),
            (":authority", "invalid Connection option\n"),
            ("x-a;q=1", "invalid Connection option\n"),
        ] {
            assert_eq!(check(refused), Err(reason), "{refused}");
        }
        for name in NOT_NOMINABLE {
            let mut headers = fields(&[("connection", "keep-alive")]);
            headers.append(
                header::CONNECTION,
                HeaderValue::from_str(&name.as_str().to_ascii_uppercase()).unwrap(),
            );
            assert_eq!(
                check_connection_options(&headers),
                Err("Connection names a field the gateway must forward\n"),
                "{name}"
            );
        }
    }

    #[test]
    fn ops_remove_then_set_then_add() {
        let mut headers = HeaderMap::new();
        headers.insert("a", HeaderValue::from_static("old"));
        headers.insert("b", HeaderValue::from_static("old"));
        let name = |n: &'static str| HeaderName::from_static(n);
        let ops = HeaderOps {
            remove: vec![name("a")],
            set: vec![(name("b"), HeaderValue::from_static("set"))],
            add: vec![
                (name("b"), HeaderValue::from_static("added")),
                (name("a"), HeaderValue::from_static("added")),
            ],
        };
        apply_ops(&mut headers, &ops).unwrap();
        let all = |n: &str| -> Vec<_> { headers.get_all(n).iter().cloned().collect() };
        assert_eq!(all("a"), ["added"]);
        assert_eq!(all("b"), ["set", "added"]);
    }
}
