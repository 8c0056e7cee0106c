//! Routing through the real gateway: host precedence, first-match ordering, every match condition,
//! redirects, rewrites, header rules, weighted splits, DNS endpoints and error statuses.

use std::collections::HashMap;
use std::time::Duration;

use sluice_tests::*;

/// Starts one echo upstream per name and returns ServiceEntry YAML mapping `<name>.svc` to each.
async fn backends(names: &[&str]) -> anyhow::Result<String> {
    let mut yaml = String::new();
    for name in names {
        let addr = echo(name).await?;
        yaml.push_str(&service_entry_yaml(
            name,
            &format!("{name}.svc"),
            &[(addr, "")],
        ));
    }
    Ok(yaml)
}

/// A gateway on `port` sending every host to one echo backend, `app`.
async fn one_backend_gateway(port: u16) -> anyhow::Result<TestGateway> {
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["app"]).await?;
    yaml += &virtual_service(
        "app",
        &["*"],
        "  - route: [{destination: {host: app.svc}}]\n",
    );
    TestGateway::start(&yaml, &[port])
}

fn virtual_service(name: &str, hosts: &[&str], http: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\n\
         spec:\n  hosts: [{}]\n  gateways: [gw]\n  http:\n{http}",
        hosts.join(", ")
    )
}

#[tokio::test]
async fn host_lookup_prefers_exact_then_longest_wildcard_then_catch_all() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["exact", "wild", "deeper", "any"]).await?;
    for (vs, host) in [
        ("exact", "a.example.com"),
        ("wild", "*.example.com"),
        ("deeper", "*.b.example.com"),
        ("any", "*"),
    ] {
        yaml += &virtual_service(
            vs,
            &[host],
            &format!("  - route: [{{destination: {{host: {vs}.svc}}}}]\n"),
        );
    }
    let _gw = TestGateway::start(&yaml, &[port])?;
    for (host, expected) in [
        ("a.example.com", "exact"),
        ("A.Example.COM:8080", "exact"),
        ("c.example.com", "wild"),
        ("x.y.example.com", "wild"),
        ("x.b.example.com", "deeper"),
        ("example.com", "any"),
        ("other.org", "any"),
    ] {
        let r = get(port, host, "/").await?;
        assert_eq!(r.backend(), expected, "Host: {host}");
    }
    Ok(())
}

#[tokio::test]
async fn gateway_server_hosts_limit_what_a_virtual_service_serves() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["only.test"]);
    yaml += &backends(&["one"]).await?;
    yaml += &virtual_service(
        "all",
        &["*"],
        "  - route: [{destination: {host: one.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    assert_eq!(get(port, "only.test", "/").await?.backend(), "one");
    let other = get(port, "other.test", "/").await?;
    assert_eq!(other.status, 404);
    assert!(other.body.as_str().unwrap_or("").contains("no route"));
    Ok(())
}

#[tokio::test]
async fn first_matching_route_wins_and_unmatched_requests_get_404() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["first", "second"]).await?;
    yaml += &virtual_service(
        "order",
        &["order.test"],
        "  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: first.svc}}]\n\
         \x20 - match: [{uri: {prefix: /a/b}}]\n    route: [{destination: {host: second.svc}}]\n\
         \x20 - match: [{uri: {prefix: /b}}]\n    route: [{destination: {host: second.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    assert_eq!(get(port, "order.test", "/a/b").await?.backend(), "first");
    assert_eq!(get(port, "order.test", "/b").await?.backend(), "second");
    let miss = get(port, "order.test", "/c").await?;
    assert_eq!(miss.status, 404);
    assert_eq!(
        miss.body.as_str(),
        Some("no route: no route matches this request\n")
    );
    Ok(())
}

