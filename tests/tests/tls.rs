//! TLS at the edge with real clients (rustls through reqwest, and openssl s_client): certificates by
//! SNI (exact over wildcard, ECDSA and RSA, full chains), no/unknown SNI, ALPN h2, protocol
//! versions, httpsRedirect, mutual TLS, passthrough, TCP routes and certificate hot swap.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_tests::*;

const ROUTE_ALL: &str = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app}\n\
    spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.svc}}]\n";

/// A gateway with `servers`, whose every host routes to an echo upstream `app`.
async fn app_behind(servers: &str) -> anyhow::Result<String> {
    let upstream = echo("app").await?;
    Ok(gateway_with_servers(servers)
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + ROUTE_ALL)
}

async fn status_of(builder: reqwest::ClientBuilder, url: &str) -> Result<u16, String> {
    let client = builder.build().map_err(|e| e.to_string())?;
    client
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn certificates_are_chosen_by_sni() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    for ca in ["ca-a", "ca-b", "ca-wild", "ca-exact"] {
        pki.ca(ca)?;
    }
    let (a_crt, a_key) = pki.leaf("a", "ca-a", &["DNS:a.test"], KeyType::Ecdsa, false)?;
    let (b_crt, b_key) = pki.leaf("b", "ca-b", &["DNS:b.test"], KeyType::Rsa, false)?;
    let (w_crt, w_key) = pki.leaf("wild", "ca-wild", &["DNS:*.wild.test"], KeyType::Rsa, false)?;
    let (x_crt, x_key) = pki.leaf(
        "exact",
        "ca-exact",
        &["DNS:x.wild.test"],
        KeyType::Ecdsa,
        false,
    )?;
    let port = free_port();
    let upstream = echo("app").await?;
    let file = |c: &Path, k: &Path| {
        format!(
            "{{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}",
            c.display(),
            k.display()
        )
    };
    let servers = https_server(port, "a.test", &file(&a_crt, &a_key))
        + &https_server(port, "b.test", &file(&b_crt, &b_key))
        + &https_server(port, "\"*.wild.test\"", &file(&w_crt, &w_key))
        + &https_server(port, "x.wild.test", &file(&x_crt, &x_key));
    let yaml = gateway_with_servers(&servers)
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + ROUTE_ALL;
    let _gw = TestGateway::start(&yaml, &[port])?;
    let ca = |name: &str| pki.dir.join(format!("{name}.crt"));
    let hosts = ["a.test", "b.test", "y.wild.test", "x.wild.test"];
    // Each name verifies against its own CA only: the server presented that name's certificate.
    for (host, right, wrong) in [
        ("a.test", "ca-a", "ca-b"),
        ("b.test", "ca-b", "ca-a"),
        ("y.wild.test", "ca-wild", "ca-exact"),
        ("x.wild.test", "ca-exact", "ca-wild"), // exact beats wildcard
    ] {
        let url = format!("https://{host}:{port}/");
        assert_eq!(
            status_of(tls_client(&ca(right), &hosts, port)?, &url).await,
            Ok(200),
            "{host}"
        );
        assert!(
            status_of(tls_client(&ca(wrong), &hosts, port)?, &url)
                .await
                .is_err(),
            "{host} verified with {wrong}"
        );
    }
    // ALPN: h2 is negotiated and used; the backend sees https.
    let client = tls_client(&ca("ca-a"), &hosts, port)?.build()?;
    let response = client
        .get(format!("https://a.test:{port}/h2"))
        .send()
        .await?;
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    // HTTP/1.1 still works for clients that only offer it.
    let h1 = tls_client(&ca("ca-a"), &hosts, port)?
        .http1_only()
        .build()?;
    assert_eq!(
        h1.get(format!("https://a.test:{port}/"))
            .send()
            .await?
            .version(),
        reqwest::Version::HTTP_11
    );

    // Without SNI (an IP address) or with an unknown name, and no `*` server: refused with an alert.
    let no_sni = tls_client(&ca("ca-a"), &[], port)?.danger_accept_invalid_certs(true);
    assert!(status_of(no_sni, &format!("https://127.0.0.1:{port}/"))
        .await
        .is_err());
    let s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "unknown.test",
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&s_client.stderr).into_owned()
        + &String::from_utf8_lossy(&s_client.stdout);
    assert!(text.contains("alert"), "expected a TLS alert, got:\n{text}");

    // curl, as an operator would check it: the right certificate, over HTTP/2.
    // Async: the echo upstream runs on this test's runtime and must keep answering meanwhile.
    let curl = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--cacert",
        ])
        .arg(ca("ca-b"))
        .args([
            "--resolve",
            &format!("b.test:{port}:127.0.0.1"),
            &format!("https://b.test:{port}/"),
        ])
        .output()
        .await?;
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "200 2",
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn a_catch_all_server_answers_clients_without_sni() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("ca")?;
    pki.leaf(
        "default",
        "ca",
        &["DNS:default.test", "IP:127.0.0.1"],
        KeyType::Ecdsa,
        false,
    )?;
    // credentialName in the Kubernetes-secret layout: certsDir/NAME/tls.crt + tls.key.
    let port = free_port();
    let yaml = app_behind(&https_server(
        port,
        "\"*\"",
        "{mode: SIMPLE, credentialName: fallback}",
    ))
    .await?;
    let gw_dir = tempfile::tempdir()?;
    let secret = gw_dir.path().join("certs/fallback");
    std::fs::create_dir_all(&secret)?;
    pki.copy_pair("default", &secret.join("tls.crt"), &secret.join("tls.key"))?;
    let _gw = TestGateway::start_in(gw_dir, &yaml, &[port])?;
    let ca = pki.dir.join("ca.crt");
    assert_eq!(
        status_of(
            tls_client(&ca, &[], port)?,
            &format!("https://127.0.0.1:{port}/")
        )
        .await,
        Ok(200)
    );
    assert_eq!(
        status_of(
            tls_client(&ca, &["anything.test"], port)?.danger_accept_invalid_hostnames(true),
            &format!("https://anything.test:{port}/")
        )
        .await,
        Ok(200)
    );
    Ok(())
}

