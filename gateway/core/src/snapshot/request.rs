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
        if self.without_headers.iter().any(header_hit) {
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

/// The `Location` of a redirect. Unset parts keep the request's: scheme, host (and its port, unless
/// the redirect changes scheme or host, or sets a port), path, and the query string.
pub fn redirect_location(redirect: &Redirect, req: &RequestInfo<'_>) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(req.scheme);
    let host = redirect
        .authority
        .as_deref()
        .unwrap_or_else(|| crate::snapshot::hosts::host_of_authority(req.authority));
    let request_port = req
        .authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let port = match redirect.port {
        Some(p) => Some(p),
        None if redirect.scheme.is_none() && redirect.authority.is_none() => request_port,
        None => None,
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let bracketed = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let mut location = format!("{scheme}://{bracketed}");
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
            scheme: Some("https".into()),
            code: 301,
        };
        assert_eq!(
            redirect_location(&r, &req(&h, "a.com:8080", "/p", None)),
            "https://b.com/p"
        );
    }
}
