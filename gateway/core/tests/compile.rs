// Fixtures here are known-valid YAML: failing loudly is the point.
#![allow(clippy::expect_used)]

//! The pure core end to end, in milliseconds: YAML → model → snapshot → lookups, without sockets.

use http::HeaderMap;
use sluice_core::model::HostPattern;
use sluice_core::snapshot::{RequestInfo, RouteLookup, Snapshot, TlsDecision};

fn snapshot(yaml: &str) -> Snapshot {
    let loaded = sluice_core::load_str("test.yaml", yaml);
    let errors: Vec<String> = loaded.diagnostics.errors().map(|d| d.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    loaded.snapshot().expect("valid config")
}

fn errors(yaml: &str) -> Vec<String> {
    sluice_core::load_str("test.yaml", yaml)
        .diagnostics
        .into_sorted()
        .into_iter()
        .map(|d| d.to_string())
        .collect()
}

const GATEWAY: &str = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: edge}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: [\"prod/*.shop.test\", \"./admin.test\", \"*/open.test\"]\n";

fn vs(namespace: &str, hosts: &str, http: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs-{namespace}, namespace: {namespace}}}\n\
         spec:\n  hosts: [{hosts}]\n  gateways: [edge/gw]\n  http:\n{http}"
    )
}

fn lookup<'s>(snapshot: &'s Snapshot, host: &str, path: &str) -> RouteLookup<'s> {
    static HEADERS: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    snapshot.route(&RequestInfo {
        method: "GET",
        scheme: "http",
        authority: host,
        path,
        query: None,
        headers: HEADERS.get_or_init(HeaderMap::new),
        port: 80,
    })
}

fn direct(body: &str) -> String {
    format!("  - directResponse: {{status: 200, body: {{string: {body}}}}}\n")
}

fn body_of(lookup: RouteLookup<'_>) -> Option<String> {
    match lookup {
        RouteLookup::Found { route, .. } => match &route.def.action {
            sluice_core::model::Action::Respond(r) => {
                Some(String::from_utf8_lossy(&r.body).into_owned())
            }
            _ => None,
        },
        _ => None,
    }
}

#[test]
fn server_host_namespaces_decide_which_virtual_services_attach() {
    let yaml = GATEWAY.to_string()
        + &vs("prod", "\"*.shop.test\"", &direct("prod"))
        + &vs("dev", "\"dev.shop.test\"", &direct("dev-not-admitted"))
        + &vs("edge", "admin.test", &direct("admin"))
        + &vs("other", "open.test", &direct("open"));
    let s = snapshot(&yaml);
    assert_eq!(
        body_of(lookup(&s, "a.shop.test", "/")).as_deref(),
        Some("prod")
    );
    // `dev` may not attach to `prod/*.shop.test`: the prod wildcard still serves the name.
    assert_eq!(
        body_of(lookup(&s, "dev.shop.test", "/")).as_deref(),
        Some("prod")
    );
    assert_eq!(
        body_of(lookup(&s, "admin.test", "/")).as_deref(),
        Some("admin")
    );
    assert_eq!(
        body_of(lookup(&s, "open.test", "/")).as_deref(),
        Some("open")
    );
    assert!(matches!(
        lookup(&s, "elsewhere.test", "/"),
        RouteLookup::NoHost
    ));
}

#[test]
fn virtual_services_for_one_host_merge_in_file_order() {
    let yaml = GATEWAY.to_string()
        + &vs("other", "open.test", "  - match: [{uri: {prefix: /a}}]\n    directResponse: {status: 200, body: {string: first}}\n")
        + &vs("edge", "open.test", &direct("second"));
    let s = snapshot(&yaml);
    assert_eq!(
        body_of(lookup(&s, "open.test", "/a")).as_deref(),
        Some("first")
    );
    assert_eq!(
        body_of(lookup(&s, "open.test", "/b")).as_deref(),
        Some("second")
    );
}