#[tokio::test]
async fn protocol_versions_are_enforced() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("ca")?;
    let (crt, key) = pki.leaf(
        "v",
        "ca",
        &["DNS:v12.test", "DNS:v13.test"],
        KeyType::Ecdsa,
        false,
    )?;
    let port = free_port();
    let upstream = echo("app").await?;
    let files = format!(
        "serverCertificate: {}, privateKey: {}",
        crt.display(),
        key.display()
    );
    let servers = https_server(port, "v12.test", &format!("{{mode: SIMPLE, {files}}}"))
        + &https_server(
            port,
            "v13.test",
            &format!("{{mode: SIMPLE, minProtocolVersion: TLSV1_3, {files}}}"),
        );
    let yaml = gateway_with_servers(&servers)
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + ROUTE_ALL;
    let _gw = TestGateway::start(&yaml, &[port])?;
    let ca = pki.dir.join("ca.crt");
    let hosts = ["v12.test", "v13.test"];
    let tls12_only = || -> anyhow::Result<reqwest::ClientBuilder> {
        Ok(tls_client(&ca, &hosts, port)?.max_tls_version(reqwest::tls::Version::TLS_1_2))
    };
    assert_eq!(
        status_of(tls12_only()?, &format!("https://v12.test:{port}/")).await,
        Ok(200)
    );
    assert!(
        status_of(tls12_only()?, &format!("https://v13.test:{port}/"))
            .await
            .is_err(),
        "TLS 1.2 client accepted by a TLSV1_3 server"
    );
    assert_eq!(
        status_of(
            tls_client(&ca, &hosts, port)?,
            &format!("https://v13.test:{port}/")
        )
        .await,
        Ok(200)
    );
    // TLS 1.1 is refused everywhere.
    let s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "v12.test",
            "-tls1_1",
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    let out = String::from_utf8_lossy(&s_client.stdout);
    assert!(
        out.contains("Cipher is (NONE)") || !s_client.status.success(),
        "TLS 1.1 handshake succeeded:\n{out}"
    );
    Ok(())
}

#[tokio::test]
async fn https_redirect_answers_301_to_the_https_url() -> anyhow::Result<()> {
    let port = free_port();
    let yaml = gateway_with_servers(&format!(
        "  - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [shop.test]\n    tls: {{httpsRedirect: true}}\n"
    ));
    let _gw = TestGateway::start(&yaml, &[port])?;
    let r = get(port, "shop.test", "/cart?item=3").await?;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://shop.test/cart?item=3");
    Ok(())
}