#[tokio::test]
async fn every_match_condition_selects_its_route() -> anyhow::Result<()> {
    let port = free_port();
    let names = [
        "exact",
        "prefix",
        "regex",
        "method",
        "authority",
        "hdrexact",
        "hdrprefix",
        "hdrregex",
        "hdrany",
        "queryany",
        "query",
        "queryregex",
        "without",
        "withoutempty",
        "icase",
        "either",
        "both",
        "scheme",
        "fallback",
    ];
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&names).await?;
    let rule = |m: &str, to: &str| {
        format!("  - match: {m}\n    route: [{{destination: {{host: {to}.svc}}}}]\n")
    };
    let mut http = String::new();
    // `statPrefix` names Envoy's per-route statistics: accepted, no effect.
    http += &rule("[{uri: {exact: /exact}, statPrefix: exact}]", "exact");
    http += &rule("[{uri: {prefix: /prefix/}}]", "prefix");
    http += &rule("[{uri: {regex: '/re/[0-9]+'}}]", "regex");
    http += &rule("[{method: {exact: POST}, uri: {prefix: /m}}]", "method");
    http += &rule("[{authority: {prefix: alt.}}]", "authority");
    http += &rule("[{headers: {x-env: {exact: canary}}}]", "hdrexact");
    // Names in any case, as Istio accepts them (Envoy matches them case-insensitively).
    http += &rule("[{headers: {X-User: {prefix: admin-}}}]", "hdrprefix");
    http += &rule("[{headers: {x-id: {regex: '[a-f]{4}'}}}]", "hdrregex");
    // Istio reads the regex `*` as "any value": a presence match.
    http += &rule(
        "[{uri: {prefix: /any}, headers: {x-any: {regex: '*'}}}]",
        "hdrany",
    );
    http += &rule(
        "[{uri: {prefix: /qany}, queryParams: {token: {regex: '*'}}}]",
        "queryany",
    );
    http += &rule("[{queryParams: {debug: {exact: '1'}}}]", "query");
    http += &rule("[{queryParams: {v: {regex: 'v[0-9]'}}}]", "queryregex");
    http += &rule(
        "[{uri: {prefix: /nohdr}, withoutHeaders: {x-block: {}}}]",
        "without",
    );
    // An absent header counts as empty for `withoutHeaders` (Istio's TreatMissingHeaderAsEmpty).
    http += &rule(
        "[{uri: {prefix: /wempty}, withoutHeaders: {x-flag: {exact: ''}}}]",
        "withoutempty",
    );
    http += &rule("[{uri: {exact: /CaSe}, ignoreUriCase: true}]", "icase");
    http += &rule("[{uri: {prefix: /or-a}}, {uri: {prefix: /or-b}}]", "either");
    http += &rule(
        "[{uri: {prefix: /and}, headers: {x-and: {exact: '1'}}}]",
        "both",
    );
    http += &rule("[{scheme: {exact: https}}]", "scheme");
    http += "  - route: [{destination: {host: fallback.svc}}]\n";
    yaml += &virtual_service("conditions", &["match.test", "alt.match.test"], &http);
    let _gw = TestGateway::start(&yaml, &[port])?;

    let c = client();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let on = |path: &str| c.get(url(path)).header("host", "match.test");
    let cases: Vec<(reqwest::RequestBuilder, &str, &str)> = vec![
        (on("/exact"), "exact", "uri exact"),
        (on("/exact/more"), "fallback", "uri exact is not a prefix"),
        (on("/prefix/a"), "prefix", "uri prefix"),
        (
            on("/prefix"),
            "fallback",
            "uri prefix needs the trailing slash",
        ),
        (on("/re/123"), "regex", "uri regex"),
        (
            on("/re/12a"),
            "fallback",
            "uri regex must match the whole path",
        ),
        (
            on("/x/re/1"),
            "fallback",
            "uri regex is anchored at the start",
        ),
        (
            c.post(url("/m")).header("host", "match.test"),
            "method",
            "method",
        ),
        (on("/m"), "fallback", "method GET does not match POST"),
        (
            c.get(url("/")).header("host", "alt.match.test"),
            "authority",
            "authority prefix",
        ),
        (
            on("/").header("x-env", "canary"),
            "hdrexact",
            "header exact",
        ),
        (
            on("/").header("x-env", "prod"),
            "fallback",
            "header exact, other value",
        ),
        (
            on("/").header("x-user", "admin-7"),
            "hdrprefix",
            "header prefix",
        ),
        (on("/").header("x-id", "abcd"), "hdrregex", "header regex"),
        (
            on("/").header("x-id", "abcde"),
            "fallback",
            "header regex is anchored",
        ),
        (
            on("/any").header("x-any", "v"),
            "hdrany",
            "header regex *, present",
        ),
        (on("/any"), "fallback", "header regex *, absent"),
        (on("/qany?token=x"), "queryany", "query regex *, present"),
        (on("/qany?other=x"), "fallback", "query regex *, absent"),
        (on("/?debug=1"), "query", "query exact"),
        (on("/?a=b&debug=2"), "fallback", "query exact, other value"),
        (on("/?v=v7"), "queryregex", "query regex"),
        (on("/nohdr"), "without", "withoutHeaders, header absent"),
        (
            on("/nohdr").header("x-block", "1"),
            "fallback",
            "withoutHeaders, header present",
        ),
        (
            on("/wempty"),
            "fallback",
            "withoutHeaders exact '', header absent",
        ),
        (
            on("/wempty").header("x-flag", "1"),
            "withoutempty",
            "withoutHeaders exact '', other value",
        ),
        (on("/case"), "icase", "ignoreUriCase lower"),
        (on("/CASE"), "icase", "ignoreUriCase upper"),
        (on("/or-a"), "either", "first match block"),
        (on("/or-b"), "either", "second match block"),
        (
            on("/and").header("x-and", "1"),
            "both",
            "all conditions of a block",
        ),
        (on("/and"), "fallback", "one condition missing"),
    ];
    for (request, expected, what) in cases {
        let r = send(request).await?;
        assert_eq!(r.backend(), expected, "{what}: {r:?}");
    }
    Ok(())
}