#[test]
fn match_gateways_limits_a_block_to_its_gateway() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: [\"*\"]\n\
                ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: b}\nspec:\n  servers:\n  - port: {number: 81, protocol: HTTP}\n    hosts: [\"*\"]\n\
                ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [\"x.test\"]\n  gateways: [a, b]\n  http:\n\
                \x20 - match: [{gateways: [b]}]\n    directResponse: {status: 200, body: {string: only-b}}\n\
                \x20 - directResponse: {status: 200, body: {string: both}}\n";
    let s = snapshot(yaml);
    let on = |port: u16| {
        let headers = HeaderMap::new();
        let lookup = s.route(&RequestInfo {
            method: "GET",
            scheme: "http",
            authority: "x.test",
            path: "/",
            query: None,
            headers: &headers,
            port,
        });
        body_of(lookup)
    };
    assert_eq!(on(80).as_deref(), Some("both"));
    assert_eq!(on(81).as_deref(), Some("only-b"));
}

#[test]
fn https_redirect_servers_redirect_their_hosts() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n\
                \x20 - port: {number: 80, protocol: HTTP}\n    hosts: [secure.test]\n    tls: {httpsRedirect: true}\n\
                \x20 - port: {number: 80, protocol: HTTP}\n    hosts: [plain.test]\n";
    let s = snapshot(yaml);
    assert!(matches!(
        lookup(&s, "secure.test", "/"),
        RouteLookup::HttpsRedirect
    ));
    assert!(matches!(lookup(&s, "plain.test", "/"), RouteLookup::NoHost));
}

#[test]
fn tls_decisions_prefer_passthrough_then_exact_then_wildcard_then_catch_all() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n\
                \x20 - port: {number: 443, protocol: HTTPS}\n    hosts: [\"*.shop.test\"]\n    tls: {mode: SIMPLE, credentialName: wild}\n\
                \x20 - port: {number: 443, protocol: HTTPS}\n    hosts: [a.shop.test]\n    tls: {mode: SIMPLE, credentialName: exact}\n\
                \x20 - port: {number: 443, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialName: fallback}\n\
                \x20 - port: {number: 443, protocol: TLS}\n    hosts: [db.shop.test]\n    tls: {mode: PASSTHROUGH}\n\
                ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.internal]\n  ports: [{number: 5432, protocol: TLS}]\n  resolution: DNS\n\
                ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db}\nspec:\n  hosts: [db.shop.test]\n  gateways: [gw]\n\
                \x20 tls:\n  - match: [{sniHosts: [db.shop.test]}]\n    route: [{destination: {host: db.internal}}]\n";
    let s = snapshot(yaml);
    let tls = &s.listener(443).expect("listener").tls;
    // An exact terminating name beats a passthrough wildcard, and the reverse (checked below).
    let credential = |sni: Option<&str>| match tls.decide(sni) {
        TlsDecision::Terminate(_, server) => format!("{:?}", server.tls.credential),
        TlsDecision::Passthrough(route) => route.label.clone(),
        TlsDecision::Refuse => "refuse".into(),
    };
    assert!(credential(Some("db.shop.test")).contains("tls[0]"));
    assert!(credential(Some("a.shop.test")).contains("exact"));
    assert!(credential(Some("b.shop.test")).contains("wild"));
    assert!(credential(Some("other.test")).contains("fallback"));
    assert!(credential(None).contains("fallback"));
}

#[test]
fn mesh_listener_answers_to_short_names() {
    let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec: {meshListener: {port: 15080}}\n\
                ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: shop}\nspec:\n  hosts: [reviews]\n  http:\n\
                \x20 - directResponse: {status: 200, body: {string: reviews}}\n";
    let s = snapshot(yaml);
    for host in [
        "reviews",
        "reviews.shop",
        "reviews.shop.svc",
        "reviews.shop.svc.cluster.local",
    ] {
        let headers = HeaderMap::new();
        let found = s.route(&RequestInfo {
            method: "GET",
            scheme: "http",
            authority: host,
            path: "/",
            query: None,
            headers: &headers,
            port: 15080,
        });
        assert_eq!(body_of(found).as_deref(), Some("reviews"), "{host}");
    }
}

#[test]
fn host_patterns_intersect_like_istio() {
    let p = |s: &str| HostPattern::parse(s).expect("pattern");
    assert_eq!(p("*").intersect(&p("a.test")), Some(p("a.test")));
    assert_eq!(p("*.test").intersect(&p("a.b.test")), Some(p("a.b.test")));
    assert_eq!(p("*.b.test").intersect(&p("*.test")), Some(p("*.b.test")));
    assert_eq!(p("a.test").intersect(&p("b.test")), None);
    assert_eq!(p("*.test").intersect(&p("test")), None);
}