#[tokio::test]
async fn https_redirect_wins_over_the_routes_bound_to_the_redirecting_server() -> anyhow::Result<()>
{
    // As in Istio, every host a redirecting server serves requires TLS, however specifically a
    // VirtualService names it; another Gateway's plaintext server on the port serves its own.
    let port = free_port();
    let backend = echo("app").await?;
    let mut yaml = gateway_with_servers(&format!(
        "  - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n    \
         tls: {{httpsRedirect: true}}\n"
    ));
    yaml += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw-api}}\nspec:\n  \
         servers:\n  - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [api.test]\n"
    );
    yaml += &service_entry_yaml("app", "app.svc", &[(backend, "")]);
    for (host, gateway) in [("shop.test", "gw"), ("api.test", "gw-api")] {
        yaml += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}}}\n\
             spec:\n  hosts: [{host}]\n  gateways: [{gateway}]\n  http:\n  \
             - route: [{{destination: {{host: app.svc}}}}]\n"
        );
    }
    let _gw = TestGateway::start(&yaml, &[port])?;
    for (host, status) in [("shop.test", 301), ("other.test", 301), ("api.test", 200)] {
        let r = get(port, host, "/p").await?;
        assert_eq!(r.status, status, "{host}: {:?}", r.body);
        if status == 301 {
            assert_eq!(r.headers["location"], format!("https://{host}/p"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn mutual_tls_verifies_clients_and_forwards_their_identity() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("server-ca")?;
    let client_ca = pki.ca("client-ca")?;
    pki.ca("other-ca")?;
    let (crt, key) = pki.leaf(
        "m",
        "server-ca",
        &["DNS:mtls.test", "DNS:optional.test"],
        KeyType::Ecdsa,
        false,
    )?;
    let (client_crt, client_key) = pki.leaf(
        "alice",
        "client-ca",
        &["URI:spiffe://example/alice", "DNS:alice.test"],
        KeyType::Ecdsa,
        true,
    )?;
    let (stranger_crt, stranger_key) = pki.leaf(
        "mallory",
        "other-ca",
        &["DNS:mallory.test"],
        KeyType::Ecdsa,
        true,
    )?;
    let port = free_port();
    let upstream = echo("app").await?;
    let files = format!(
        "serverCertificate: {}, privateKey: {}, caCertificates: {}",
        crt.display(),
        key.display(),
        client_ca.display()
    );
    let servers = https_server(port, "mtls.test", &format!("{{mode: MUTUAL, {files}}}"))
        + &https_server(
            port,
            "optional.test",
            &format!("{{mode: OPTIONAL_MUTUAL, {files}}}"),
        );
    let yaml = gateway_with_servers(&servers)
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + ROUTE_ALL;
    let _gw = TestGateway::start(&yaml, &[port])?;
    let hosts = ["mtls.test", "optional.test"];
    let server_ca = pki.dir.join("server-ca.crt");
    let identity = |crt: &Path, key: &Path| -> anyhow::Result<reqwest::Identity> {
        let pem = std::fs::read_to_string(key)? + &std::fs::read_to_string(crt)?;
        Ok(reqwest::Identity::from_pem(pem.as_bytes())?)
    };
    let url = format!("https://mtls.test:{port}/");
    assert!(
        status_of(tls_client(&server_ca, &hosts, port)?, &url)
            .await
            .is_err(),
        "MUTUAL accepted a client without a certificate"
    );
    let stranger =
        tls_client(&server_ca, &hosts, port)?.identity(identity(&stranger_crt, &stranger_key)?);
    assert!(
        status_of(stranger, &url).await.is_err(),
        "MUTUAL accepted a certificate from another CA"
    );
    let alice = tls_client(&server_ca, &hosts, port)?
        .identity(identity(&client_crt, &client_key)?)
        .build()?;
    let r = send(
        alice
            .get(&url)
            .header("x-forwarded-client-cert", "Subject=\"CN=forged\""),
    )
    .await?;
    assert_eq!(r.status, 200);
    let xfcc = r.request_header("x-forwarded-client-cert").unwrap_or("");
    assert!(
        xfcc.starts_with("Hash=") && xfcc.contains("Subject=\"CN=alice\""),
        "{xfcc}"
    );
    assert!(
        xfcc.contains("URI=spiffe://example/alice") && xfcc.contains("DNS=alice.test"),
        "{xfcc}"
    );
    assert!(
        !xfcc.contains("forged"),
        "a client-sent XFCC survived: {xfcc}"
    );
    // A connection made without a certificate for the OPTIONAL_MUTUAL name cannot reach the MUTUAL
    // name's routes through the Host header: 421, as for any host of another server.
    // (HTTP/1.1: an h2 request whose `host` differs from `:authority` is already malformed.)
    let anonymous = tls_client(&server_ca, &hosts, port)?.http1_only().build()?;
    let r = send(
        anonymous
            .get(format!("https://optional.test:{port}/"))
            .header("host", "mtls.test"),
    )
    .await?;
    assert_eq!(r.status, 421, "{r:?}");
    assert!(
        r.body
            .as_str()
            .unwrap_or("")
            .contains("misdirected request"),
        "{r:?}"
    );
    // OPTIONAL_MUTUAL: no certificate is fine, and then there is no identity either.
    let anonymous = tls_client(&server_ca, &hosts, port)?.build()?;
    let r = send(
        anonymous
            .get(format!("https://optional.test:{port}/"))
            .header("x-forwarded-client-cert", "forged"),
    )
    .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.request_header("x-forwarded-client-cert"), None);
    Ok(())
}

/// A backend that terminates TLS itself and answers every request with `body`.
async fn tls_backend(crt: &Path, key: &Path, body: &'static str) -> anyhow::Result<SocketAddr> {
    tls_backend_with(crt, key, body, None).await
}

/// Like [`tls_backend`]; with `client_ca`, it requires client certificates signed by that CA.
async fn tls_backend_with(
    crt: &Path,
    key: &Path,
    body: &'static str,
    client_ca: Option<&Path>,
) -> anyhow::Result<SocketAddr> {
    use rustls::pki_types::pem::PemObject;
    let certs =
        rustls::pki_types::CertificateDer::pem_file_iter(crt)?.collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn passthrough_reaches_a_backend_that_terminates_tls_itself() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("backend-ca")?;
    pki.ca("edge-ca")?;
    let (backend_crt, backend_key) = pki.leaf(
        "backend",
        "backend-ca",
        &["DNS:pass.test"],
        KeyType::Ecdsa,
        false,
    )?;
    let (edge_crt, edge_key) =
        pki.leaf("edge", "edge-ca", &["DNS:edge.test"], KeyType::Ecdsa, false)?;
    let backend_v1 = tls_backend(&backend_crt, &backend_key, "passthrough-v1").await?;
    let backend_v2 = tls_backend(&backend_crt, &backend_key, "passthrough-v2").await?;
    let port = free_port();
    let upstream = echo("app").await?;
    let servers = format!(
        "  - port: {{number: {port}, name: tls, protocol: TLS}}\n    hosts: [pass.test]\n    tls: {{mode: PASSTHROUGH}}\n"
    ) + &https_server(
        port,
        "edge.test",
        &format!("{{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}", edge_crt.display(), edge_key.display()),
    );
    let yaml = gateway_with_servers(&servers)
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: pass}}\nspec:\n\
             \x20 hosts: [pass.internal]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  resolution: STATIC\n\
             \x20 endpoints:\n  - {{address: 127.0.0.1, ports: {{tls: {}}}, labels: {{v: one}}}}\n\
             \x20 - {{address: 127.0.0.1, ports: {{tls: {}}}, labels: {{v: two}}}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: pass}}\nspec:\n\
             \x20 host: pass.internal\n  subsets: [{{name: one, labels: {{v: one}}}}, {{name: two, labels: {{v: two}}}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: pass}}\nspec:\n\
             \x20 hosts: [pass.test]\n  gateways: [gw]\n  tls:\n  - match: [{{sniHosts: [pass.test]}}]\n    route:\n\
             \x20   - {{destination: {{host: pass.internal, subset: one}}, weight: 50}}\n\
             \x20   - {{destination: {{host: pass.internal, subset: two}}, weight: 50}}\n",
            backend_v1.port(),
            backend_v2.port()
        )
        + &ROUTE_ALL.replace("hosts: [\"*\"]", "hosts: [edge.test]");
    let gw = TestGateway::start(&yaml, &[port])?;
    // The client verifies the backend's own certificate: Sluice did not decrypt.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let client = tls_client(&pki.dir.join("backend-ca.crt"), &["pass.test"], port)?.build()?;
        let body = client
            .get(format!("https://pass.test:{port}/"))
            .send()
            .await?
            .text()
            .await?;
        seen.insert(body);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["passthrough-v1", "passthrough-v2"],
        "log:\n{}",
        gw.log()
    );
    // The same port terminates edge.test itself.
    assert_eq!(
        status_of(
            tls_client(&pki.dir.join("edge-ca.crt"), &["edge.test"], port)?,
            &format!("https://edge.test:{port}/")
        )
        .await,
        Ok(200)
    );
    Ok(())
}

