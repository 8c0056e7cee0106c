//! Host lookup: exact name, then the most specific wildcard, then `*`, each a hash lookup.

use std::borrow::Cow;
use std::collections::HashMap;

use compact_str::CompactString;

use crate::model::HostPattern;

/// Names are kept inline in the table when 24 bytes or shorter (most host names): a lookup then
/// compares the name in the table's own memory, where a boxed name would be one more cache miss
/// per request in a config with thousands of hosts.
#[derive(Debug, Clone)]
pub struct HostTable<T> {
    exact: HashMap<CompactString, T>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<CompactString, T>,
    any: Option<T>,
}

impl<T> Default for HostTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: None,
        }
    }
}

impl<T> HostTable<T> {
    pub fn get_or_insert_with(
        &mut self,
        pattern: &HostPattern,
        make: impl FnOnce() -> T,
    ) -> &mut T {
        match pattern {
            HostPattern::Exact(name) => self.exact.entry(name.as_str().into()).or_insert_with(make),
            HostPattern::Wildcard(suffix) => self
                .wildcard
                .entry(suffix.as_str().into())
                .or_insert_with(make),
            HostPattern::Any => self.any.get_or_insert_with(make),
        }
    }

    /// Like [`HostTable::lookup`], with how specific the match was: exact names rank highest, then
    /// longer wildcard suffixes, then `*` (0). Lets two tables be compared for the same name.
    pub fn lookup_ranked(&self, host: &str) -> Option<(&T, usize)> {
        if host.len() > 253 {
            return None;
        }
        let host = lower(host);
        if let Some(found) = self.exact.get(host.as_ref()) {
            return Some((found, usize::MAX));
        }
        let mut rest = host.as_ref();
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(found) = self.wildcard.get(rest) {
                return Some((found, rest.len() + 1));
            }
        }
        self.any.as_ref().map(|found| (found, 0))
    }

    /// Finds the entry serving `host` (a bare host name, any case, no port). A wildcard
    /// `*.example.com` serves `a.example.com` and `a.b.example.com`, never `example.com`; the longest
    /// matching suffix wins.
    pub fn lookup(&self, host: &str) -> Option<&T> {
        // No DNS name is longer; refusing early also bounds the suffix walk below on hostile input.
        if host.len() > 253 {
            return None;
        }
        let host = lower(host);
        if let Some(found) = self.exact.get(host.as_ref()) {
            return Some(found);
        }
        if !self.wildcard.is_empty() {
            let mut rest = host.as_ref();
            while let Some(dot) = rest.find('.') {
                rest = &rest[dot + 1..];
                if let Some(found) = self.wildcard.get(rest) {
                    return Some(found);
                }
            }
        }
        self.any.as_ref()
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + usize::from(self.any.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Host headers are almost always lower-case already; only allocate when they are not.
fn lower(host: &str) -> Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The host part of an `authority` (`Host` header or `:authority`): the port and IPv6 brackets removed.
pub fn host_of_authority(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> HostTable<&'static str> {
        let mut t = HostTable::default();
        for (p, v) in [
            ("a.example.com", "exact"),
            ("*.example.com", "wild"),
            ("*.b.example.com", "deeper"),
            ("*", "any"),
        ] {
            *t.get_or_insert_with(&HostPattern::parse(p).unwrap(), || v) = v;
        }
        t
    }

    #[test]
    fn precedence_is_exact_then_longest_wildcard_then_any() {
        let t = table();
        assert_eq!(t.lookup("a.example.com"), Some(&"exact"));
        assert_eq!(t.lookup("A.Example.COM"), Some(&"exact"));
        assert_eq!(t.lookup("c.example.com"), Some(&"wild"));
        assert_eq!(t.lookup("x.b.example.com"), Some(&"deeper"));
        assert_eq!(t.lookup("example.com"), Some(&"any"));
        assert_eq!(t.lookup("other.org"), Some(&"any"));
        assert_eq!(t.lookup(&".a".repeat(200)), None);
    }

    #[test]
    fn authority_ports_and_brackets_are_stripped() {
        assert_eq!(host_of_authority("a.com:8080"), "a.com");
        assert_eq!(host_of_authority("a.com"), "a.com");
        assert_eq!(host_of_authority("[::1]:80"), "::1");
    }
}