#[tokio::test]
async fn redirects_rewrites_and_direct_responses() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["app"]).await?;
    let http = "
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new}
  - match: [{uri: {prefix: /moved}}]
    redirect: {scheme: https, authority: other.test, redirectCode: 308}
  - match: [{uri: {prefix: /port}}]
    redirect: {port: 8443}
  - match: [{uri: {prefix: /derive}}]
    redirect: {scheme: https, derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {prefix: /default}}]
    redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/}
    route: [{destination: {host: app.svc}}]
  - match: [{uri: {exact: /exact-old}}]
    rewrite: {uri: /exact-new}
    route: [{destination: {host: app.svc}}]
  - match: [{uri: {prefix: /re/}}]
    rewrite: {uriRegexRewrite: {match: '^/re/(.*)$', rewrite: '/regex/\\1'}}
    route: [{destination: {host: app.svc}}]
  - match: [{uri: {prefix: /host}}]
    rewrite: {authority: rewritten.test}
    route: [{destination: {host: app.svc}}]
  - match: [{uri: {prefix: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {prefix: /gone}}]
    directResponse: {status: 410}
  - match: [{uri: {prefix: /bytes}}]
    directResponse: {status: 200, body: {bytes: dGhlIHF1aWNrIGJyb3duIGZveA==}}
  - match: [{uri: {prefix: /binary}}]
    directResponse:
      status: 200
      body:
        bytes: |
          /wD+
          AQ
";
    yaml += &virtual_service("actions", &["act.test"], http);
    let _gw = TestGateway::start(&yaml, &[port])?;

    let r = get(port, "act.test", "/old/page?q=1").await?;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "http://act.test/new?q=1");
    assert_eq!(r.headers.get("content-type"), None, "no body, no type");

    let r = get(port, "act.test:8080", "/moved/x").await?;
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["location"], "https://other.test/moved/x");

    let r = get(port, "act.test", "/port").await?;
    assert_eq!(r.headers["location"], "http://act.test:8443/port");
    // derivePort: the port the request came to, or the scheme's default (Envoy keeps a port the
    // client named unless it was the old scheme's default).
    let r = get(port, "act.test", "/derive").await?;
    assert_eq!(
        r.headers["location"],
        format!("https://act.test:{port}/derive")
    );
    let r = get(port, "act.test:80", "/default").await?;
    assert_eq!(r.headers["location"], "https://act.test/default");

    let r = get(port, "act.test", "/api/users?id=7").await?;
    assert_eq!(
        (r.path(), r.body["query"].as_str()),
        ("/v2/users", Some("id=7"))
    );

    assert_eq!(
        get(port, "act.test", "/exact-old").await?.path(),
        "/exact-new"
    );
    assert_eq!(get(port, "act.test", "/re/a/b").await?.path(), "/regex/a/b");

    let r = get(port, "act.test", "/host").await?;
    assert_eq!(r.request_header("host"), Some("rewritten.test"));

    let r = get(port, "act.test", "/teapot").await?;
    assert_eq!((r.status, r.body.as_str()), (418, Some("short and stout")));
    assert_eq!(r.headers["content-type"], "text/plain", "as from Envoy");
    let r = get(port, "act.test", "/bytes").await?;
    assert_eq!(
        r.body.as_str(),
        Some("the quick brown fox"),
        "body.bytes is base64"
    );
    // Not UTF-8, over two lines of a YAML block, the last group unpadded: as protojson reads it.
    let binary = client()
        .get(format!("http://127.0.0.1:{port}/binary"))
        .header("host", "act.test")
        .send()
        .await?
        .bytes()
        .await?;
    assert_eq!(&binary[..], &[0xff, 0x00, 0xfe, 0x01]);
    let r = get(port, "act.test", "/gone").await?;
    assert_eq!((r.status, r.body.as_str()), (410, Some("")));
    assert_eq!(r.headers.get("content-type"), None);
    assert_eq!(r.headers["content-length"], "0");
    Ok(())
}

#[tokio::test]
async fn a_lone_destinations_header_rules_run_after_the_routes_and_weighted_ones_before(
) -> anyhow::Result<()> {
    // Istio's translation: one destination's rules join the route's list (removals first, the
    // destination's values last); each weighted destination's run before the route's.
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["app"]).await?;
    let rules = "headers:
        request: {set: {x-both: dest, x-dest: dest}}
        response: {set: {x-both: dest, x-dest: dest}}";
    let http = format!(
        "
  - match: [{{uri: {{prefix: /lone}}}}]
    headers:
      request: {{set: {{x-both: route, x-route: route}}, remove: [x-dest]}}
      response: {{set: {{x-both: route, x-route: route}}, remove: [x-dest]}}
    route:
    - destination: {{host: app.svc}}
      headers:
        request: {{set: {{x-both: dest, x-dest: dest}}, remove: [x-route]}}
        response: {{set: {{x-both: dest, x-dest: dest}}, remove: [x-route]}}
  - headers:
      request: {{set: {{x-both: route}}, remove: [x-dest]}}
      response: {{set: {{x-both: route}}, remove: [x-dest]}}
    route:
    - destination: {{host: app.svc}}
      weight: 50
      {rules}
    - destination: {{host: app.svc}}
      weight: 50
      {rules}
"
    );
    yaml += &virtual_service("order", &["order.test"], &http);
    let _gw = TestGateway::start(&yaml, &[port])?;
    // Removals first: the lone destination's does not undo the route's value.
    let r = get(port, "order.test", "/lone").await?;
    assert_eq!(r.request_header("x-route"), Some("route"));
    assert_eq!(r.headers["x-route"], "route");
    for (path, both, dest) in [
        ("/lone", "dest", Some("dest")),
        ("/weighted", "route", None),
    ] {
        let r = get(port, "order.test", path).await?;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.request_header("x-both"), Some(both), "{path}");
        assert_eq!(r.request_header("x-dest"), dest, "{path}");
        assert_eq!(r.headers["x-both"], both, "{path}");
        assert_eq!(
            r.headers.get("x-dest").and_then(|v| v.to_str().ok()),
            dest,
            "{path}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn header_rules_apply_to_requests_and_responses() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["app"]).await?;
    let http = "
  - headers:
      request:
        set: {x-set: route}
        add: {x-add: added}
        remove: [x-remove]
      response:
        set: {x-resp-set: route}
        add: {x-resp-add: added}
        remove: [x-backend]
    route:
    - destination: {host: app.svc}
      headers:
        request: {set: {x-dest: dest}}
        response: {add: {x-dest-resp: dest}}
";
    yaml += &virtual_service("headers", &["hdr.test"], http);
    // Rules of one kind only: a remove alone on the route, response rules alone on the target.
    let one_kind = "
  - match: [{uri: {prefix: /only}}]
    headers:
      request:
        remove: [x-remove]
    route:
    - destination: {host: app.svc}
      headers:
        response: {set: {x-dest-resp: only}}
";
    yaml += &virtual_service("one-kind", &["hdr2.test"], one_kind);
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = send(
        client()
            .get(format!("http://127.0.0.1:{port}/"))
            .header("host", "hdr.test")
            .header("x-set", "client")
            .header("x-add", "client")
            .header("x-remove", "client")
            .header("x-forwarded-for", "203.0.113.9"),
    )
    .await?;
    assert_eq!(r.request_header("x-set"), Some("route"));
    // The echo server reports repeated headers as its last value; presence of the client's value
    // is checked through the joined form hyper gives for a repeated header.
    assert!(r.request_header("x-add").is_some());
    assert_eq!(r.request_header("x-remove"), None);
    assert_eq!(r.request_header("x-dest"), Some("dest"));
    assert_eq!(
        r.request_header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(r.request_header("x-forwarded-proto"), Some("http"));
    assert_eq!(r.request_header("host"), Some("hdr.test"));
    assert_eq!(r.headers["x-resp-set"], "route");
    assert_eq!(r.headers["x-resp-add"], "added");
    assert_eq!(r.headers["x-dest-resp"], "dest");
    assert!(!r.headers.contains_key("x-backend"));

    let r = send(
        client()
            .get(format!("http://127.0.0.1:{port}/only/x"))
            .header("host", "hdr2.test")
            .header("x-remove", "client")
            .header("x-keep", "client"),
    )
    .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.request_header("x-remove"), None);
    assert_eq!(r.request_header("x-keep"), Some("client"));
    assert_eq!(r.headers["x-dest-resp"], "only");
    Ok(())
}

