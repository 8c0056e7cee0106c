//! PROXY protocol behind a real L4 balancer: haproxy (TCP mode, `send-proxy-v2` and `send-proxy`) in
//! front of Sluice. Clients connect from 127.0.0.2/127.0.0.3 so that the address the backend sees
//! can be told apart from haproxy's own (127.0.0.1).

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts haproxy with a v2 frontend on `v2_port` and a v1 frontend on `v1_port`, both to `sluice`.
fn haproxy(
    dir: &std::path::Path,
    v2_port: u16,
    v1_port: u16,
    sluice: u16,
) -> anyhow::Result<Haproxy> {
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend v2\n  bind 127.0.0.1:{v2_port}\n  default_backend sluice_v2\n\
             backend sluice_v2\n  server s1 127.0.0.1:{sluice} send-proxy-v2\n\
             frontend v1\n  bind 127.0.0.1:{v1_port}\n  default_backend sluice_v1\n\
             backend sluice_v1\n  server s1 127.0.0.1:{sluice} send-proxy\n"
        ),
    )?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run haproxy ({e}); scripts/setup installs it"))?;
    let proxy = Haproxy(child);
    for port in [v2_port, v1_port] {
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        )?;
    }
    Ok(proxy)
}

fn client_from(ip: [u8; 4]) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(IpAddr::from(ip))
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Sends `bytes` from `from` straight to Sluice and returns what came back before the close.
async fn raw(from: [u8; 4], port: u16, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let mut stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    stream.write_all(bytes).await?;
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await?;
    // A reset is as much a refusal as a clean close.
    if read.is_err() && answer.is_empty() {
        return Ok(Vec::new());
    }
    Ok(answer)
}

#[tokio::test]
async fn the_client_address_from_haproxy_reaches_the_backend_and_strangers_are_refused(
) -> anyhow::Result<()> {
    let port = free_port();
    let upstream = echo("app").await?;
    let yaml = gateway_yaml(port, &["*"]).replace(
        "  threads: 1\n",
        "  threads: 1\n  proxyProtocol:\n    trustedCidrs: [127.0.0.1/32]\n",
    ) + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app}\n\
           spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.svc}}]\n";
    let gw = TestGateway::start(&yaml, &[port])?;
    let (v2_port, v1_port) = (free_port(), free_port());
    let _haproxy = haproxy(gw.dir.path(), v2_port, v1_port, port)?;

    // Through haproxy, PROXY v2 and v1: the backend sees the original client, 127.0.0.2.
    let client = client_from([127, 0, 0, 2])?;
    for (version, via) in [("v2", v2_port), ("v1", v1_port)] {
        for _ in 0..3 {
            let r = send(
                client
                    .get(format!("http://127.0.0.1:{via}/"))
                    .header("host", "app.test"),
            )
            .await?;
            assert_eq!(r.status, 200, "{version}: {r:?}");
            assert_eq!(
                r.request_header("x-forwarded-for"),
                Some("127.0.0.2"),
                "{version}: {r:?}"
            );
        }
    }

    // A client's own X-Forwarded-For is appended to, never taken as the client address.
    let r = send(
        client
            .get(format!("http://127.0.0.1:{v2_port}/"))
            .header("host", "app.test")
            .header("x-forwarded-for", "198.51.100.7"),
    )
    .await?;
    assert_eq!(
        r.request_header("x-forwarded-for"),
        Some("198.51.100.7, 127.0.0.2")
    );

    // An untrusted source may connect directly without a header…
    let direct = client_from([127, 0, 0, 3])?;
    let r = send(
        direct
            .get(format!("http://127.0.0.1:{port}/"))
            .header("host", "app.test"),
    )
    .await?;
    assert_eq!(r.request_header("x-forwarded-for"), Some("127.0.0.3"));

    // …but a PROXY header from it is refused: the connection closes without an HTTP answer.
    let request = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
    let mut spoofed = b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 80\r\n".to_vec();
    spoofed.extend_from_slice(request);
    assert!(
        raw([127, 0, 0, 3], port, &spoofed).await?.is_empty(),
        "untrusted PROXY header was served"
    );

    // A trusted source must send a header (allowWithoutHeader is off)…
    assert!(
        raw([127, 0, 0, 1], port, request).await?.is_empty(),
        "trusted source served without a header"
    );

    // …and a malformed one closes the connection too.
    let mut malformed = b"PROXY TCP4 not-an-address 127.0.0.1 4000 80\r\n".to_vec();
    malformed.extend_from_slice(request);
    assert!(
        raw([127, 0, 0, 1], port, &malformed).await?.is_empty(),
        "malformed header was served"
    );

    // A well-formed header from the trusted source is believed.
    let mut honest = b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 80\r\n".to_vec();
    honest.extend_from_slice(request);
    let answer = String::from_utf8_lossy(&raw([127, 0, 0, 1], port, &honest).await?).into_owned();
    assert!(
        answer.contains("\"x-forwarded-for\":\"203.0.113.9\""),
        "{answer}"
    );
    Ok(())
}

