//! ACME against a real CA: Pebble (Debian package `pebble`) with `pebble-challtestsrv` as its DNS,
//! answering 127.0.0.1 for every name, so every validation really connects to Sluice.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice_tests::*;

/// A running Pebble and its DNS server, killed on drop.
struct Pebble {
    dir: tempfile::TempDir,
    processes: Vec<Child>,
    port: u16,
    management: u16,
    /// The CA of Pebble's own HTTPS listener (for Sluice's `caBundle`).
    listener_ca: PathBuf,
}

impl Pebble {
    /// Starts Pebble on `port`, validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`.
    fn start(port: u16, http_port: u16, tls_port: u16, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_in(Self::prepare()?, port, http_port, tls_port, env)
    }

    /// A directory with Pebble's listener certificate and its CA (`pki/pebble-ca.crt`), made before
    /// Pebble starts so a Sluice configured earlier can already name the CA.
    fn prepare() -> Result<tempfile::TempDir> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path())?;
        pki.ca("pebble-ca")?;
        pki.leaf(
            "pebble",
            "pebble-ca",
            &["DNS:localhost", "IP:127.0.0.1"],
            KeyType::Ecdsa,
            false,
        )?;
        Ok(dir)
    }

    fn start_in(
        dir: tempfile::TempDir,
        port: u16,
        http_port: u16,
        tls_port: u16,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let pki = dir.path().join("pki");
        let listener_ca = pki.join("pebble-ca.crt");
        let (cert, key) = (pki.join("pebble.crt"), pki.join("pebble.key"));
        let dns = free_port();
        let management = free_port();
        let config = dir.path().join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }})
            .to_string(),
        )?;
        let log = |name: &str| -> Result<Stdio> {
            Ok(std::fs::File::create(dir.path().join(name))?.into())
        };
        let dns_server = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log")?)
            .stderr(log("challtestsrv.err")?)
            .spawn()
            .context("starting pebble-challtestsrv (apt-get install pebble)")?;
        let mut processes = vec![dns_server];
        let mut pebble = Command::new("pebble");
        pebble
            .args(["-config", &config.display().to_string()])
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log("pebble.log")?)
            .stderr(log("pebble.err")?);
        for (name, value) in env {
            pebble.env(name, value);
        }
        processes.push(pebble.spawn().context("starting pebble")?);
        let pebble = Self {
            dir,
            processes,
            port,
            management,
            listener_ca,
        };
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(15))
            .with_context(|| pebble.log())?;
        wait_for_port(([127, 0, 0, 1], management).into(), Duration::from_secs(15))?;
        Ok(pebble)
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// Pebble's issuing root (random per run), fetched from its management interface.
    async fn root(&self) -> Result<PathBuf> {
        let client = tls_client(&self.listener_ca, &[], 0)?.build()?;
        let pem = client
            .get(format!("https://127.0.0.1:{}/roots/0", self.management))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, pem)?;
        Ok(path)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Gateway with a plaintext server (redirecting to https, so the challenge must be answered
/// before the redirect) and an HTTPS server for `host` with `credentialName: acme:pebble`.
fn acme_config(http: u16, https: u16, host: &str, issuer: &str) -> String {
    format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n\
         \x20 - port: {{number: {http}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n    tls: {{httpsRedirect: true}}\n{}",
        settings_yaml(&format!("  acme:\n    issuers:\n    - {issuer}\n")),
        https_server(https, host, "{mode: SIMPLE, credentialName: \"acme:pebble\"}")
    )
}

fn issuer(pebble: &Pebble, challenge: &str, extra: &str) -> String {
    format!(
        "{{name: pebble, directoryUrl: \"{}\", email: ops@example.com, caBundle: \"{}\", challenge: {challenge}, minRetryInterval: 1s, maxRetryInterval: 4s{extra}}}",
        pebble.directory(),
        pebble.listener_ca.display()
    )
}

/// Waits until the admin status shows `host`'s certificate as valid.
async fn wait_for_certificate(gw: &TestGateway, host: &str, timeout: Duration) -> Result<Value> {
    let status = gw
        .wait_for_status(timeout, |s| {
            s["acme"][host]["state"] == "valid" && s["acme"][host]["notAfter"].is_i64()
        })
        .await;
    status.with_context(|| format!("sluice log:\n{}", gw.log()))
}

/// Does an HTTPS request to `host` on `port` trusting only `root`; any HTTP answer proves the
/// handshake used a certificate for `host` issued under `root`.
async fn served_under(root: &Path, host: &str, port: u16) -> Result<u16> {
    let client = tls_client(root, &[host], port)?.build()?;
    let response = client.get(format!("https://{host}:{port}/")).send().await?;
    Ok(response.status().as_u16())
}

fn orders(metrics: &str, result: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("sluice_acme_orders_total{")
                && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn is_rsa(certificate: &Path) -> Result<bool> {
    let pem = std::fs::read(certificate)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)?;
    let cert = pem.parse_x509()?;
    Ok(matches!(
        cert.public_key().parsed(),
        Ok(x509_parser::public_key::PublicKey::RSA(_))
    ))
}

fn mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[tokio::test(flavor = "current_thread")]
async fn http01_certificate_is_obtained_served_and_survives_nonce_rejections() -> Result<()> {
    let (http, https) = (free_port(), free_port());
    // Half of all good nonces rejected: instant-acme's own retries are not enough, so this
    // needs Sluice's order resumption and backoff too.
    let pebble = Pebble::start(
        free_port(),
        http,
        free_port(),
        &[("PEBBLE_WFE_NONCEREJECT", "50")],
    )?;
    let host = "shop.acme.test";
    let gw = TestGateway::start(
        &acme_config(http, https, host, &issuer(&pebble, "http-01", "")),
        &[http, https],
    )?;
    // No certificate yet: the name is refused rather than served with the wrong certificate.
    let root = pebble.root().await?;
    wait_for_certificate(&gw, host, Duration::from_secs(90)).await?;
    assert_eq!(served_under(&root, host, https).await?, 404);
    let certs = gw.dir.path().join("certs");
    assert_eq!(mode(&certs.join(format!("{host}.key")))?, 0o600);
    assert_eq!(mode(&certs.join("acme/accounts/pebble.json"))?, 0o600);
    assert!(
        !certs.join(format!("acme/orders/{host}.json")).exists(),
        "pending order left behind"
    );
    let text = gw.metrics().await?;
    assert_eq!(orders(&text, "success"), 1, "{text}");
    assert!(gw.log().contains("issued by `pebble`"), "{}", gw.log());
    // Plain HTTP still redirects; only the CA's challenge path was answered before it. Tokens
    // Sluice does not know (or that could not be tokens) fall through to the routes.
    for path in [
        "/x",
        "/.well-known/acme-challenge/unknown-token",
        "/.well-known/acme-challenge/..%2Facme%2Faccounts%2Fpebble.json",
    ] {
        let response = client()
            .get(format!("http://127.0.0.1:{http}{path}"))
            .header("host", host)
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 301, "{path}");
    }
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn tls_alpn01_certificate_and_the_account_is_reused_on_restart() -> Result<()> {
    let (http, https) = (free_port(), free_port());
    let pebble = Pebble::start(free_port(), free_port(), https, &[])?;
    let host = "alpn.acme.test";
    let config = acme_config(
        http,
        https,
        host,
        &issuer(&pebble, "tls-alpn-01", ", keyType: RSA_2048"),
    );
    let mut gw = TestGateway::start(&config, &[http, https])?;
    let root = pebble.root().await?;
    wait_for_certificate(&gw, host, Duration::from_secs(90)).await?;
    assert_eq!(served_under(&root, host, https).await?, 404);
    assert!(
        is_rsa(&gw.dir.path().join(format!("certs/{host}.crt")))?,
        "keyType: RSA_2048 gave another key"
    );
    let account_file = gw.dir.path().join("certs/acme/accounts/pebble.json");
    let account = std::fs::read(&account_file)?;
    let certificate = std::fs::read(gw.dir.path().join(format!("certs/{host}.crt")))?;

    // Restart on the same directory, with a second host: one new order, same account.
    let dir = std::mem::replace(&mut gw.dir, tempfile::tempdir()?);
    drop(gw);
    let second = "second.acme.test";
    let config = acme_config(
        http,
        https,
        &format!("{host}, {second}"),
        &issuer(&pebble, "tls-alpn-01", ", keyType: RSA_2048"),
    );
    let gw = TestGateway::start_in(dir, &config, &[http, https])?;
    // The stored certificate serves at once, before any ACME traffic.
    assert_eq!(served_under(&root, host, https).await?, 404);
    wait_for_certificate(&gw, second, Duration::from_secs(90)).await?;
    assert_eq!(served_under(&root, second, https).await?, 404);
    assert_eq!(
        std::fs::read(&account_file)?,
        account,
        "account was registered again"
    );
    // The stored certificate's renewal was checked with the CA's ARI; Pebble 2.4 has none.
    assert!(
        gw.log().contains("offers no renewal information (ARI)"),
        "{}",
        gw.log()
    );
    assert_eq!(
        std::fs::read(gw.dir.path().join(format!("certs/{host}.crt")))?,
        certificate
    );
    let text = gw.metrics().await?;
    assert_eq!(
        orders(&text, "success"),
        1,
        "only the new host is ordered: {text}"
    );

    // An operator forces a renewal: a new certificate replaces the stored one, no restart.
    let token = std::fs::read_to_string(gw.dir.path().join("certs/admin.token"))?;
    let renew = |host: &str, token: Option<&str>| {
        let request = client().post(gw.admin_url(&format!("/api/v1/acme/renew?host={host}")));
        match token {
            Some(token) => request.bearer_auth(token.trim()),
            None => request,
        }
    };
    assert_eq!(renew(host, None).send().await?.status().as_u16(), 401);
    assert_eq!(
        renew("nope.test", Some(&token))
            .send()
            .await?
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        renew(host, Some(&token)).send().await?.status().as_u16(),
        202
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read(gw.dir.path().join(format!("certs/{host}.crt")))? == certificate {
        if Instant::now() > deadline {
            bail!("forced renewal did not happen; log:\n{}", gw.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_certificate(&gw, host, Duration::from_secs(10)).await?;
    assert_eq!(served_under(&root, host, https).await?, 404);
    let text = gw.metrics().await?;
    assert_eq!(orders(&text, "success"), 2, "{text}");
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn while_the_ca_is_down_the_old_certificate_serves_and_renewal_follows_later() -> Result<()> {
    let (http, https, pebble_port) = (free_port(), free_port(), free_port());
    let host = "renew.acme.test";
    // A certificate from another CA with 30 days left, due under `renewBefore: 1000h`.
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let old_ca = pki.ca("old-ca")?;
    pki.leaf(
        "old",
        "old-ca",
        &[&format!("DNS:{host}")],
        KeyType::Ecdsa,
        false,
    )?;
    std::fs::create_dir_all(dir.path().join("certs"))?;
    pki.copy_pair(
        "old",
        &dir.path().join(format!("certs/{host}.crt")),
        &dir.path().join(format!("certs/{host}.key")),
    )?;
    // The issuer's CA bundle must exist before Pebble does: make Pebble's listener CA up front.
    let listener = Pebble::prepare()?;
    let issuer = format!(
        "{{name: pebble, directoryUrl: \"https://127.0.0.1:{pebble_port}/dir\", caBundle: \"{}\", minRetryInterval: 1s, maxRetryInterval: 4s, renewBefore: 1000h}}",
        listener.path().join("pki/pebble-ca.crt").display()
    );
    let gw = TestGateway::start_in(
        dir,
        &acme_config(http, https, host, &issuer),
        &[http, https],
    )?;
    assert_eq!(served_under(&old_ca, host, https).await?, 404);

    // The CA is down: failures back off (1 s, 2 s, 4 s, 4 s…) and the old certificate serves.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = gw.status().await?;
    let failures = status["acme"][host]["failures"].as_u64().unwrap_or(0);
    assert!(
        (2..=5).contains(&failures),
        "{failures} failures in {:?}: {status}",
        started.elapsed()
    );
    assert_eq!(status["acme"][host]["state"], "retrying", "{status}");
    assert!(
        status["acme"][host]["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("ACME"),
        "{status}"
    );
    assert_eq!(orders(&gw.metrics().await?, "failure"), failures);
    assert_eq!(served_under(&old_ca, host, https).await?, 404);

    // The CA comes back: the next retry renews, and the new certificate serves without a restart.
    let pebble = Pebble::start_in(listener, pebble_port, http, free_port(), &[])?;
    let root = pebble.root().await?;
    let pid = gw.pid();
    let deadline = Instant::now() + Duration::from_secs(60);
    while served_under(&root, host, https).await.is_err() {
        if Instant::now() > deadline {
            bail!("not renewed; log:\n{}", gw.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gw.pid(), pid);
    assert!(
        served_under(&old_ca, host, https).await.is_err(),
        "old certificate still served"
    );
    wait_for_certificate(&gw, host, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn replicas_sharing_the_certs_dir_place_one_order() -> Result<()> {
    let shared = tempfile::tempdir()?;
    let (http_a, https_a, http_b, https_b) = (free_port(), free_port(), free_port(), free_port());
    // The CA validates at replica A only, as a balancer might route it: whichever replica holds
    // the lease, A must be able to answer (challenge answers are shared through the directory).
    let pebble = Pebble::start(free_port(), http_a, free_port(), &[])?;
    let host = "shared.acme.test";
    let mut replicas = Vec::new();
    for (http, https) in [(http_a, https_a), (http_b, https_b)] {
        let dir = tempfile::tempdir()?;
        std::os::unix::fs::symlink(shared.path(), dir.path().join("certs"))?;
        let config = acme_config(http, https, host, &issuer(&pebble, "http-01", ""));
        replicas.push((TestGateway::start_in(dir, &config, &[http, https])?, https));
    }
    let root = pebble.root().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for (gw, https) in &replicas {
        while served_under(&root, host, *https).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "replica on {https} serves no certificate; log:\n{}",
                    gw.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut placed = 0;
    for (gw, _) in &replicas {
        placed += orders(&gw.metrics().await?, "success");
    }
    assert_eq!(placed, 1, "one order for both replicas");
    assert!(
        !shared
            .path()
            .join(format!("acme/locks/{host}.lock"))
            .exists(),
        "lease not released"
    );
    Ok(())
}
