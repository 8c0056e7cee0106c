//! Istio-compatible metrics after known traffic: exact counters, labels and histogram counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use sluice_tests::*;

/// `name{labels} value` lines of a Prometheus text exposition, labels as a sorted map.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value))
        })
        .collect()
}

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
    let closed = free_port();
    let mut yaml = gateway_yaml(port, &["*"]);
    yaml += &reviews_subsets_yaml(echo("v1").await?, echo("v2").await?);
    yaml += &service_entry_yaml(
        "dead",
        "dead.svc",
        &[(SocketAddr::from(([127, 0, 0, 1], closed)), "version: v1")],
    );
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
        let text = client()
            .get(gw.admin_url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let all = samples(&text);
        if value(&all, "istio_requests_total", &uf) == Some(1.0) || started.elapsed().as_secs() > 2
        {
            break (text, all);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
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
