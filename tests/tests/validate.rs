//! `sluice validate` on broken configs: every case must name the file and the line, with a message
//! that says what is wrong. Each case marks its expected line with `#<` in the YAML itself.

use std::time::{Duration, Instant};

use sluice_tests::validate;

const HEAD: &str = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n---\n";

fn vs(http: &str) -> String {
    format!(
        "{HEAD}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [a.test]\n  gateways: [gw]\n  http:\n{http}"
    )
}

const ENTRY: &str = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: svc}\nspec:\n  hosts: [svc.test]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc}\nspec:\n  host: svc.test\n  subsets: [{name: v1, labels: {version: v1}}]\n";

const ACME_SETTINGS: &str = "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  acme:\n    issuers: [{name: le, directoryUrl: 'https://acme.test/dir'}]\n";
const ACME_GATEWAY: &str = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 443, protocol: HTTPS}\n    hosts: [shop.test]\n";

/// (case, YAML, expected message fragment). The expected line is the one holding `#<`, or line 1.
fn cases() -> Vec<(&'static str, String, &'static str)> {
    let ok_route = "  - route: [{destination: {host: svc.test}}]\n";
    vec![
        ("bad yaml", format!("{HEAD}apiVersion: v1\nkind: a: b #<\n"), "mapping values are not allowed"),
        ("tab indentation", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n\tservers: [] #<\n".into(), "has a tab"),
        ("duplicate key", "apiVersion: networking.istio.io/v1\nkind: Gateway\nkind: Gateway #<\nmetadata: {name: gw}\n".into(), "duplicate key `kind` (first written on line 2)"),
        ("empty file", String::new(), "holds no documents"),
        ("only comments", "# nothing here\n---\n".into(), "holds no documents"),
        ("truncated file", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw,\n  namespace: de #<".into(), "did not find expected"),
        ("unknown field", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hostz: [a] #<\n".into(), "unknown field `hostz`"),
        ("wrong type", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port:\n      number: eighty #<\n      protocol: HTTP\n    hosts: [a]\n".into(), "invalid type"),
        ("port 0", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port:\n      number: 0 #<\n      protocol: HTTP\n    hosts: [a]\n".into(), "port 0 is out of range"),
        ("port 70000", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port:\n      number: 70000 #<\n      protocol: HTTP\n    hosts: [a]\n".into(), "port 70000 is out of range"),
        ("invalid regex", vs("  - match:\n    - uri:\n        regex: '([a-z' #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "invalid regex"),
        ("dangling gateway", format!("{HEAD}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [a.test]\n  gateways:\n  - nope #<\n  http:\n{ok_route}{ENTRY}"), "gateway `default/nope` is not defined"),
        ("missing subset", vs("  - route:\n    - destination:\n        host: svc.test\n        subset: v3 #<\n") + ENTRY, "subset `v3` is not defined"),
        ("weights sum to zero", vs("  - route: #<\n    - {destination: {host: svc.test}, weight: 0}\n    - {destination: {host: svc.test, subset: v1}, weight: 0}\n") + ENTRY, "add up to 0"),
        ("negative weight", vs("  - route:\n    - destination: {host: svc.test}\n      weight: -5 #<\n    - destination: {host: svc.test}\n      weight: 5\n") + ENTRY, "weight -5"),
        ("duplicate names", format!("{HEAD}apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw #<\nspec:\n  servers:\n  - port: {{number: 8081, protocol: HTTP}}\n    hosts: [b]\n"), "duplicate Gateway `default/gw`"),
        ("route and redirect", vs("  - redirect: {uri: /x} #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "conflicting actions route + redirect"),
        ("no action", vs("  - match: [{uri: {prefix: /}}] #<\n") + ENTRY, "needs one of `route`"),
        ("rewrite authority empty", vs("  - rewrite:\n      authority: \"\" #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "not a valid authority"),
        ("rewrite with redirect", vs("  - redirect: {uri: /x}\n    rewrite: #<\n      uri: /y\n") + ENTRY, "`rewrite` only applies to `route`"),
        ("unknown kind", "apiVersion: networking.istio.io/v1\nkind: Gatewy #<\nmetadata: {name: gw}\n".into(), "unknown kind `Gatewy`"),
        ("bad apiVersion", "apiVersion: networking.istio.io/v2 #<\nkind: Gateway\nmetadata: {name: gw}\n".into(), "apiVersion `networking.istio.io/v2` is not known"),
        ("unsupported field", vs("  - retries: {attempts: 3} #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "`spec.http[0].retries` is not supported yet"),
        ("unknown protocol", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTQ} #<\n    hosts: [a]\n".into(), "unknown protocol `HTTQ`"),
        ("invalid host", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts:\n    - 'bad host!' #<\n".into(), "not a valid host name"),
        ("static endpoint not an ip", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.test]\n  ports: [{number: 5432, name: pg}]\n  resolution: STATIC\n  endpoints:\n  - address: db.local #<\n".into(), "resolution STATIC needs IP"),
        ("resolution none", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec: #<\n  hosts: [db.test]\n  ports: [{number: 5432, name: pg}]\n".into(), "must be STATIC or DNS"),
        ("two kinds of string match", vs("  - match:\n    - uri: {exact: /a, prefix: /b} #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "only one of `exact`, `prefix` or `regex`"),
        ("query prefix", vs("  - match:\n    - queryParams:\n        a:\n          prefix: x #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "`prefix` is not supported for queryParams"),
        ("redirect code", vs("  - redirect:\n      redirectCode: 200 #<\n") + ENTRY, "redirectCode 200 is not a redirect"),
        ("direct response bytes not base64", vs("  - directResponse:\n      status: 200\n      body:\n        bytes: \"not base64!\" #<\n") + ENTRY, "not base64"),
        ("direct response string and bytes", vs("  - directResponse:\n      status: 200\n      body:\n        string: a\n        bytes: YQ== #<\n") + ENTRY, "set `string` or `bytes`, not both"),
        ("redirect derivePort unknown", vs("  - redirect:\n      derivePort: FROM_HOST #<\n") + ENTRY, "unknown derivePort `FROM_HOST`"),
        ("redirect port and derivePort", vs("  - redirect:\n      port: 8443\n      derivePort: FROM_REQUEST_PORT #<\n") + ENTRY, "set `port` or `derivePort`, not both"),
        ("direct response status", vs("  - directResponse:\n      status: 99 #<\n") + ENTRY, "status 99"),
        ("missing destination host", vs("  - route:\n    - destination: {subset: v1} #<\n") + ENTRY, "missing field `host`"),
        ("dns host without port", vs("  - route:\n    - destination: #<\n        host: other.example.com\n"), "`port.number` is required"),
        ("duplicate header key", vs("  - headers:\n      request:\n        set:\n          x-a: '1'\n          x-a: '2' #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "duplicate key `spec.http[0].headers.request.set.x-a` (first written on line 19)"),
("rewrite without a value", vs("  - rewrite: {} #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "`rewrite` needs `uri`"),
        ("redirect uri not a path", vs("  - redirect:\n      uri: new-page #<\n") + ENTRY, "is not a path"),
        ("rewrite uri not a path", vs("  - rewrite:\n      uri: 'a b' #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "is not a path"),
        ("regex rewrite missing group", vs("  - rewrite:\n      uriRegexRewrite:\n        match: '^/(a)$'\n        rewrite: '/\\2' #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY, "capture group"),
        ("empty namespace prefix", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts:\n    - /a.com #<\n".into(), "the namespace before `/` is empty"),
        ("mesh port is a gateway port", format!("apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {{name: s}}\nspec:\n  meshListener:\n    port: 8080 #<\n---\n{HEAD}"), "also a server port of Gateway `default/gw`"),
        ("unknown service protocol", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.test]\n  ports:\n  - number: 80\n    protocol: HTTQ #<\n  resolution: DNS\n".into(), "unknown protocol `HTTQ`"),
        ("route to a tcp port", vs("  - route:\n    - destination: #<\n        host: db.test\n") + "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.test]\n  ports: [{number: 5432, protocol: TCP}]\n  resolution: DNS\n", "protocol TCP cannot carry HTTP routes"),
        ("huge duration", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  dnsRefreshRate: 99999999999999999999s #<\n".into(), "is not a duration"),
("bad trusted cidr", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  proxyProtocol:\n    trustedCidrs:\n    - 10.0.0.0/33 #<\n".into(), "is not a CIDR"),
        ("proxy protocol without trusted sources", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  proxyProtocol: #<\n    allowWithoutHeader: true\n".into(), "`trustedCidrs` is required"),
        ("negative drain", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  drainSeconds: -1 #<\n".into(), "must be between 0 and 3600 seconds"),
        ("duplicate subset", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec:\n  host: x.test\n  subsets:\n  - {name: v1}\n  - name: v1 #<\n".into(), "duplicate subset `v1`"),
        ("missing name", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {namespace: x} #<\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: [a]\n".into(), "`metadata.name` is required"),
        ("slash in a name", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  namespace: a\n  name: b/c #<\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: [a]\n".into(), "`metadata.name` must not contain `/`"),
        ("slash in a namespace", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  namespace: a/b #<\n  name: c\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: [a]\n".into(), "`metadata.namespace` must not contain `/`"),
        ("bad bind address", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  bindAddress: localhost #<\n".into(), "is not an IP address"),
        ("bad duration", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  dnsRefreshRate: 5 seconds #<\n".into(), "is not a duration"),
        ("acme issuer not defined", format!("{ACME_SETTINGS}---\n{ACME_GATEWAY}    tls:\n      mode: SIMPLE\n      credentialName: acme:nope #<\n"), "no ACME issuer `nope`"),
        ("credential named like an acme host", format!("{ACME_SETTINGS}---\n{ACME_GATEWAY}    tls: {{mode: SIMPLE, credentialName: 'acme:le'}}\n  - port: {{number: 8443, protocol: HTTPS}}\n    hosts: [other.test]\n    tls: {{mode: SIMPLE, credentialName: shop.test}} #<\n"), "names the files Sluice writes for the ACME host shop.test"),
        ("acme wildcard host", format!("{ACME_SETTINGS}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n  - port: {{number: 443, protocol: HTTPS}}\n    hosts:\n    - '*.shop.test' #<\n    tls: {{mode: SIMPLE, credentialName: 'acme:le'}}\n"), "exact names only"),
        ("acme directory not https", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  acme:\n    issuers:\n    - name: le\n      directoryUrl: http://acme.test/dir #<\n".into(), "is not an https:// URL"),
        ("acme unknown challenge", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  acme:\n    issuers:\n    - name: le\n      directoryUrl: https://acme.test/dir\n      challenge: dns-01 #<\n".into(), "unknown challenge `dns-01`"),
        ("acme bad renewBefore", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  acme:\n    issuers:\n    - name: le\n      directoryUrl: https://acme.test/dir\n      renewBefore: soon #<\n".into(), "is not a duration"),
        ("acme duplicate issuer", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  acme:\n    issuers:\n    - {name: le, directoryUrl: 'https://a.test/dir'}\n    - name: le #<\n      directoryUrl: https://b.test/dir\n".into(), "issuer `le` is defined twice"),
        ("acme unknown issuer field", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  acme:\n    issuers:\n    - name: le\n      directoryUrl: https://acme.test/dir\n      emial: ops@example.com #<\n".into(), "unknown field `emial`"),
        ("tracing sampling over 100", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  tracing:\n    sampling: 150 #<\n    zipkin: {endpoint: 'http://z:9411/api/v2/spans'}\n".into(), "sampling 150 is a percentage"),
        ("tracing without a collector", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  tracing: #<\n    sampling: 5\n".into(), "exactly one collector"),
        ("tracing endpoint not a url", "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {name: s}\nspec:\n  tracing:\n    opentelemetry:\n      endpoint: otel:4318 #<\n".into(), "is not an http(s) URL"),
        ("wildcard in the middle", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts:\n    - 'a.*.com' #<\n".into(), "a wildcard must be the whole first label"),
    ]
}

fn expected_line(yaml: &str) -> usize {
    yaml.lines()
        .position(|l| l.contains("#<"))
        .map_or(1, |i| i + 1)
}

#[test]
fn each_broken_config_is_reported_with_its_file_and_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = cases();
    assert!(cases.len() >= 25, "the issue asks for at least 25 cases");
    let mut failures = Vec::new();
    for (i, (name, yaml, fragment)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&path, yaml)?;
        let output = validate(&[&path])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let prefix = format!("{}:{}:", path.display(), expected_line(yaml));
        let reported = stdout
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains(fragment) && !l.contains("warning:"));
        if output.status.code() != Some(1) || !reported {
            failures.push(format!(
                "{name}: expected exit 1 and a line starting `{prefix}` containing `{fragment}`; got {:?}:\n{stdout}",
                output.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn all_errors_of_all_files_are_reported_in_one_run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(&a, "apiVersion: networking.istio.io/v1\nkind: Gatewy\nmetadata: {name: x}\n---\nkind: [\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 0, protocol: HTTP}\n    hosts: [a]\n")?;
    std::fs::write(&b, "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw2}\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hostz: [a]\n")?;
    let output = validate(&[&a, &b])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    for fragment in [
        format!("{}:2:", a.display()),
        format!("{}:5:", a.display()),
        format!("{}:7:", b.display()),
    ] {
        assert!(
            stdout.contains(&fragment),
            "missing {fragment} in:\n{stdout}"
        );
    }
    assert_eq!(output.status.code(), Some(1));
    Ok(())
}

#[test]
fn a_valid_config_prints_a_summary_and_exits_0() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ok.yaml");
    std::fs::write(
        &path,
        vs("  - route: [{destination: {host: svc.test}}]\n") + ENTRY,
    )?;
    let output = validate(&[&path])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("OK: 1 file(s), 0 warning(s); 1 listener(s) on port(s) 8080"),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn a_header_match_in_upper_case_loads_with_a_warning() -> anyhow::Result<()> {
    // Istio accepts it and Envoy matches names case-insensitively; routing.rs shows it matching.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("upper.yaml");
    let yaml = vs("  - match:\n    - headers:\n        X-Env: {exact: a} #<\n    route: [{destination: {host: svc.test}}]\n") + ENTRY;
    std::fs::write(&path, &yaml)?;
    let output = validate(&[&path])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let expected = format!("{}:{}:", path.display(), expected_line(&yaml));
    assert!(
        stdout.lines().any(|l| l.starts_with(&expected)
            && l.contains("warning: ")
            && l.contains("header name `X-Env` is matched as `x-env`")),
        "{stdout}"
    );
    Ok(())
}

/// Hostile input is rejected quickly and without exhausting memory.
#[test]
fn hostile_inputs_are_rejected_in_under_a_second() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut bomb = String::from("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nstatus:\n  a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    let mut previous = 'a';
    for name in 'b'..='j' {
        let refs = vec![format!("*{previous}"); 9].join(",");
        bomb.push_str(&format!("  {name}: &{name} [{refs}]\n"));
        previous = name;
    }
    let deep = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nstatus: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let mut huge = String::from("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers: []\n");
    while huge.len() < 10 * 1024 * 1024 {
        huge.push_str(
            "# padding padding padding padding padding padding padding padding padding\n",
        );
    }
    for (name, text, fragment) in [
        ("alias-bomb.yaml", bomb, "repetition limit exceeded"),
        ("deep.yaml", deep, "nesting is deeper than 64 levels"),
        ("huge.yaml", huge, "over the 4194304-byte limit"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        let started = Instant::now();
        let output = validate(&[&path])?;
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "{name}: {stdout}");
        assert!(
            stdout.contains(&format!("{}:", path.display())) && stdout.contains(fragment),
            "{name}: {stdout}"
        );
        assert!(took < Duration::from_secs(1), "{name} took {took:?}");
    }
    Ok(())
}