/// Counts which backend answered `n` requests to `host`.
async fn tally(port: u16, host: &str, n: usize) -> anyhow::Result<HashMap<String, usize>> {
    let c = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = send(
            c.get(format!("http://127.0.0.1:{port}/"))
                .header("host", host),
        )
        .await?;
        *counts.entry(r.backend().to_string()).or_insert(0) += 1;
    }
    Ok(counts)
}

#[tokio::test]
async fn weighted_split_90_10_lands_within_3_points_over_2000_requests() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &reviews_subsets_yaml(echo("v1").await?, echo("v2").await?);
    yaml += &virtual_service(
        "split",
        &["split.test"],
        "  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 90}\n\
         \x20   - {destination: {host: reviews, subset: v2}, weight: 10}\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    let counts = tally(port, "split.test", 2000).await?;
    let v1 = counts.get("v1").copied().unwrap_or(0) as f64 / 20.0;
    let v2 = counts.get("v2").copied().unwrap_or(0) as f64 / 20.0;
    assert!((87.0..=93.0).contains(&v1), "v1 got {v1}% ({counts:?})");
    assert!((7.0..=13.0).contains(&v2), "v2 got {v2}% ({counts:?})");
    Ok(())
}

#[tokio::test]
async fn zero_weight_destination_gets_nothing_and_weights_need_not_sum_to_100() -> anyhow::Result<()>
{
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &reviews_subsets_yaml(echo("v1").await?, echo("v2").await?);
    yaml += &virtual_service(
        "split",
        &["zero.test", "thirds.test"],
        "  - match: [{authority: {prefix: zero}}]\n    route:\n\
         \x20   - {destination: {host: reviews, subset: v1}, weight: 0}\n\
         \x20   - {destination: {host: reviews, subset: v2}, weight: 100}\n\
         \x20 - route:\n    - {destination: {host: reviews, subset: v1}, weight: 1}\n\
         \x20   - {destination: {host: reviews, subset: v2}, weight: 2}\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    let counts = tally(port, "zero.test", 500).await?;
    assert_eq!(counts.get("v2"), Some(&500), "{counts:?}");
    let thirds = tally(port, "thirds.test", 600).await?;
    let v2 = thirds.get("v2").copied().unwrap_or(0);
    assert!((340..=460).contains(&v2), "weights 1:2 gave {thirds:?}");
    Ok(())
}

#[tokio::test]
async fn dns_endpoints_resolve_localhost() -> anyhow::Result<()> {
    let port = free_port();
    let upstream = echo("by-dns").await?;
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ep}}\nspec:\n\
         \x20 hosts: [api.external.test]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n\
         \x20 resolution: DNS\n  endpoints: [{{address: localhost, ports: {{http: {}}}}}]\n",
        upstream.port(),
    );
    yaml += &virtual_service(
        "dns",
        &["dns.test"],
        "  - route: [{destination: {host: api.external.test}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    for _ in 0..5 {
        assert_eq!(get(port, "dns.test", "/").await?.backend(), "by-dns");
    }
    Ok(())
}