#[tokio::test]
async fn allow_without_header_lets_trusted_sources_connect_directly() -> anyhow::Result<()> {
    let port = free_port();
    let yaml = gateway_yaml(port, &["*"]).replace(
        "  threads: 1\n",
        "  threads: 1\n  proxyProtocol:\n    trustedCidrs: [127.0.0.1/32]\n    allowWithoutHeader: true\n",
    ) + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: d}\n\
         spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - directResponse: {status: 200, body: {string: ok}}\n";
    let _gw = TestGateway::start(&yaml, &[port])?;
    let answer = raw(
        [127, 0, 0, 1],
        port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    Ok(())
}

#[tokio::test]
async fn num_trusted_proxies_takes_the_client_from_forwarded_for() -> anyhow::Result<()> {
    let port = free_port();
    let upstream = echo("app").await?;
    let route = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app}\n\
                 spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.svc}}]\n";
    let yaml = gateway_yaml(port, &["*"])
        .replace("  threads: 1\n", "  threads: 1\n  numTrustedProxies: 1\n")
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + route;
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = send(
        client()
            .get(format!("http://127.0.0.1:{port}/"))
            .header("host", "app.test")
            .header("x-forwarded-for", "203.0.113.1, 198.51.100.7"),
    )
    .await?;
    assert_eq!(
        r.request_header("x-envoy-external-address"),
        Some("198.51.100.7")
    );
    assert_eq!(
        r.request_header("x-forwarded-for"),
        Some("203.0.113.1, 198.51.100.7, 127.0.0.1")
    );

    // Without numTrustedProxies the header is not believed.
    let port = free_port();
    let upstream = echo("app").await?;
    let yaml = gateway_yaml(port, &["*"])
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + route;
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = send(
        client()
            .get(format!("http://127.0.0.1:{port}/"))
            .header("host", "app.test")
            .header("x-forwarded-for", "198.51.100.7"),
    )
    .await?;
    assert_eq!(
        r.request_header("x-envoy-external-address"),
        Some("127.0.0.1")
    );
    Ok(())
}

#[tokio::test]
async fn the_client_address_survives_haproxy_in_front_of_https() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("ca")?;
    let (crt, key) = pki.leaf("edge", "ca", &["DNS:secure.test"], KeyType::Ecdsa, false)?;
    let port = free_port();
    let upstream = echo("app").await?;
    let yaml = settings_yaml("  proxyProtocol:\n    trustedCidrs: [127.0.0.1/32]\n")
        + &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n\
             \x20 - port: {{number: {port}, name: https, protocol: HTTPS}}\n    hosts: [secure.test]\n\
             \x20   tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}\n",
            crt.display(),
            key.display()
        )
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app}\n\
           spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.svc}}]\n";
    let gw = TestGateway::start(&yaml, &[port])?;
    let (v2_port, v1_port) = (free_port(), free_port());
    let _haproxy = haproxy(gw.dir.path(), v2_port, v1_port, port)?;
    for (version, via) in [("v2", v2_port), ("v1", v1_port)] {
        let client = tls_client(&pki.dir.join("ca.crt"), &["secure.test"], via)?
            .local_address(IpAddr::from([127, 0, 0, 2]))
            .build()?;
        let r = send(client.get(format!("https://secure.test:{via}/"))).await?;
        assert_eq!(r.status, 200, "{version}: {r:?}");
        assert_eq!(
            r.request_header("x-forwarded-for"),
            Some("127.0.0.2"),
            "{version}"
        );
        assert_eq!(
            r.request_header("x-forwarded-proto"),
            Some("https"),
            "{version}"
        );
    }
    Ok(())
}