#[tokio::test]
async fn tcp_routes_forward_plain_tcp() -> anyhow::Result<()> {
    let port = free_port();
    let upstream = echo("tcp-echo").await?;
    let yaml = gateway_with_servers(&format!("  - port: {{number: {port}, name: tcp, protocol: TCP}}\n    hosts: [\"*\"]\n"))
        + &service_entry_yaml("db", "db.svc", &[(upstream, "")])
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  tcp:\n  - route: [{destination: {host: db.svc}}]\n";
    let _gw = TestGateway::start(&yaml, &[port])?;
    // An HTTP request sent as bytes arrives unchanged (no X-Forwarded-For: nothing parsed it).
    let r = get(port, "raw.test", "/bytes").await?;
    assert_eq!(r.backend(), "tcp-echo");
    assert_eq!(r.request_header("x-forwarded-for"), None);
    Ok(())
}

#[tokio::test]
async fn replaced_certificates_are_served_within_two_seconds_and_broken_ones_are_refused(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("old-ca")?;
    pki.ca("new-ca")?;
    pki.leaf("old", "old-ca", &["DNS:swap.test"], KeyType::Ecdsa, false)?;
    pki.leaf("new", "new-ca", &["DNS:swap.test"], KeyType::Rsa, false)?;
    let port = free_port();
    let yaml = app_behind(&https_server(
        port,
        "swap.test",
        "{mode: SIMPLE, credentialName: swap}",
    ))
    .await?;
    // The certificate must exist before Sluice starts: put it in the gateway's own certs dir.
    let gw_dir = tempfile::tempdir()?;
    let certs = gw_dir.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    let install = |name: &str| -> anyhow::Result<()> {
        pki.copy_pair(
            name,
            &certs.join("swap.crt.tmp"),
            &certs.join("swap.key.tmp"),
        )?;
        std::fs::rename(certs.join("swap.key.tmp"), certs.join("swap.key"))?;
        std::fs::rename(certs.join("swap.crt.tmp"), certs.join("swap.crt"))?;
        Ok(())
    };
    install("old")?;
    let gw = TestGateway::start_in(gw_dir, &yaml, &[port])?;
    let url = format!("https://swap.test:{port}/");
    let old = tls_client(&pki.dir.join("old-ca.crt"), &["swap.test"], port)?.build()?;
    assert_eq!(old.get(&url).send().await?.status(), 200);
    // Reading certificates (at start, on every handshake path) is not a change: no reload storm.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gw.status().await?["generation"],
        1,
        "idle gateway reloaded itself"
    );

    install("new")?;
    let swapped = Instant::now();
    loop {
        let fresh = tls_client(&pki.dir.join("new-ca.crt"), &["swap.test"], port)?;
        if status_of(fresh, &url).await == Ok(200) {
            break;
        }
        anyhow::ensure!(
            swapped.elapsed() < Duration::from_secs(2),
            "new certificate not served after 2 s; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("certificate swap served after {:?}", swapped.elapsed());
    // The connection established before the swap keeps working.
    assert_eq!(old.get(&url).send().await?.status(), 200);

    // A broken replacement is refused; the previous certificate keeps serving.
    let generation = gw.status().await?["generation"].as_u64().unwrap_or(0);
    std::fs::write(
        certs.join("swap.crt"),
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    )?;
    let status = gw
        .wait_for_status(Duration::from_secs(5), |s| {
            s["lastReloadSuccessful"] == false
        })
        .await?;
    assert_eq!(status["generation"].as_u64(), Some(generation));
    let error = status["lastError"].as_str().unwrap_or("");
    assert!(
        error.contains("swap.crt") && error.contains("config.yaml:"),
        "{error}"
    );
    let fresh = tls_client(&pki.dir.join("new-ca.crt"), &["swap.test"], port)?;
    assert_eq!(status_of(fresh, &url).await, Ok(200));
    Ok(())
}

#[test]
fn validate_names_certificate_problems_with_their_position() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("ca")?;
    let (good_crt, _) = pki.leaf("good", "ca", &["DNS:a.test"], KeyType::Ecdsa, false)?;
    let (_, other_key) = pki.leaf("other", "ca", &["DNS:b.test"], KeyType::Ecdsa, false)?;
    // An expired certificate, made with rcgen (openssl's `req` cannot backdate).
    let mut params = rcgen::CertificateParams::new(vec!["old.test".to_string()])?;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let expired_key = rcgen::KeyPair::generate()?;
    let expired = params.self_signed(&expired_key)?;
    std::fs::write(dir.path().join("expired.crt"), expired.pem())?;
    std::fs::write(dir.path().join("expired.key"), expired_key.serialize_pem())?;
    for (name, cert, key, expected) in [
        (
            "mismatch",
            good_crt.clone(),
            other_key.clone(),
            "does not match private key",
        ),
        (
            "expired",
            dir.path().join("expired.crt"),
            dir.path().join("expired.key"),
            "expired on",
        ),
        (
            "missing",
            dir.path().join("nope.crt"),
            other_key.clone(),
            "cannot read certificate file",
        ),
    ] {
        let config = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n\
                 \x20 - port: {{number: 8443, protocol: HTTPS}}\n    hosts: [a.test]\n    tls:\n      mode: SIMPLE\n\
                 \x20     serverCertificate: {}\n      privateKey: {}\n",
                cert.display(),
                key.display()
            ),
        )?;
        let output = validate(&[&config])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "{name}: {stdout}");
        assert!(
            stdout.contains(&format!("{}:8:5: ", config.display())) && stdout.contains(expected),
            "{name}: {stdout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn destination_rules_originate_tls_to_upstreams() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let backend_ca = pki.ca("backend-ca")?;
    let other_ca = pki.ca("other-ca")?;
    let client_ca = pki.ca("client-ca")?;
    let (crt, key) = pki.leaf(
        "api",
        "backend-ca",
        &["DNS:api.internal"],
        KeyType::Rsa,
        false,
    )?;
    let (client_crt, client_key) = pki.leaf(
        "gateway",
        "client-ca",
        &["DNS:gateway.internal"],
        KeyType::Ecdsa,
        true,
    )?;
    let simple = tls_backend(&crt, &key, "tls-upstream").await?;
    let mutual = tls_backend_with(&crt, &key, "mtls-upstream", Some(&client_ca)).await?;
    let port = free_port();
    let mut yaml = gateway_with_servers(&format!(
        "  - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n"
    ));
    let cases = [
        ("verified", simple, format!("{{mode: SIMPLE, sni: api.internal, caCertificates: {}}}", backend_ca.display())),
        ("wrong-ca", simple, format!("{{mode: SIMPLE, sni: api.internal, caCertificates: {}}}", other_ca.display())),
        ("skip-verify", simple, format!("{{mode: SIMPLE, caCertificates: {}, insecureSkipVerify: true}}", other_ca.display())),
        ("system-roots", simple, "{mode: SIMPLE, sni: api.internal}".to_string()),
        (
            "mutual",
            mutual,
            format!(
                "{{mode: MUTUAL, sni: api.internal, caCertificates: {}, clientCertificate: {}, privateKey: {}}}",
                backend_ca.display(),
                client_crt.display(),
                client_key.display()
            ),
        ),
        ("no-client-cert", mutual, format!("{{mode: SIMPLE, sni: api.internal, caCertificates: {}}}", backend_ca.display())),
    ];
    for (name, backend, tls) in &cases {
        yaml += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n\
             \x20 hosts: [{name}.test]\n  ports: [{{number: 443, name: https, protocol: HTTPS}}]\n  resolution: STATIC\n\
             \x20 endpoints: [{{address: 127.0.0.1, ports: {{https: {}}}}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec:\n\
             \x20 host: {name}.test\n  trafficPolicy:\n    tls: {tls}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n\
             \x20 hosts: [{name}.gw]\n  gateways: [gw]\n  http:\n  - route: [{{destination: {{host: {name}.test}}}}]\n",
            backend.port()
        );
    }
    let _gw = TestGateway::start(&yaml, &[port])?;
    for (host, status, body) in [
        ("verified.gw", 200, Some("tls-upstream")),
        ("wrong-ca.gw", 503, None),
        ("skip-verify.gw", 200, Some("tls-upstream")),
        ("system-roots.gw", 503, None), // a private CA is not among the system roots
        ("mutual.gw", 200, Some("mtls-upstream")),
        ("no-client-cert.gw", 503, None),
    ] {
        let r = get(port, host, "/").await?;
        assert_eq!(r.status, status, "{host}: {r:?}");
        if let Some(body) = body {
            assert_eq!(r.body.as_str(), Some(body), "{host}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn grpc_over_h2_keeps_its_trailers_end_to_end() -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let ca = pki.ca("ca")?;
    let (crt, key) = pki.leaf("grpc", "ca", &["DNS:grpc.test"], KeyType::Ecdsa, false)?;
    let port = free_port();
    let upstream = echo("grpc-echo").await?;
    let yaml = gateway_with_servers(&https_server(
        port,
        "grpc.test",
        &format!("{{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}", crt.display(), key.display()),
    )) + &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: grpc}}\nspec:\n\
         \x20 hosts: [grpc.svc]\n  ports: [{{number: 50051, name: grpc, protocol: GRPC}}]\n  resolution: STATIC\n\
         \x20 endpoints: [{{address: 127.0.0.1, ports: {{grpc: {}}}}}]\n",
        upstream.port()
    ) + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: grpc}\nspec:\n\
         \x20 hosts: [grpc.test]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /echo.Echo/}}]\n\
         \x20   route: [{destination: {host: grpc.svc}}]\n\
         \x20 - match: [{uri: {prefix: /renamed.Echo/}}]\n    rewrite: {uri: /echo.Echo/}\n\
         \x20   route: [{destination: {host: grpc.svc}}]\n";
    let _gw = TestGateway::start(&yaml, &[port])?;

    // A real HTTP/2 client over TLS (ALPN h2), which exposes trailers.
    let tls = tls_connect(&ca, "grpc.test", port, &[b"h2"]).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await?;
    tokio::spawn(connection);
    // One length-prefixed gRPC message: flag 0, length 5, "hello". The second path is rewritten,
    // which must keep the request's authority: an HTTP/2 upstream cannot do without it.
    let message = bytes::Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    for path in ["/echo.Echo/Say", "/renamed.Echo/Say"] {
        let request = http::Request::post(format!("https://grpc.test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(message.clone()))?;
        let response = sender.send_request(request).await?;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let collected = response.into_body().collect().await?;
        let trailers = collected
            .trailers()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no trailers arrived"))?;
        assert_eq!(collected.to_bytes(), message);
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "echo from grpc-echo");
    }
    Ok(())
}

