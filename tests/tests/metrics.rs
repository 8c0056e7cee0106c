//! Istio-compatible metrics after known traffic: exact counters, labels and histogram counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::*;

/// The value of the one sample of `name` whose labels include all of `want`.
fn value(
    all: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    want: &[(&str, &str)],
) -> Option<f64> {
    let found: Vec<f64> = all
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    match found.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

#[tokio::test]
async fn request_metrics_use_istio_names_labels_and_buckets() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &reviews_subsets_yaml(echo("v1").await?, echo("v2").await?);
    yaml += &service_entry_yaml("dead", "dead.svc", &[(refusing_address(), "version: v1")]);
    yaml += "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dead}\nspec:\n  host: dead.svc\n  subsets: [{name: none, labels: {version: v9}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: m}\nspec:\n  hosts: [m.test]\n  gateways: [gw]\n  http:\n\
             \x20 - match: [{uri: {prefix: /refused}}]\n    route: [{destination: {host: dead.svc}}]\n\
             \x20 - match: [{uri: {prefix: /empty}}]\n    route: [{destination: {host: dead.svc, subset: none}}]\n\
             \x20 - match: [{uri: {prefix: /v1}}]\n    route: [{destination: {host: reviews, subset: v1}}]\n";
    let gw = TestGateway::start(&yaml, &[port])?;
    for _ in 0..3 {
        assert_eq!(get(port, "m.test", "/v1").await?.status, 200);
    }
    assert_eq!(get(port, "m.test", "/nothing").await?.status, 404);
    for _ in 0..2 {
        assert_eq!(get(port, "m.test", "/empty").await?.status, 503);
    }
    assert_eq!(get(port, "m.test", "/refused").await?.status, 503);
    // Metrics are recorded in the logging phase, after the response was sent: let the last request
    // land before reading them.
    let uf = [
        ("response_flags", "UF"),
        ("destination_service", "dead.svc"),
    ];
    let started = std::time::Instant::now();
    let (text, all) = loop {
        let text = gw.metrics().await?;
        let all = samples(&text);
        if value(&all, "istio_requests_total", &uf) == Some(1.0) || started.elapsed().as_secs() > 2
        {
            break (text, all);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // Endpoints per destination, as of the scrape: the empty subset is the one answering 503 UH.
    for (service, version, count) in [
        ("reviews.default.svc.cluster.local", "v1", 1.0),
        ("dead.svc", "unknown", 1.0),
        ("dead.svc", "none", 0.0),
    ] {
        let labels = [
            ("destination_service", service),
            ("destination_port", "80"),
            ("destination_version", version),
        ];
        assert_eq!(
            value(&all, "sluice_upstream_endpoints_healthy", &labels),
            Some(count),
            "{service} {version}"
        );
    }
    let v1 = [
        ("reporter", "source"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "none"),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("destination_version", "v1"),
    ];
    assert_eq!(
        value(&all, "istio_requests_total", &v1),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&all, "istio_request_duration_milliseconds_count", &v1),
        Some(3.0)
    );
    let mut inf = v1.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(
        value(&all, "istio_request_duration_milliseconds_bucket", &inf),
        Some(3.0)
    );
    let mut small = v1.to_vec();
    small.push(("le", "100"));
    assert_eq!(
        value(&all, "istio_response_bytes_bucket", &small),
        Some(0.0),
        "responses are over 100 bytes"
    );
    assert_eq!(value(&all, "istio_response_bytes_count", &v1), Some(3.0));
    assert_eq!(
        value(
            &all,
            "istio_requests_total",
            &[
                ("response_code", "404"),
                ("response_flags", "NR"),
                ("destination_service", "unknown")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &all,
            "istio_requests_total",
            &[
                ("response_code", "503"),
                ("response_flags", "UH"),
                ("destination_version", "none")
            ]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &all,
            "istio_requests_total",
            &[
                ("response_code", "503"),
                ("response_flags", "UF"),
                ("destination_service", "dead.svc")
            ]
        ),
        Some(1.0)
    );
    // Prometheus's own checker accepts the exposition.
    let check = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    if let Ok(mut child) = check {
        use tokio::io::AsyncWriteExt;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(text.as_bytes()).await?;
        }
        let output = child.wait_with_output().await?;
        // The only finding allowed is the naming lint on Istio's own metric name, which dashboards
        // depend on; a parse error or any other lint fails the test.
        let report = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        let unexpected: Vec<&str> = report
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                !l.contains("istio_request_duration_milliseconds use base unit \"seconds\"")
            })
            .collect();
        assert!(unexpected.is_empty(), "promtool: {report}");
    } else {
        anyhow::bail!(
            "promtool is not installed (scripts/setup installs the `prometheus` package)"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_access_log_writes_one_line_per_request() -> anyhow::Result<()> {
    let port = free_port();
    let upstream = echo("app").await?;
    let log_dir = tempfile::tempdir()?;
    let json_log = log_dir.path().join("access.json");
    let yaml = gateway_yaml(port, &["*"]).replace(
        "  threads: 1\n",
        &format!("  threads: 1\n  accessLog: {{path: {}}}\n", json_log.display()),
    ) + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app}\nspec:\n  hosts: [log.test]\n  gateways: [gw]\n  http:\n\
           \x20 - match: [{uri: {prefix: /app}}]\n    route: [{destination: {host: app.svc}}]\n";
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = send(
        client()
            .get(format!("http://127.0.0.1:{port}/app/x?y=1"))
            .header("host", "log.test")
            .header("x-request-id", "req-42")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
    )
    .await?;
    assert_eq!(r.status, 200);
    assert_eq!(get(port, "log.test", "/missing").await?.status, 404);
    // Lines are written off the request path: wait for both.
    let started = std::time::Instant::now();
    let lines = loop {
        let text = std::fs::read_to_string(&json_log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 2 || started.elapsed().as_secs() > 3 {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first = &lines[0];
    for (field, expected) in [
        ("method", serde_json::json!("GET")),
        ("authority", serde_json::json!("log.test")),
        ("path", serde_json::json!("/app/x?y=1")),
        ("protocol", serde_json::json!("HTTP/1.1")),
        ("status", serde_json::json!(200)),
        ("response_flags", serde_json::json!("-")),
        ("client_address", serde_json::json!("127.0.0.1")),
        ("upstream_address", serde_json::json!(upstream.to_string())),
        ("route", serde_json::json!("default/app http[0]")),
        ("destination", serde_json::json!("app.svc:80")),
        ("request_id", serde_json::json!("req-42")),
        (
            "trace_id",
            serde_json::json!("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
    ] {
        assert_eq!(first[field], expected, "{field} in {first}");
    }
    assert!(first["bytes_sent"].as_u64().unwrap_or(0) > 100, "{first}");
    assert!(
        first["start_time"].as_str().unwrap_or("").ends_with('Z'),
        "{first}"
    );
    assert!(first["duration_ms"].as_f64().is_some(), "{first}");
    let second = &lines[1];
    assert_eq!(
        (second["status"].as_u64(), second["response_flags"].as_str()),
        (Some(404), Some("NR"))
    );
    assert!(
        second["upstream_address"].is_null() && second["request_id"].as_str().is_some(),
        "{second}"
    );
    Ok(())
}

#[tokio::test]
async fn access_log_format_strings_fill_fields_and_typos_are_errors() -> anyhow::Result<()> {
    let port = free_port();
    let log_dir = tempfile::tempdir()?;
    let log = log_dir.path().join("access.log");
    let settings = |format: &str| {
        gateway_yaml(port, &["*"]).replace(
            "  threads: 1\n",
            &format!("  threads: 1\n  accessLog: {{path: {}, format: '{format}'}}\n", log.display()),
        ) + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: d}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - directResponse: {status: 204}\n"
    };
    // A misspelt field is a validation error, not an empty column.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, settings("%METHOD% %STATSU%"))?;
    let output = validate(&[&bad])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("unknown field `%STATSU%`"), "{stdout}");

    let _gw = TestGateway::start(
        &settings("%METHOD% %PATH% %STATUS% %RESPONSE_FLAGS% %UPSTREAM_ADDRESS%"),
        &[port],
    )?;
    assert_eq!(get(port, "f.test", "/fmt").await?.status, 204);
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 1 {
            assert_eq!(text.lines().next(), Some("GET /fmt 204 - -"));
            break;
        }
        anyhow::ensure!(started.elapsed().as_secs() < 3, "no access log line");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Runs a query against Prometheus's HTTP API and returns the result vector.
async fn query(prometheus: u16, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let body: serde_json::Value = client()
        .get(format!("http://127.0.0.1:{prometheus}/api/v1/query"))
        .query(&[("query", promql)])
        .send()
        .await?
        .json()
        .await?;
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn sample_value(result: &serde_json::Value) -> f64 {
    result["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn a_real_prometheus_evaluates_istios_queries() -> anyhow::Result<()> {
    let port = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &reviews_subsets_yaml(echo("v1").await?, echo("v2").await?);
    yaml += &service_entry_yaml("dead", "dead.svc", &[(refusing_address(), "")]);
    yaml += "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: p}\nspec:\n  hosts: [p.test]\n  gateways: [gw]\n  http:\n\
             \x20 - match: [{uri: {prefix: /bad}}]\n    route: [{destination: {host: dead.svc}}]\n\
             \x20 - route:\n    - {destination: {host: reviews, subset: v1}, weight: 50}\n    - {destination: {host: reviews, subset: v2}, weight: 50}\n";
    let gw = TestGateway::start(&yaml, &[port])?;
    // Every series exists before Prometheus's first scrape: `rate` only counts increases between
    // samples, so a series born between two scrapes would lose its first requests and tilt the ratio.
    let mut versions = std::collections::HashSet::new();
    for _ in 0..64 {
        let response = get(port, "p.test", "/").await?;
        assert_eq!(response.status, 200);
        versions.insert(response.backend().to_string());
        if versions.len() == 2 {
            break;
        }
    }
    assert_eq!(versions.len(), 2, "both subsets answered: {versions:?}");
    assert_eq!(get(port, "p.test", "/bad").await?.status, 503);

    let prometheus_port = free_port();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n- job_name: sluice\n  static_configs: [{{targets: ['127.0.0.1:{}']}}]\n",
            gw.admin_port
        ),
    )?;
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run prometheus ({e}); scripts/setup installs it"))?;
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], prometheus_port)),
        std::time::Duration::from_secs(20),
    )?;

    // Known traffic for 6 s: four good requests (split over v1 and v2) to one failing.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(6);
    let (mut good, mut bad) = (0, 0);
    while std::time::Instant::now() < until {
        for _ in 0..4 {
            assert_eq!(get(port, "p.test", "/").await?.status, 200);
            good += 1;
        }
        assert_eq!(get(port, "p.test", "/bad").await?.status, 503);
        bad += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Let at least two scrapes see the final counts (a loaded machine scrapes late: poll, bounded).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let expected = good as f64 / (good + bad) as f64;
    let promql = "sum(rate(istio_requests_total{response_code!~\"5.*\"}[1m])) / sum(rate(istio_requests_total[1m]))";
    let waited = std::time::Instant::now();
    let mut rate = f64::NAN;
    while waited.elapsed() < std::time::Duration::from_secs(15) {
        let success = query(prometheus_port, promql).await?;
        rate = success.first().map(sample_value).unwrap_or(f64::NAN);
        if (rate - expected).abs() < 0.05 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        (rate - expected).abs() < 0.05,
        "success rate {rate}, expected about {expected} ({good} good, {bad} bad)"
    );

    // A quantile is NaN while a version's buckets show no increase yet (a late scrape): poll.
    let p99_query = "histogram_quantile(0.99, sum by (le, destination_version) (rate(istio_request_duration_milliseconds_bucket{response_code=\"200\"}[1m])))";
    let waited = std::time::Instant::now();
    let (p99, versions) = loop {
        let p99 = query(prometheus_port, p99_query).await?;
        let mut versions: Vec<(String, f64)> = p99
            .iter()
            .map(|r| {
                (
                    r["metric"]["destination_version"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    sample_value(r),
                )
            })
            .collect();
        versions.sort_by(|a, b| a.0.cmp(&b.0));
        let settled = versions.len() == 2 && versions.iter().all(|(_, ms)| ms.is_finite());
        if settled || waited.elapsed() > std::time::Duration::from_secs(15) {
            break (p99, versions);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(
        versions.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(),
        ["v1", "v2"],
        "{p99:?}"
    );
    // Loopback upstreams answer in well under 100 ms; the quantile lands inside Istio's buckets.
    assert!(
        versions.iter().all(|(_, ms)| *ms > 0.0 && *ms <= 100.0),
        "{versions:?}"
    );
    let _ = prometheus.kill().await;
    Ok(())
}

/// The `tls` block of a terminating server with the given certificate files.
fn simple_tls(crt: &Path, key: &Path) -> String {
    format!(
        "{{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}",
        crt.display(),
        key.display()
    )
}

/// The certificate's not-after time, as Unix seconds, read independently of Sluice.
fn not_after(pem: &Path) -> anyhow::Result<f64> {
    let text = std::fs::read(pem)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text)?;
    let cert = pem.parse_x509()?;
    Ok(cert.validity().not_after.timestamp() as f64)
}

async fn scrape(gw: &TestGateway) -> anyhow::Result<Vec<(String, BTreeMap<String, String>, f64)>> {
    let text = gw.metrics().await?;
    Ok(samples(&text))
}

#[tokio::test]
async fn certificate_expiry_is_exported_per_host_and_follows_reloads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("ca")?;
    let (a_crt, a_key) = pki.leaf("a", "ca", &["DNS:a.test"], KeyType::Ecdsa, false)?;
    let (b_crt, b_key) = pki.leaf("b", "ca", &["DNS:*.b.test"], KeyType::Rsa, false)?;
    let port = free_port();
    let server =
        |hosts: &str, crt: &Path, key: &Path| https_server(port, hosts, &simple_tls(crt, key));
    let config = gateway_with_servers;
    let both = server("a.test, a2.test", &a_crt, &a_key) + &server("\"*.b.test\"", &b_crt, &b_key);
    let gw = TestGateway::start(&config(&both), &[port])?;
    let metric = "sluice_certificate_not_after_seconds";
    let port_label = port.to_string();
    let all = scrape(&gw).await?;
    for (host, crt) in [
        ("a.test", &a_crt),
        ("a2.test", &a_crt),
        ("*.b.test", &b_crt),
    ] {
        assert_eq!(
            value(&all, metric, &[("host", host), ("port", &port_label)]),
            Some(not_after(crt)?),
            "{host}"
        );
    }

    // A host removed from the config stops being reported.
    gw.write_config(&config(&server("a.test", &a_crt, &a_key)))?;
    gw.wait_for_status(std::time::Duration::from_secs(5), |s| s["generation"] == 2)
        .await?;
    let all = scrape(&gw).await?;
    assert_eq!(
        value(&all, metric, &[("host", "a.test")]),
        Some(not_after(&a_crt)?)
    );
    assert_eq!(value(&all, metric, &[("host", "*.b.test")]), None);
    assert_eq!(value(&all, metric, &[("host", "a2.test")]), None);
    Ok(())
}

/// Waits until the metrics satisfy `done` (metrics of a closing connection land asynchronously).
async fn scrape_until(
    gw: &TestGateway,
    done: impl Fn(&[(String, BTreeMap<String, String>, f64)]) -> bool,
) -> anyhow::Result<Vec<(String, BTreeMap<String, String>, f64)>> {
    let started = Instant::now();
    loop {
        let all = scrape(gw).await?;
        if done(&all) || started.elapsed() > Duration::from_secs(3) {
            return Ok(all);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tls_handshakes_failures_and_open_connections_are_counted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let ca = pki.ca("ca")?;
    let stranger_ca = pki.ca("stranger")?;
    let (crt, key) = pki.leaf("a", "ca", &["DNS:a.test"], KeyType::Ecdsa, false)?;
    let port = free_port();
    let gw = TestGateway::start(
        &gateway_with_servers(&https_server(port, "a.test", &simple_tls(&crt, &key))),
        &[port],
    )?;
    let label = port.to_string();
    let url = format!("https://a.test:{port}/");
    // Each client is a new connection, so a new handshake. No route: 404 after the handshake.
    for _ in 0..2 {
        let trusting = tls_client(&ca, &["a.test"], port)?.build()?;
        assert_eq!(trusting.get(&url).send().await?.status(), 404);
    }
    let unknown = tls_client(&ca, &["b.test"], port)?.build()?;
    assert!(unknown
        .get(format!("https://b.test:{port}/"))
        .send()
        .await
        .is_err());
    let distrusting = tls_client(&stranger_ca, &["a.test"], port)?.build()?;
    assert!(distrusting.get(&url).send().await.is_err());
    for _ in 0..3 {
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await?;
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut rest).await?;
    }
    let failures = |reason: &'static str| [("port", label.as_str()), ("reason", reason)];
    let all = scrape_until(&gw, |all| {
        value(
            all,
            "sluice_tls_handshake_failures_total",
            &failures("handshake_error"),
        ) == Some(1.0)
    })
    .await?;
    assert_eq!(
        value(&all, "sluice_tls_handshakes_total", &[("port", &label)]),
        Some(2.0)
    );
    for (reason, count) in [
        ("unknown_server_name", 1.0),
        ("handshake_error", 1.0),
        ("malformed_client_hello", 3.0),
        // The harness's readiness probe connects and closes.
        ("closed_before_client_hello", 1.0),
        ("timeout", 0.0),
    ] {
        assert_eq!(
            value(
                &all,
                "sluice_tls_handshake_failures_total",
                &failures(reason)
            ),
            Some(count),
            "{reason}"
        );
    }

    // Connections count as open from accept to close, handshake or not.
    let active = |all: &[(String, BTreeMap<String, String>, f64)]| {
        value(
            all,
            "sluice_downstream_connections_active",
            &[("port", &label)],
        )
    };
    let all = scrape_until(&gw, |all| active(all) == Some(0.0)).await?;
    assert_eq!(active(&all), Some(0.0));
    let held: Vec<_> = idle_connections(port, 3).await?;
    let all = scrape_until(&gw, |all| active(all) == Some(3.0)).await?;
    assert_eq!(active(&all), Some(3.0));
    drop(held);
    let all = scrape_until(&gw, |all| active(all) == Some(0.0)).await?;
    assert_eq!(active(&all), Some(0.0));
    Ok(())
}

/// `count` idle TCP connections to `port`.
async fn idle_connections(port: u16, count: usize) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    let mut held = Vec::new();
    for _ in 0..count {
        held.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
    }
    Ok(held)
}