#[tokio::test]
async fn failures_get_precise_statuses() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &reviews_subsets_yaml(echo("v1").await?, echo("v2").await?);
    yaml += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dead}}\n\
         spec:\n  host: dead.svc\n  subsets: [{{name: none, labels: {{version: v9}}}}]\n{}",
        service_entry_yaml("dead", "dead.svc", &[(refusing_address(), "version: v1")])
    );
    yaml += &virtual_service(
        "errors",
        &["err.test"],
        "  - match: [{uri: {prefix: /empty-subset}}]\n    route: [{destination: {host: dead.svc, subset: none}}]\n\
         \x20 - match: [{uri: {prefix: /refused}}]\n    route: [{destination: {host: dead.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = get(port, "err.test", "/empty-subset").await?;
    assert_eq!(r.status, 503);
    assert!(
        r.body
            .as_str()
            .unwrap_or("")
            .contains("no healthy upstream"),
        "{r:?}"
    );
    let r = get(port, "err.test", "/refused").await?;
    assert_eq!(r.status, 503);
    assert!(r.body.as_str().unwrap_or("").contains("connect"), "{r:?}");
    let r = get(port, "nowhere.test", "/").await?;
    assert_eq!(r.status, 404);
    Ok(())
}

#[tokio::test]
async fn h2c_prior_knowledge_is_proxied() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["app"]).await?;
    yaml += &virtual_service(
        "h2",
        &["*"],
        "  - route: [{destination: {host: app.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build()?;
    let response = h2.get(format!("http://127.0.0.1:{port}/h2")).send().await?;
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["backend"], "app");
    assert_eq!(body["path"], "/h2");
    Ok(())
}

#[tokio::test]
async fn short_requests_and_paused_keep_alive_connections_are_served() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let _gw = one_backend_gateway(port).await?;

    // Shorter than the HTTP/2 preface: must not wait for 24 bytes that never come (h2c is on).
    let mut short = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    short.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), short.read_to_string(&mut answer)).await??;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );

    // One keep-alive connection: requests with pauses between them, each sent in two pieces (the
    // first byte alone is what an idle connection waits for).
    let mut stream =
        tokio::io::BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let request = format!("GET /round/{round} HTTP/1.1\r\nHost: a.test\r\n\r\n");
        stream.get_mut().write_all(&request.as_bytes()[..1]).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.get_mut().write_all(&request.as_bytes()[1..]).await?;
        let (status, body) = read_http1_response(&mut stream).await?;
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "round {round}: {status}"
        );
        let body: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(body["path"], format!("/round/{round}"));
    }
    Ok(())
}

/// A request-target in absolute form (`GET http://host/path`, as clients configured to use a proxy
/// send it) names the host (RFC 9112 3.2.2): it routes the request also when no Host header came,
/// and the upstream receives the origin form with that host, as from Envoy. A Host header that
/// names another host is refused (Pingora's rule, stricter than the RFC's "replace it"). A route's
/// URI rewrite keeps that host.
#[tokio::test]
async fn absolute_form_requests_route_by_their_target_and_reach_the_upstream_in_origin_form(
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["a", "b"]).await?;
    yaml += &virtual_service(
        "a",
        &["a.example"],
        "  - route: [{destination: {host: a.svc}}]\n",
    );
    yaml += &virtual_service(
        "b",
        &["b.example"],
        "  - match: [{uri: {prefix: /old/}}]\n    rewrite: {uri: /new/}\n    \
         route: [{destination: {host: b.svc}}]\n  - route: [{destination: {host: b.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    let connect = || async {
        anyhow::Ok(tokio::io::BufReader::new(
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await?,
        ))
    };
    let mut stream = connect().await?;
    stream
        .get_mut()
        .write_all(
            b"GET http://a.example:8080/x?y=1 HTTP/1.1\r\n\r\n\
              GET http://b.example/plain HTTP/1.1\r\nHost: b.example\r\n\r\n\
              GET http://a.example?y=1 HTTP/1.1\r\n\r\n\
              GET http://b.example/old/p HTTP/1.1\r\n\r\n",
        )
        .await?;
    for (backend, path, host) in [
        ("a", "/x", "a.example:8080"),
        ("b", "/plain", "b.example"),
        ("a", "/", "a.example"),
        ("b", "/new/p", "b.example"),
    ] {
        let (status, body) = read_http1_response(&mut stream).await?;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        let echoed: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(echoed["backend"], backend, "{echoed}");
        assert_eq!(echoed["path"], path);
        assert_eq!(
            echoed["target_authority"],
            serde_json::Value::Null,
            "{echoed}"
        );
        assert_eq!(echoed["headers"]["host"], host);
        if backend == "a" {
            assert_eq!(echoed["query"], "y=1");
        }
    }
    let mut stream = connect().await?;
    stream
        .get_mut()
        .write_all(b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n")
        .await?;
    let (status, _) = read_http1_response(&mut stream).await?;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_fields_stop_at_the_gateway_and_connection_options_are_checked(
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let port = free_port();
    let gw = one_backend_gateway(port).await?;
    let exchange = |head: String, body: &'static [u8]| async move {
        let mut stream =
            tokio::io::BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream.get_mut().write_all(&request).await?;
        let (status, body) = read_http1_response(&mut stream).await?;
        anyhow::Ok((status, body))
    };
    let head = |method: &str, fields: &str| {
        format!("{method} /p HTTP/1.1\r\nHost: a.test\r\n{fields}\r\n")
    };

    let (status, body) = exchange(
        head(
            "GET",
            "Connection: x-foo, Keep-Alive\r\nConnection: x-baz\r\nX-Foo: 1\r\nX-Baz: 1\r\n\
             Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-checksum\r\n\
             Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Bar: 2\r\n",
        ),
        b"",
    )
    .await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let echoed: serde_json::Value = serde_json::from_slice(&body)?;
    let received = &echoed["headers"];
    for name in [
        "connection",
        "x-foo",
        "x-baz",
        "keep-alive",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
        "http2-settings",
    ] {
        assert_eq!(
            received[name],
            serde_json::Value::Null,
            "{name}: {received}"
        );
    }
    assert_eq!(received["x-bar"], "2", "an end-to-end field goes on");
    assert_eq!(received["te"], "trailers", "as Envoy forwards it");

    // The chunked framing is the client's hop: the body still arrives, framed anew.
    let (status, body) = exchange(
        head("POST", "Transfer-Encoding: chunked\r\n"),
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let echoed: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(echoed["body_bytes"], 11, "{echoed}");

    let nine = "Connection: a, b, c, d, e, f, g, h, i\r\n";
    assert_eq!(exchange(head("GET", nine), b"").await?.0, "HTTP/1.1 200 OK");
    for (fields, reason) in [
        (
            "Connection: Host\r\n",
            "Connection names a field the gateway must forward\n",
        ),
        (
            "Connection: keep-alive, X-Forwarded-For\r\n",
            "Connection names a field the gateway must forward\n",
        ),
        (
            "Connection: x-request-id\r\n",
            "Connection names a field the gateway must forward\n",
        ),
        (
            "Connection: X-Forwarded-Client-Cert\r\n",
            "Connection names a field the gateway must forward\n",
        ),
        ("Connection: \"x-foo\"\r\n", "invalid Connection option\n"),
        ("Connection: :authority\r\n", "invalid Connection option\n"),
        (
            "Connection: a, b, c, d, e, f, g, h, i, j\r\n",
            "too many Connection options\n",
        ),
    ] {
        let (status, body) = exchange(head("GET", fields), b"").await?;
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{fields}");
        assert_eq!(String::from_utf8_lossy(&body), reason, "{fields}");
    }
    // A refusal carries the request id, as every answer of Sluice's own.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(head("GET", "Connection: Host\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer),
    )
    .await??;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("\r\nx-request-id: "),
        "{answer}"
    );
    // What a client caused is counted (and access-logged), not in the error log.
    let metrics = gw.metrics().await?;
    let refused: f64 = samples(&metrics)
        .iter()
        .filter(|(name, labels, _)| {
            name == "istio_requests_total"
                && labels.get("response_code").map(String::as_str) == Some("400")
        })
        .map(|(_, _, value)| value)
        .sum();
    assert_eq!(refused, 8.0, "{metrics}");
    let log = gw.log();
    assert!(!log.contains("ERROR"), "{log}");
    Ok(())
}

