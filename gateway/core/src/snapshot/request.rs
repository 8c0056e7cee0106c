//! Matching one request against compiled routes, and computing redirect and rewrite results.
//!
//! Pure functions over borrowed request parts: the proxy fills a [`RequestInfo`] from Pingora's
//! request header without copying, and gets back a borrowed route.

use http::HeaderMap;

use crate::model::{Redirect, RouteMatch, StrMatch, UriRewrite};

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The `Host` header or `:authority`, as sent (port included, if any).
    pub authority: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The listener port the request arrived on.
    pub port: u16,
}

impl RouteMatch {
    /// The case-sensitive uri literal that is this block's only condition, and whether it is an
    /// exact value (else a prefix). A request's path alone then decides whether the block matches.
    pub(crate) fn uri_literal_only(&self) -> Option<(&str, bool)> {
        // Every field named, so a new condition cannot be forgotten here.
        let RouteMatch {
            name: _,
            uri,
            ignore_uri_case,
            scheme,
            method,
            authority,
            headers,
            without_headers,
            query_params,
            port,
            // Applied when the route is compiled for a gateway, not per request.
            gateways: _,
        } = self;
        let others = *ignore_uri_case
            || scheme.is_some()
            || method.is_some()
            || authority.is_some()
            || !headers.is_empty()
            || !without_headers.is_empty()
            || !query_params.is_empty()
            || port.is_some();
        if others {
            return None;
        }
        match uri {
            Some(StrMatch::Exact(literal)) => Some((literal, true)),
            Some(StrMatch::Prefix(literal)) => Some((literal, false)),
            _ => None,
        }
    }

    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        if self.port.is_some_and(|p| p != req.port) {
            return false;
        }
        if let Some(method) = &self.method {
            if !method.matches(req.method) {
                return false;
            }
        }
        if let Some(scheme) = &self.scheme {
            if !scheme.matches(req.scheme) {
                return false;
            }
        }
        if let Some(authority) = &self.authority {
            if !authority.matches(req.authority) {
                return false;
            }
        }
        if let Some(uri) = &self.uri {
            let hit = if self.ignore_uri_case {
                uri.matches_ignore_case(req.path)
            } else {
                uri.matches(req.path)
            };
            if !hit {
                return false;
            }
        }
        let header_hit = |(name, m): &(http::HeaderName, StrMatch)| {
            header_value(req.headers, name).is_some_and(|v| m.matches(&v))
        };
        if !self.headers.iter().all(header_hit) {
            return false;
        }
        // Istio has Envoy treat an absent header as empty here: `{exact: ""}` or a regex that
        // matches "" excludes a request without the header (a presence match does not).
        let excluded =
            |(name, m): &(http::HeaderName, StrMatch)| match header_value(req.headers, name) {
                Some(value) => m.matches(&value),
                // Present but not UTF-8: only a presence match matches it.
                None if req.headers.contains_key(name) => matches!(m, StrMatch::Present),
                None => !matches!(m, StrMatch::Present) && m.matches(""),
            };
        if self.without_headers.iter().any(excluded) {
            return false;
        }
        self.query_params
            .iter()
            .all(|(key, m)| query_value(req.query, key).is_some_and(|v| m.matches(v)))
    }
}

/// Several headers of one name are compared as one comma-joined value, as Envoy does.
fn header_value<'h>(
    headers: &'h HeaderMap,
    name: &http::HeaderName,
) -> Option<std::borrow::Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?;
    let mut joined: Option<String> = None;
    for more in values {
        let j = joined.get_or_insert_with(|| first.to_string());
        j.push(',');
        j.push_str(more.to_str().ok()?);
    }
    Some(joined.map_or(std::borrow::Cow::Borrowed(first), std::borrow::Cow::Owned))
}

/// The first value of `key` in a raw query string (not percent-decoded, like Envoy). `?key` and
/// `?key=` both give `""`.
pub fn query_value<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// The request path after a `rewrite.uri` / `uriRegexRewrite`, following Envoy, which Istio
/// configures: a prefix match's prefix is replaced; an exact or regex match replaces the whole path;
/// without a uri match the route matches the prefix `/`, so that `/` is replaced.
pub fn rewrite_path(rewrite: &UriRewrite, path: &str, matched: Option<&RouteMatch>) -> String {
    match rewrite {
        UriRewrite::Prefix(replacement) => {
            let matched_len = match matched.and_then(|m| m.uri.as_ref()) {
                Some(StrMatch::Prefix(prefix)) => prefix.len().min(path.len()),
                Some(StrMatch::Exact(_) | StrMatch::Regex(_)) => path.len(),
                _ => 1.min(path.len()),
            };
            let rest = path.get(matched_len..).unwrap_or("");
            format!("{replacement}{rest}")
        }
        UriRewrite::Regex {
            pattern,
            replacement,
        } => pattern.replace_all(path, replacement.as_str()).into_owned(),
    }
}