/// Requests pipelined over TLS (several in one record, and one sent while the previous is with the
/// upstream) are answered in order, as over plain TCP.
#[tokio::test]
async fn pipelined_requests_over_tls_are_answered_in_order() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let ca = pki.ca("ca")?;
    let (crt, key) = pki.leaf("site", "ca", &["DNS:a.test"], KeyType::Ecdsa, false)?;
    let port = free_port();
    let yaml = app_behind(&https_server(
        port,
        "a.test",
        &format!(
            "{{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}",
            crt.display(),
            key.display()
        ),
    ))
    .await?;
    let _gw = TestGateway::start(&yaml, &[port])?;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n");
    let mut stream =
        tokio::io::BufReader::new(tls_connect(&ca, "a.test", port, &[b"http/1.1"]).await?);
    stream
        .get_mut()
        .write_all((get("/1") + &get("/2?sleep_ms=200") + &get("/3")).as_bytes())
        .await?;
    stream.get_mut().flush().await?;
    for path in ["/1", "/2", "/3"] {
        let (status, body) = read_http1_response(&mut stream).await?;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        let echoed: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(echoed["path"], path);
    }
    stream
        .get_mut()
        .write_all(get("/slow?sleep_ms=300").as_bytes())
        .await?;
    stream.get_mut().flush().await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.get_mut().write_all(get("/next").as_bytes()).await?;
    stream.get_mut().flush().await?;
    for path in ["/slow", "/next"] {
        let (status, body) = read_http1_response(&mut stream).await?;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        let echoed: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(echoed["path"], path);
    }
    Ok(())
}