#[tokio::test]
async fn a_websocket_handshake_reaches_the_upstream_and_the_connection_becomes_a_tunnel(
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    // A WebSocket upstream at the byte level: it answers a handshake, then echoes what it reads;
    // any other request gets a plain answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    let (head_seen, mut upstream_heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let head_seen = head_seen.clone();
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                let mut head = String::new();
                while !head.ends_with("\r\n\r\n") {
                    if stream.read_line(&mut head).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                let handshake = head
                    .to_ascii_lowercase()
                    .contains("\r\nupgrade: websocket\r\n");
                let _ = head_seen.send(head);
                if !handshake {
                    let plain =
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain";
                    let _ = stream.get_mut().write_all(plain).await;
                    return;
                }
                let handshake = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                                  Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if stream.get_mut().write_all(handshake).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    let mut echo = b"echo:".to_vec();
                    echo.extend_from_slice(&buf[..n]);
                    if stream.get_mut().write_all(&echo).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut next_upstream_head = async || {
        let head = tokio::time::timeout(Duration::from_secs(10), upstream_heads.recv()).await?;
        anyhow::Ok(head.unwrap_or_default().to_ascii_lowercase())
    };
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &service_entry_yaml("ws", "ws.svc", &[(upstream, "")]);
    yaml += &virtual_service("ws", &["*"], "  - route: [{destination: {host: ws.svc}}]\n");
    let _gw = TestGateway::start(&yaml, &[port])?;

    // Not handshakes, so plain requests: `Upgrade: websocket` without the `upgrade` option, and
    // an HTTP/1.0 client (no upgrades in HTTP/1.0).
    for request in [
        &b"GET /chat HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\n\r\n"[..],
        b"GET /chat HTTP/1.0\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let mut client =
            tokio::io::BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
        client.get_mut().write_all(request).await?;
        let (status, body) = read_http1_response(&mut client).await?;
        assert_eq!(&body[..], b"plain", "{status}");
        assert!(status.ends_with(" 200 OK"), "{status}");
        let head = next_upstream_head().await?;
        assert!(!head.contains("upgrade"), "{head}");
    }

    let mut client =
        tokio::io::BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
    client
        .get_mut()
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\n\
              Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await?;
    let mut response = String::new();
    while !response.ends_with("\r\n\r\n") {
        anyhow::ensure!(
            client.read_line(&mut response).await? > 0,
            "closed: {response}"
        );
    }
    assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{response}");
    assert!(
        lower.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{response}"
    );

    let head = next_upstream_head().await?;
    for field in [
        "connection: upgrade",
        "upgrade: websocket",
        "sec-websocket-key: dghlihnhbxbszsbub25jzq==",
        "sec-websocket-version: 13",
    ] {
        assert!(
            head.contains(&format!("\r\n{field}\r\n")),
            "{field}: {head}"
        );
    }
    assert!(!head.contains("keep-alive"), "{head}");

    // Bytes both ways, including ones that look like a request: a tunnel, not HTTP any more.
    for message in [&b"hello"[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"bye"] {
        client.get_mut().write_all(message).await?;
        let mut echoed = vec![0u8; 5 + message.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed)).await??;
        assert_eq!(&echoed[..5], b"echo:");
        assert_eq!(&echoed[5..], message);
    }
    Ok(())
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let _gw = one_backend_gateway(port).await?;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n");
    let cases: [(&str, Vec<String>, Vec<&str>); 6] = [
        (
            "three requests in one write, the second answered slowly",
            vec![get("/1") + &get("/2?sleep_ms=200") + &get("/3")],
            vec!["/1", "/2", "/3"],
        ),
        (
            // The second arrives while the first is with the upstream. Pingora used to fail the
            // first ("sent data after end of body") and reset the connection.
            "the next request sent while the first is in flight",
            vec![get("/slow?sleep_ms=300"), get("/next")],
            vec!["/slow", "/next"],
        ),
        (
            "a request with a body, then another",
            vec![
                "POST /form HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello".to_string()
                    + &get("/after"),
            ],
            vec!["/form", "/after"],
        ),
        (
            "a chunked request, then another",
            vec![
                "POST /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n"
                    .to_string()
                    + &get("/after"),
            ],
            vec!["/upload", "/after"],
        ),
        (
            "a body split across writes, the next request with its end",
            vec![
                "POST /form HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhel".to_string(),
                "lo".to_string() + &get("/after"),
            ],
            vec!["/form", "/after"],
        ),
        (
            "a chunked request with a trailer, then another",
            vec![
                "POST /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"
                    .to_string()
                    + &get("/after"),
            ],
            vec!["/upload", "/after"],
        ),
    ];
    for (case, writes, paths) in cases {
        let mut stream =
            tokio::io::BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
        for write in &writes {
            stream.get_mut().write_all(write.as_bytes()).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for path in &paths {
            let (status, body) =
                tokio::time::timeout(Duration::from_secs(5), read_http1_response(&mut stream))
                    .await
                    .map_err(|_| anyhow::anyhow!("{case}: no answer for {path}"))??;
            assert!(
                status.starts_with("HTTP/1.1 200"),
                "{case}, {path}: {status}"
            );
            let body: serde_json::Value = serde_json::from_slice(&body)?;
            assert_eq!(body["path"], *path, "{case}");
        }
        // The connection stays open and keeps serving after a pause.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream
            .get_mut()
            .write_all(b"GET /later HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .await?;
        let (status, body) = read_http1_response(&mut stream).await?;
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "{case}, later: {status}"
        );
        let body: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(body["path"], "/later", "{case}");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
        assert!(rest.is_empty(), "{case}: nothing after the last answer");
    }
    Ok(())
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_a_minute_also_after_pipelining(
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let _gw = one_backend_gateway(port).await?;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n");
    // Each connection: what it sends, how many answers it reads, then what it leaves unfinished.
    let connections = [
        ("one request", get("/a"), 1, ""),
        ("pipelined requests", get("/a") + &get("/b"), 2, ""),
        (
            "pipelined, then half a head",
            get("/a") + &get("/b"),
            2,
            "GET /c HTTP/1.1\r\nHo",
        ),
        (
            "one request, then half a head",
            get("/a"),
            1,
            "GET /c HTTP/1.1\r\nHo",
        ),
    ];
    let started = std::time::Instant::now();
    let mut waits = Vec::new();
    for (case, requests, answers, unfinished) in connections {
        let mut stream =
            tokio::io::BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
        stream.get_mut().write_all(requests.as_bytes()).await?;
        for _ in 0..answers {
            let (status, _) = read_http1_response(&mut stream).await?;
            assert!(status.starts_with("HTTP/1.1 200"), "{case}: {status}");
        }
        stream.get_mut().write_all(unfinished.as_bytes()).await?;
        waits.push(tokio::spawn(async move {
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(80), stream.read_to_end(&mut rest)).await;
            (case, closed.is_ok(), started.elapsed())
        }));
    }
    for wait in waits {
        let (case, closed, after) = wait.await?;
        assert!(closed, "{case}: still open after {after:?}");
        assert!(
            after >= Duration::from_secs(55),
            "{case}: closed after only {after:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_resets_before_headers_give_503() -> anyhow::Result<()>
{
    let port = free_port();
    // An upstream that accepts connections and closes them without answering.
    let resetter = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reset_addr = resetter.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = resetter.accept().await {
            drop(stream);
        }
    });
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["app"]).await?;
    yaml += &service_entry_yaml("reset", "reset.svc", &[(reset_addr, "")]);
    yaml += &virtual_service(
        "pool",
        &["pool.test"],
        "  - match: [{uri: {prefix: /reset}}]\n    route: [{destination: {host: reset.svc}}]\n\
         \x20 - route: [{destination: {host: app.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    let mut connections = std::collections::HashSet::new();
    for _ in 0..50 {
        let r = get(port, "pool.test", "/").await?;
        connections.insert(r.body["connection"].as_u64().unwrap_or(0));
    }
    // 50 sequential requests, one downstream client at a time: the upstream connection is reused.
    assert!(
        connections.len() <= 2,
        "upstream connections used: {connections:?}"
    );
    let r = get(port, "pool.test", "/reset").await?;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body
            .as_str()
            .unwrap_or("")
            .contains("reset before headers"),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn dot_segments_are_normalized_before_routing() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["public", "admin"]).await?;
    yaml += &virtual_service(
        "norm",
        &["norm.test"],
        "  - match: [{uri: {prefix: /admin}}]\n    route: [{destination: {host: admin.svc}}]\n\
         \x20 - match: [{uri: {prefix: /public}}]\n    route: [{destination: {host: public.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    // reqwest would normalize the path itself; send the raw request line.
    let raw = "GET /public/../admin/x?q=1 HTTP/1.1\r\nHost: norm.test\r\nConnection: close\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(raw.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    assert!(response.contains("\"backend\":\"admin\""), "{response}");
    assert!(response.contains("\"path\":\"/admin/x\""), "{response}");
    Ok(())
}

#[tokio::test]
async fn response_header_rules_apply_to_direct_responses_and_redirects() -> anyhow::Result<()> {
    let port = free_port();
    let yaml = gateway_yaml(port, &["*"])
        + &virtual_service(
            "own",
            &["own.test"],
            "  - match: [{uri: {prefix: /json}}]\n    directResponse: {status: 200, body: {string: '{}'}}\n\
             \x20   headers: {response: {set: {content-type: application/json}}}\n\
             \x20 - redirect: {uri: /json}\n    headers: {response: {add: {x-why: moved}}}\n",
        );
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = get(port, "own.test", "/json").await?;
    assert_eq!(r.headers["content-type"], "application/json");
    let r = get(port, "own.test", "/old").await?;
    assert_eq!((r.status, r.headers["x-why"].to_str()?), (301, "moved"));
    Ok(())
}

#[tokio::test]
async fn http2_service_ports_are_reached_over_h2c() -> anyhow::Result<()> {
    let port = free_port();
    let upstream = echo("grpc-like").await?;
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: h2}}\nspec:\n\
         \x20 hosts: [h2.svc]\n  ports: [{{number: 80, name: grpc, protocol: GRPC}}]\n  resolution: STATIC\n\
         \x20 endpoints: [{{address: 127.0.0.1, ports: {{grpc: {}}}}}]\n",
        upstream.port()
    );
    yaml += &virtual_service("h2", &["*"], "  - route: [{destination: {host: h2.svc}}]\n");
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = get(port, "h2.test", "/").await?;
    assert_eq!(
        (r.backend(), r.body["version"].as_str()),
        ("grpc-like", Some("HTTP/2.0")),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn request_ids_and_trace_headers_travel_with_the_request() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &backends(&["app"]).await?;
    yaml += &service_entry_yaml("dead", "dead.svc", &[(refusing_address(), "")]);
    yaml += &virtual_service(
        "ids",
        &["ids.test"],
        "  - match: [{uri: {prefix: /refused}}]\n    route: [{destination: {host: dead.svc}}]\n\
         \x20 - match: [{uri: {prefix: /by-id}, headers: {x-request-id: {regex: \".{36}\"}}}]\n\
         \x20   headers: {response: {set: {x-matched-by-id: \"yes\"}}}\n\
         \x20   route: [{destination: {host: app.svc}}]\n\
         \x20 - route: [{destination: {host: app.svc}}]\n",
    );
    let _gw = TestGateway::start(&yaml, &[port])?;
    // The id is there before routing, as in Envoy: a route can match the one Sluice generated.
    let r = get(port, "ids.test", "/by-id").await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("x-matched-by-id").map(|v| v.as_bytes()),
        Some(&b"yes"[..]),
        "{:?}",
        r.headers
    );
    // Sluice's own answers carry the id too: no route (404) and an upstream that refuses (503).
    for (host, path, status) in [("nothing.test", "/", 404), ("ids.test", "/refused", 503)] {
        let r = get(port, host, path).await?;
        assert_eq!(r.status, status, "{path}");
        assert_eq!(
            r.headers["x-request-id"].len(),
            36,
            "{path}: {:?}",
            r.headers
        );
        let request = client()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", host)
            .header("x-request-id", "mine-7");
        let r = send(request).await?;
        assert_eq!(r.headers["x-request-id"], "mine-7", "{path}");
    }
    // Generated when absent: a version 4 UUID, the same upstream and back to the client.
    let r = get(port, "ids.test", "/").await?;
    let id = r.request_header("x-request-id").unwrap_or("").to_string();
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "{id}"
    );
    assert!(
        parts[2].starts_with('4') && "89ab".contains(&parts[3][..1]),
        "{id}"
    );
    assert_eq!(r.headers["x-request-id"], id.as_str());
    let other = get(port, "ids.test", "/").await?;
    assert_ne!(other.request_header("x-request-id"), Some(id.as_str()));
    // Kept when present; B3 and W3C trace context pass through unchanged.
    let trace = [
        ("x-request-id", "my-request-1"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "rojo=00f067aa0ba902b7"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "1"),
    ];
    let mut request = client()
        .get(format!("http://127.0.0.1:{port}/"))
        .header("host", "ids.test");
    for (name, value) in trace {
        request = request.header(name, value);
    }
    let r = send(request).await?;
    for (name, value) in trace {
        assert_eq!(r.request_header(name), Some(value), "{name}");
    }
    assert_eq!(r.headers["x-request-id"], "my-request-1");
    Ok(())
}