#[test]
fn conflicting_ports_and_duplicate_tls_names_are_errors() {
    let mixed = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n\
                 \x20 - port: {number: 8443, protocol: HTTP}\n    hosts: [a.test]\n\
                 \x20 - port: {number: 8443, protocol: HTTPS}\n    hosts: [b.test]\n    tls: {mode: SIMPLE, credentialName: b}\n";
    let found = errors(mixed);
    assert!(
        found
            .iter()
            .any(|e| e.starts_with("test.yaml:8:") && e.contains("cannot share a port")),
        "{found:#?}"
    );
    let unknown_suite = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n\
                         \x20 - port: {number: 8443, protocol: HTTPS}\n    hosts: [b.test]\n\
                         \x20   tls: {mode: SIMPLE, credentialName: b, cipherSuites: [AES128-SHA]}\n";
    let found = errors(unknown_suite);
    assert!(
        found
            .iter()
            .any(|e| e.contains("cipher suite `AES128-SHA` is not offered")),
        "{found:#?}"
    );
}

#[test]
fn sni_hosts_must_lie_within_the_virtual_service_hosts() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n\
                \x20 - port: {number: 443, protocol: TLS}\n    hosts: [\"*.x.test\"]\n    tls: {mode: PASSTHROUGH}\n\
                ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: grab}\nspec:\n  hosts: [a.x.test]\n  gateways: [gw]\n\
                \x20 tls:\n  - match: [{sniHosts: [\"*.x.test\"]}]\n    route: [{destination: {host: a.internal, port: {number: 443}}}]\n";
    let found = errors(yaml);
    assert!(
        found.iter().any(|e| e.starts_with("test.yaml:17:25:")
            && e.contains("is not one of this VirtualService's `hosts`")),
        "{found:#?}"
    );
}

#[test]
fn the_more_specific_name_wins_between_passthrough_and_termination() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n\
                \x20 - port: {number: 443, protocol: TLS}\n    hosts: [\"*.x.test\"]\n    tls: {mode: PASSTHROUGH}\n\
                \x20 - port: {number: 443, protocol: HTTPS}\n    hosts: [shop.x.test]\n    tls: {mode: SIMPLE, credentialName: shop}\n\
                ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pass}\nspec:\n  hosts: [\"*.x.test\"]\n  gateways: [gw]\n\
                \x20 tls:\n  - match: [{sniHosts: [\"*.x.test\"]}]\n    route: [{destination: {host: a.internal, port: {number: 443}}}]\n";
    let s = snapshot(yaml);
    let tls = &s.listener(443).expect("listener").tls;
    assert!(matches!(
        tls.decide(Some("shop.x.test")),
        TlsDecision::Terminate(..)
    ));
    assert!(matches!(
        tls.decide(Some("db.x.test")),
        TlsDecision::Passthrough(..)
    ));
}

#[test]
fn a_tls_name_belongs_to_one_server_per_port() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n\
                \x20 - port: {number: 443, protocol: HTTPS}\n    hosts: [a.test]\n    tls: {mode: SIMPLE, credentialName: one}\n\
                \x20 - port: {number: 443, protocol: TLS}\n    hosts: [a.test]\n    tls: {mode: PASSTHROUGH}\n";
    let found = errors(yaml);
    assert!(
        found.iter().any(|e| e.starts_with("test.yaml:10:")
            && e.contains("already served by default/gw spec.servers[0]")),
        "{found:#?}"
    );
}