#[tokio::test]
async fn cipher_suites_are_honoured_and_client_identity_is_routable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("ca")?;
    let client_ca = pki.ca("client-ca")?;
    let (crt, key) = pki.leaf(
        "s",
        "ca",
        &["DNS:suites.test", "DNS:who.test"],
        KeyType::Ecdsa,
        false,
    )?;
    let (alice_crt, alice_key) = pki.leaf(
        "alice",
        "client-ca",
        &["DNS:alice.test"],
        KeyType::Ecdsa,
        true,
    )?;
    let port = free_port();
    let files = format!(
        "serverCertificate: {}, privateKey: {}",
        crt.display(),
        key.display()
    );
    let servers = https_server(
        port,
        "suites.test",
        &format!("{{mode: SIMPLE, maxProtocolVersion: TLSV1_2, cipherSuites: [ECDHE-ECDSA-AES256-GCM-SHA384], {files}}}"),
    ) + &https_server(
        port,
        "who.test",
        &format!("{{mode: OPTIONAL_MUTUAL, caCertificates: {}, {files}}}", client_ca.display()),
    );
    let yaml = gateway_with_servers(&servers)
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: who}\nspec:\n\
           \x20 hosts: [\"*\"]\n  gateways: [gw]\n  http:\n\
           \x20 - match: [{headers: {x-forwarded-client-cert: {regex: '.*Subject=\"CN=alice\".*'}}}]\n\
           \x20   directResponse: {status: 200, body: {string: hello alice}}\n\
           \x20 - directResponse: {status: 200, body: {string: hello stranger}}\n";
    let _gw = TestGateway::start(&yaml, &[port])?;
    let cipher = |suite: &'static str| async move {
        let out = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "suites.test",
                "-tls1_2",
                "-cipher",
                suite,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let allowed = cipher("ECDHE-ECDSA-AES256-GCM-SHA384").await?;
    assert!(
        allowed.contains("Cipher is ECDHE-ECDSA-AES256-GCM-SHA384"),
        "{allowed}"
    );
    let refused = cipher("ECDHE-ECDSA-AES128-GCM-SHA256").await?;
    assert!(refused.contains("Cipher is (NONE)"), "{refused}");

    // Routes match on the identity Sluice puts in x-forwarded-client-cert, never on a forged one.
    let ca = pki.dir.join("ca.crt");
    let pem = std::fs::read_to_string(&alice_key)? + &std::fs::read_to_string(&alice_crt)?;
    let alice = tls_client(&ca, &["who.test"], port)?
        .identity(reqwest::Identity::from_pem(pem.as_bytes())?)
        .build()?;
    assert_eq!(
        alice
            .get(format!("https://who.test:{port}/"))
            .send()
            .await?
            .text()
            .await?,
        "hello alice"
    );
    let forger = tls_client(&ca, &["who.test"], port)?.build()?;
    let forged = forger
        .get(format!("https://who.test:{port}/"))
        .header("x-forwarded-client-cert", "Hash=00;Subject=\"CN=alice\"")
        .send()
        .await?;
    assert_eq!(forged.text().await?, "hello stranger");
    Ok(())
}