/// The `Location` of a redirect, as Envoy builds it for Istio: unset parts keep the request's scheme,
/// host, path and query string. The request's port is kept unless the redirect sets a port or an
/// authority, or changes the scheme away from a request on that scheme's default port.
pub fn redirect_location(redirect: &Redirect, req: &RequestInfo<'_>) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(req.scheme);
    let request_host = crate::snapshot::hosts::host_of_authority(req.authority);
    let request_port = req
        .authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .filter(|_| !req.authority.ends_with(']'));
    let port = redirect
        .port
        .or_else(|| redirect.port_from_request.then_some(req.port));
    let (host, port) = match (&redirect.authority, port) {
        // An authority may carry its own port; it is written as given.
        (Some(authority), port) => (authority.as_str(), port),
        (None, Some(port)) => (request_host, Some(port)),
        (None, None) => {
            let default_of_request_scheme = if req.scheme == "https" { 443 } else { 80 };
            let keep =
                request_port.filter(|p| scheme == req.scheme || *p != default_of_request_scheme);
            (request_host, keep)
        }
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let host = if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let mut location = format!("{scheme}://{host}");
    if let Some(port) = port.filter(|p| *p != default_port) {
        location.push(':');
        location.push_str(&port.to_string());
    }
    let uri = redirect.uri.as_deref().unwrap_or(req.path);
    location.push_str(uri);
    if !uri.contains('?') {
        if let Some(query) = req.query.filter(|q| !q.is_empty()) {
            location.push('?');
            location.push_str(query);
        }
    }
    location
}

/// Removes `.` and `..` segments (RFC 3986 §5.2.4), as Istio's default `BASE` path normalization
/// does, so `/public/../admin` is routed (and forwarded) as `/admin`. Returns `None` when the path
/// has nothing to remove, which is the common case and costs one scan.
pub fn normalize_path(path: &str) -> Option<String> {
    let has_dot_segment = path
        .split('/')
        .any(|segment| segment == "." || segment == "..");
    if !has_dot_segment {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            other => out.push(other),
        }
    }
    Some(format!("/{}", out.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        headers: &'a HeaderMap,
        authority: &'a str,
        path: &'a str,
        query: Option<&'a str>,
    ) -> RequestInfo<'a> {
        RequestInfo {
            method: "GET",
            scheme: "http",
            authority,
            path,
            query,
            headers,
            port: 8080,
        }
    }

    #[test]
    fn query_values() {
        assert_eq!(query_value(Some("a=1&b=2"), "b"), Some("2"));
        assert_eq!(query_value(Some("a&b=2"), "a"), Some(""));
        assert_eq!(query_value(Some("a=1"), "c"), None);
        assert_eq!(query_value(None, "c"), None);
    }

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix() {
        let m = RouteMatch {
            uri: Some(StrMatch::Prefix("/api/".into())),
            ..Default::default()
        };
        let r = UriRewrite::Prefix("/v2/".into());
        assert_eq!(rewrite_path(&r, "/api/users", Some(&m)), "/v2/users");
        assert_eq!(rewrite_path(&r, "/x", None), "/v2/x");
        let by_regex = RouteMatch {
            uri: Some(StrMatch::Regex(regex::Regex::new("^/a/[0-9]+$").unwrap())),
            ..Default::default()
        };
        assert_eq!(rewrite_path(&r, "/a/12", Some(&by_regex)), "/v2/");
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let h = HeaderMap::new();
        let r = Redirect {
            uri: Some("/new".into()),
            authority: None,
            port: None,
            port_from_request: false,
            scheme: None,
            code: 301,
        };
        assert_eq!(
            redirect_location(&r, &req(&h, "a.com:8080", "/old", Some("x=1"))),
            "http://a.com:8080/new?x=1"
        );
        let r = Redirect {
            uri: None,
            authority: Some("b.com".into()),
            port: None,
            port_from_request: false,
            scheme: Some("https".into()),
            code: 301,
        };
        assert_eq!(
            redirect_location(&r, &req(&h, "a.com:8080", "/p", None)),
            "https://b.com/p"
        );
        let scheme_only = Redirect {
            uri: None,
            authority: None,
            port: None,
            port_from_request: false,
            scheme: Some("https".into()),
            code: 301,
        };
        assert_eq!(
            redirect_location(&scheme_only, &req(&h, "a.com:8080", "/p", None)),
            "https://a.com:8080/p"
        );
        assert_eq!(
            redirect_location(&scheme_only, &req(&h, "a.com:80", "/p", None)),
            "https://a.com/p"
        );
        // derivePort FROM_REQUEST_PORT: the listener port (8080 here), whatever the Host says.
        let from_request = Redirect {
            port_from_request: true,
            ..scheme_only.clone()
        };
        assert_eq!(
            redirect_location(&from_request, &req(&h, "a.com:9999", "/p", None)),
            "https://a.com:8080/p"
        );
        let with_port = Redirect {
            authority: Some("b.com:8443".into()),
            ..scheme_only.clone()
        };
        assert_eq!(
            redirect_location(&with_port, &req(&h, "a.com", "/", None)),
            "https://b.com:8443/"
        );
        let v6 = Redirect {
            authority: Some("::1".into()),
            ..scheme_only
        };
        assert_eq!(
            redirect_location(&v6, &req(&h, "a.com", "/", None)),
            "https://[::1]/"
        );
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(normalize_path("/a/b"), None);
        assert_eq!(
            normalize_path("/public/../admin").as_deref(),
            Some("/admin")
        );
        assert_eq!(normalize_path("/a/./b/../c").as_deref(), Some("/a/c"));
        assert_eq!(normalize_path("/../../x").as_deref(), Some("/x"));
        assert_eq!(normalize_path("/a/..").as_deref(), Some("/"));
        assert_eq!(normalize_path("/a/b/.").as_deref(), Some("/a/b/"));
        assert_eq!(normalize_path("/a..b/c").as_deref(), None);
    }
}