/// A file unchanged on disk since the last load is not read again; any change to a file is seen,
/// including one that keeps its size and modification time (`cp -p`), and a file with something to
/// report is read every time, so its diagnostics are reported every time.
#[test]
fn unchanged_files_are_not_read_again_and_every_change_is_seen() {
    use sluice_core::config::{ConfigSet, FileReads, ParseCache};
    // Beside the build, on the checkout's (local) filesystem: identities are trusted only there.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sluice-file-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let service = |host: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}}}\n\
             spec:\n  hosts: [{host}.test]\n  http:\n  - directResponse: {{status: 200}}\n"
        )
    };
    let (a, b, broken) = (dir.join("a.yaml"), dir.join("b.yaml"), dir.join("c.yaml"));
    std::fs::write(&a, service("a1")).unwrap();
    std::fs::write(&b, service("b1")).unwrap();
    std::fs::write(
        &broken,
        "apiVersion: networking.istio.io/v1\nkind: Nonsense\n",
    )
    .unwrap();
    // A file is trusted unchanged only once its last change is 2 s old.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut cache = ParseCache::default();
    let load = |cache: &mut ParseCache| {
        let (set, diagnostics) = ConfigSet::load_paths_cached(std::slice::from_ref(&dir), cache);
        assert_eq!(
            diagnostics.len(),
            1,
            "the broken file, every time: {diagnostics:?}"
        );
        let mut hosts: Vec<String> = set
            .virtual_services
            .iter()
            .flat_map(|d| d.spec.hosts.clone())
            .collect();
        hosts.sort();
        (hosts, set.fingerprint, cache.last_load)
    };
    let reads = |read, unchanged| FileReads { read, unchanged };
    // As `cp -p` or `touch -d` leave a file: new content, the old modification time.
    let rewrite_keeping_modified = |path: &std::path::Path, text: &str| {
        let modified = std::fs::metadata(path).unwrap().modified().unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
    };

    let (hosts, fingerprint, files) = load(&mut cache);
    assert_eq!(hosts, ["a1.test", "b1.test"]);
    assert_eq!(files, reads(3, 0));
    let (hosts, again, files) = load(&mut cache);
    assert_eq!(hosts, ["a1.test", "b1.test"]);
    assert_eq!((again, files), (fingerprint, reads(1, 2)));

    // b edited in place to the same size: read, and read again while its change is recent.
    std::fs::write(&b, service("b2")).unwrap();
    for _ in 0..2 {
        let (hosts, _, files) = load(&mut cache);
        assert_eq!(hosts, ["a1.test", "b2.test"]);
        assert_eq!(files, reads(2, 1));
    }
    // a replaced by content of the same size with its old modification time put back.
    rewrite_keeping_modified(&a, &service("a2"));
    let (hosts, _, _) = load(&mut cache);
    assert_eq!(hosts, ["a2.test", "b2.test"]);

    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (_, _, files) = load(&mut cache);
    assert_eq!(
        files,
        reads(3, 0),
        "a and b settled: read once more to be trusted"
    );
    let (_, _, files) = load(&mut cache);
    assert_eq!(files, reads(1, 2));
    // Trusted, then a rewritten to the same size with its modification time put back, and left
    // to settle: only its change time tells.
    rewrite_keeping_modified(&a, &service("a3"));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (hosts, _, files) = load(&mut cache);
    assert_eq!(hosts, ["a3.test", "b2.test"]);
    assert_eq!(files, reads(2, 1));
    let (_, _, files) = load(&mut cache);
    assert_eq!(files, reads(1, 2));
    cache.forget_files();
    let (hosts, _, files) = load(&mut cache);
    assert_eq!(hosts, ["a3.test", "b2.test"]);
    assert_eq!(files, reads(3, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload parses only what changed: unchanged documents are the very same parsed values, a
/// changed one is new, and every document reports positions in the file as it is now.
#[test]
fn reloads_reuse_unchanged_documents_and_follow_their_new_positions() {
    use sluice_core::config::{ConfigSet, ParseCache};
    use std::sync::Arc;
    let dir = std::env::temp_dir().join(format!("sluice-parse-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yaml");
    let gateway = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
                   spec: {servers: [{port: {number: 8080, protocol: HTTP}, hosts: ['*']}]}\n";
    let service = |name: &str, host: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\n\
             spec:\n  hosts: [{host}]\n  gateways: [gw]\n  http:\n  - directResponse: {{status: 200}}\n"
        )
    };
    let (a, b) = (service("a", "a.test"), service("b", "b.test"));
    std::fs::write(&file, format!("{gateway}---\n{a}---\n{b}")).unwrap();
    let mut cache = ParseCache::default();
    let (first, diagnostics) = ConfigSet::load_paths_cached(std::slice::from_ref(&dir), &mut cache);
    assert!(!diagnostics.has_errors(), "{diagnostics:?}");

    // b changes; a new document goes in front of both, moving them down.
    let (b2, c) = (service("b", "b2.test"), service("c", "c.test"));
    std::fs::write(&file, format!("{gateway}---\n{c}---\n{a}---\n{b2}")).unwrap();
    let (second, diagnostics) =
        ConfigSet::load_paths_cached(std::slice::from_ref(&dir), &mut cache);
    assert!(!diagnostics.has_errors(), "{diagnostics:?}");
    let by_name = |set: &ConfigSet, name: &str| {
        set.virtual_services
            .iter()
            .find(|d| d.metadata.name == name)
            .cloned()
            .unwrap()
    };
    assert!(Arc::ptr_eq(
        &by_name(&first, "a").spec,
        &by_name(&second, "a").spec
    ));
    assert!(Arc::ptr_eq(
        &first.gateways[0].spec,
        &second.gateways[0].spec
    ));
    assert!(!Arc::ptr_eq(
        &by_name(&first, "b").spec,
        &by_name(&second, "b").spec
    ));
    assert_eq!(
        by_name(&second, "b").spec.hosts,
        vec!["b2.test".to_string()]
    );
    // a's `hosts` line: after the gateway, c and two markers, then a's own first four lines.
    let hosts_line = format!("{gateway}---\n{c}---\n").lines().count() + 5;
    let moved = by_name(&second, "a");
    assert_eq!(moved.origin.position_of("spec.hosts").line, hosts_line);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload validates only the VirtualServices whose documents changed or that looked up an entry
/// that changed (a ServiceEntry host, a subset, a TLS policy, a gateway), and compiles only the
/// routes that came out new; whatever it reuses, it reports and serves exactly what a fresh load of
/// the same files does, at the positions the files have now.
#[test]
fn reloads_validate_and_compile_only_what_changed_and_match_a_fresh_load() {
    use std::sync::Arc;
    let dir = std::env::temp_dir().join(format!("sluice-load-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("config.yaml");
    let paths = std::slice::from_ref(&dir);
    let gateway = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
                   spec: {servers: [{port: {number: 8080, protocol: HTTP}, hosts: ['*']}]}\n";
    let service = |name: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\n\
             spec:\n  hosts: [{name}.test]\n  ports: [{{number: 80, name: http}}]\n  resolution: STATIC\n\
             \x20 endpoints: [{{address: 127.0.0.1, labels: {{version: v1}}}}, {{address: 127.0.0.2, labels: {{version: v2}}}}]\n"
        )
    };
    let (reviews, ratings) = (service("reviews"), service("ratings"));
    let rule = |subsets: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\n\
             spec:\n  host: reviews.test\n  subsets: [{subsets}]\n"
        )
    };
    let both = rule("{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}");
    let v1_only = rule("{name: v1, labels: {version: v1}}");
    // `a` splits over both subsets and has an unreachable route (a warning) after its catch-all.
    let a = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n\
             spec:\n  hosts: [a.test]\n  gateways: [gw]\n  http:\n\
             \x20 - route:\n    - {destination: {host: reviews.test, subset: v1}, weight: 90}\n\
             \x20   - {destination: {host: reviews.test, subset: v2}, weight: 10}\n\
             \x20 - directResponse: {status: 204}\n";
    let b = |status: u16| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: b}}\n\
             spec:\n  hosts: [b.test]\n  gateways: [gw]\n  http: [{{directResponse: {{status: {status}}}}}]\n"
        )
    };
    let c = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: c}\n\
             spec:\n  hosts: [c.test]\n  gateways: [gw]\n  http: [{route: [{destination: {host: ratings.test}}]}]\n";
    let filler = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: filler}\n\
                  spec:\n  hosts: [filler.test]\n  gateways: [gw]\n  http: [{directResponse: {status: 200}}]\n";
    let (b200, b201) = (b(200), b(201));
    let ratings_rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
                        metadata: {name: ratings}\nspec: {host: ratings.test, subsets: [{name: v1}]}\n";
    let ratings_tcp = ratings.replace("name: http}", "name: db, protocol: TCP}");
    let gateway2 = gateway
        .replace("{name: gw}", "{name: gw2}")
        .replace("8080", "8081");
    // `d` names a gateway that does not exist: its error lists the gateways there are.
    let d = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: d}\n\
             spec:\n  hosts: [d.test]\n  gateways: [gw3]\n  http: [{directResponse: {status: 200}}]\n";
    let three =
        rule("{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}, {name: v3}");
    // `e` names a subset that does not exist: its error lists the subsets there are.
    let e = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: e}\n\
             spec:\n  hosts: [e.test]\n  gateways: [gw]\n  http: [{route: [{destination: {host: reviews.test, subset: v9}}]}]\n";
    // `f` routes to a port that speaks TLS: valid only with a DestinationRule originating TLS.
    let secure = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: secure}\n\
                  spec: {hosts: [secure.test], ports: [{number: 443, name: https, protocol: HTTPS}], resolution: DNS}\n";
    let secure_rule =
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: secure}\n\
                       spec: {host: secure.test, trafficPolicy: {tls: {mode: SIMPLE}}}\n";
    let f = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: f}\n\
             spec:\n  hosts: [f.test]\n  gateways: [gw]\n  http: [{route: [{destination: {host: secure.test}}]}]\n";
    let g = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: g}\n\
             spec:\n  hosts: [g.test]\n  gateways: [gw2]\n  http: [{directResponse: {status: 200}}]\n";
    #[rustfmt::skip]
    let steps = [
        vec![gateway, &reviews, &ratings, &both, a, &b200, c],
        // 1. Everything moves down one document; b changes.
        vec![gateway, filler, &reviews, &ratings, &both, a, &b201, c],
        // 2. The subset `a` routes to disappears: `a` must be validated again, and fails.
        vec![gateway, filler, &reviews, &ratings, &v1_only, a, &b201, c],
        vec![gateway, filler, &reviews, &ratings, &both, a, &b201, c],
        // 4. c moves before a: ratings' upstream is now numbered before reviews', so a's compiled
        // route (which names upstreams by number) must be built again, from the same validated one.
        vec![gateway, filler, &reviews, &ratings, &both, c, a, &b201],
        // 5. A DestinationRule for ratings: c routes there, but to no subset, so it stays.
        vec![gateway, filler, &reviews, &ratings, &both, ratings_rule, c, a, &b201],
        // 6. ratings' port becomes TCP: c fails.
        vec![gateway, filler, &reviews, &ratings_tcp, &both, ratings_rule, c, a, &b201],
        // 7, 8. d's error names the known gateways, so a new gateway must change it.
        vec![gateway, filler, &reviews, &ratings, &both, ratings_rule, c, a, &b201, d],
        vec![gateway, &gateway2, filler, &reviews, &ratings, &both, ratings_rule, c, a, &b201, d],
        vec![gateway, &gateway2, filler, &reviews, &ratings, &both, ratings_rule, c, a, &b201],
        // 10. A subset a does not use is added to reviews: a stays as validated.
        vec![gateway, &gateway2, filler, &reviews, &ratings, &three, ratings_rule, c, a, &b201],
        // 11, 12. e's error lists reviews' subsets, so removing one (that e does not name) must
        // change it.
        vec![gateway, filler, &reviews, &ratings, &three, c, a, &b201, e],
        vec![gateway, filler, &reviews, &ratings, &both, c, a, &b201, e],
        // 13, 14. f is valid only once the DestinationRule originating TLS exists.
        vec![gateway, &reviews, &both, a, secure, f],
        vec![gateway, &reviews, &both, a, secure, secure_rule, f],
        // 15, 16. g binds to gw2, which then goes.
        vec![gateway, &gateway2, &reviews, &both, a, g],
        vec![gateway, &reviews, &both, a, g],
    ];
    /// What the snapshot serves, in a comparable form.
    fn served(snapshot: &Option<sluice_core::snapshot::Snapshot>) -> Vec<String> {
        let Some(snapshot) = snapshot else {
            return Vec::new();
        };
        let mut out: Vec<String> = snapshot
            .listeners()
            .flat_map(|l| l.virtual_hosts().iter().map(move |v| (l.spec.port, v)))
            .map(|(port, v)| format!("{port} {} {:?}", v.name, v.routes))
            .collect();
        out.extend(snapshot.clusters().iter().map(|c| format!("{c:?}")));
        out
    }
    let mut cache = sluice_core::LoadCache::default();
    let mut models = Vec::new();
    let mut snapshots = Vec::new();
    for (step, docs) in steps.iter().enumerate() {
        std::fs::write(&file, docs.join("---\n")).expect("write config");
        let cached = sluice_core::load_paths_cached(paths, &mut cache);
        let fresh = sluice_core::load_paths(paths);
        let report = |loaded: &sluice_core::Loaded| -> Vec<String> {
            let diagnostics = loaded.diagnostics.clone().into_sorted();
            diagnostics.iter().map(ToString::to_string).collect()
        };
        assert_eq!(report(&cached), report(&fresh), "step {step}");
        assert_eq!(
            format!("{:?}", cached.model),
            format!("{:?}", fresh.model),
            "step {step}"
        );
        let snapshot = cached.snapshot_cached(&mut cache);
        assert_eq!(served(&snapshot), served(&fresh.snapshot()), "step {step}");
        models.push(cached.model);
        snapshots.push(snapshot);
    }
    assert!(
        report_of(&steps[1], &file, paths)
            .iter()
            .any(|w| w.contains("unreachable")),
        "the warning of a reused VirtualService is reported again"
    );
    assert!(models[2].is_none(), "a routes to a subset that is gone");
    let validated = |step: usize, name: &str| {
        let model = models[step].as_ref().expect("valid step");
        let vs = model
            .virtual_services
            .iter()
            .find(|vs| vs.id == format!("default/{name}"))
            .expect("virtual service");
        vs.http[0].clone()
    };
    let compiled = |step: usize, host: &str| {
        let snapshot = snapshots[step].as_ref().expect("valid step");
        let listener = snapshot.listener(8080).expect("listener");
        let vhost = listener.virtual_hosts().iter().find(|v| v.name == host);
        vhost.expect("virtual host").routes[0].clone()
    };
    // Unchanged documents and context: the very same validated and compiled routes.
    assert!(Arc::ptr_eq(&validated(0, "a"), &validated(1, "a")));
    assert!(Arc::ptr_eq(&compiled(0, "a.test"), &compiled(1, "a.test")));
    // A changed document, or a changed DestinationRule: validated and compiled again.
    assert!(!Arc::ptr_eq(&validated(0, "b"), &validated(1, "b")));
    assert!(!Arc::ptr_eq(&compiled(0, "b.test"), &compiled(1, "b.test")));
    assert!(!Arc::ptr_eq(&validated(1, "a"), &validated(3, "a")));
    // Reordered: the same validated route, compiled again for the new upstream numbers.
    assert!(Arc::ptr_eq(&validated(3, "a"), &validated(4, "a")));
    assert!(!Arc::ptr_eq(&compiled(3, "a.test"), &compiled(4, "a.test")));
    // A DestinationRule, ServiceEntry or Gateway edit: only what looked up a changed entry is
    // validated again, and what was not keeps its compiled routes.
    assert!(Arc::ptr_eq(&validated(4, "c"), &validated(5, "c")));
    assert!(Arc::ptr_eq(&validated(4, "a"), &validated(5, "a")));
    assert!(Arc::ptr_eq(&compiled(4, "a.test"), &compiled(5, "a.test")));
    assert!(models[6].is_none() && models[7].is_none() && models[8].is_none());
    assert!(Arc::ptr_eq(&validated(5, "a"), &validated(9, "a")));
    assert!(Arc::ptr_eq(&validated(5, "b"), &validated(9, "b")));
    assert!(Arc::ptr_eq(&validated(9, "a"), &validated(10, "a")));
    assert!(models[13].is_none() && models[14].is_some());
    assert!(models[15].is_some() && models[16].is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

fn report_of(docs: &[&str], file: &std::path::Path, paths: &[std::path::PathBuf]) -> Vec<String> {
    std::fs::write(file, docs.join("---\n")).expect("write config");
    sluice_core::load_paths(paths)
        .diagnostics
        .warnings()
        .map(ToString::to_string)
        .collect()
}