#[tokio::test]
async fn kubernetes_secret_rotation_is_picked_up() -> anyhow::Result<()> {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.ca("first-ca")?;
    pki.ca("second-ca")?;
    pki.leaf(
        "first",
        "first-ca",
        &["DNS:k8s.test"],
        KeyType::Ecdsa,
        false,
    )?;
    pki.leaf(
        "second",
        "second-ca",
        &["DNS:k8s.test"],
        KeyType::Ecdsa,
        false,
    )?;
    // The layout kubelet mounts: certs/site/{tls.crt,tls.key} -> ..data/… -> ..<timestamp>/….
    let gw_dir = tempfile::tempdir()?;
    let secret = gw_dir.path().join("certs/site");
    std::fs::create_dir_all(&secret)?;
    let publish = |version: &str, name: &str| -> anyhow::Result<()> {
        let versioned = secret.join(format!("..{version}"));
        std::fs::create_dir_all(&versioned)?;
        pki.copy_pair(name, &versioned.join("tls.crt"), &versioned.join("tls.key"))?;
        let staged = secret.join("..data_tmp");
        let _ = std::fs::remove_file(&staged);
        symlink(format!("..{version}"), &staged)?;
        std::fs::rename(&staged, secret.join("..data"))?;
        Ok(())
    };
    publish("2026_01", "first")?;
    symlink("..data/tls.crt", secret.join("tls.crt"))?;
    symlink("..data/tls.key", secret.join("tls.key"))?;
    let port = free_port();
    let yaml = app_behind(&https_server(
        port,
        "k8s.test",
        "{mode: SIMPLE, credentialName: site}",
    ))
    .await?;
    let gw = TestGateway::start_in(gw_dir, &yaml, &[port])?;
    let url = format!("https://k8s.test:{port}/");
    assert_eq!(
        status_of(
            tls_client(&pki.dir.join("first-ca.crt"), &["k8s.test"], port)?,
            &url
        )
        .await,
        Ok(200)
    );
    publish("2026_02", "second")?;
    let rotated = Instant::now();
    while status_of(
        tls_client(&pki.dir.join("second-ca.crt"), &["k8s.test"], port)?,
        &url,
    )
    .await
        != Ok(200)
    {
        anyhow::ensure!(
            rotated.elapsed() < Duration::from_secs(2),
            "rotation not served after 2 s; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}
