//! Test harness: the real `sluice` binary on loopback sockets, real echo upstreams, real clients.
//!
//! `TestGateway::start(yaml)` writes the config into a temporary directory, runs `sluice run` on it
//! and waits until every listener accepts connections. Upstreams are `sluice::echo` servers on
//! ephemeral ports, which answer with their name and the request they received.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The `sluice` binary of this workspace build. The README's test command builds every target
/// first (`cargo build --workspace --all-targets`), so the binary matches the code under test; a
/// nested `cargo build` from inside a test would resolve features differently and rebuild Pingora.
pub fn sluice_bin() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("SLUICE_BIN") {
        return Ok(PathBuf::from(path));
    }
    // Test executables live in target/<profile>/deps/; the binary one level up.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test executable location")?;
    let bin = profile_dir.join("sluice");
    if !bin.exists() {
        bail!(
            "{} does not exist: run `cargo build --workspace --all-targets` before `cargo test`",
            bin.display()
        );
    }
    Ok(bin)
}

/// A port for a listener under test: free a moment ago on 127.0.0.1, never handed out twice in
/// this process, and below Linux's ephemeral range (32768+), where `:0` binds (the echo upstreams)
/// and outgoing connections get their ports, so neither can take it before Sluice binds it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let seed = std::process::id() as usize ^ handed_out.len().wrapping_mul(7919);
    for attempt in 0..12_000usize {
        let port = 20_000 + ((seed.wrapping_mul(31) + attempt * 97) % 12_000) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    0
}

/// Polls until `addr` accepts a TCP connection or `timeout` passes.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listening on {addr} after {timeout:?}")
}

/// A running `sluice run`, killed on drop.
pub struct TestGateway {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    /// The admin API port (`{{ADMIN}}` in the config).
    pub admin_port: u16,
}

impl TestGateway {
    /// Starts sluice with `yaml` (a multi-document config) and waits for `ports` to accept.
    /// `{{DIR}}` in the YAML becomes the gateway's own temporary directory and `{{ADMIN}}` a free
    /// port for its admin API, so parallel tests never share certificates, sockets or ports.
    pub fn start(yaml: &str, ports: &[u16]) -> Result<Self> {
        Self::start_in(tempfile::tempdir()?, yaml, ports)
    }

    /// Like [`TestGateway::start`], in a directory the test prepared (certificates under `certs/`).
    pub fn start_in(dir: tempfile::TempDir, yaml: &str, ports: &[u16]) -> Result<Self> {
        let admin_port = free_port();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, Self::fill(yaml, dir.path(), admin_port))?;
        let child = spawn_sluice(&config, dir.path(), false)?;
        let mut gateway = TestGateway {
            child,
            dir,
            ports: ports.to_vec(),
            admin_port,
        };
        // The admin API starts beside the proxy listeners, not before them: tests that talk to it
        // right away wait for it too.
        let admin = yaml.contains("{{ADMIN}}").then_some(admin_port);
        for port in ports.iter().chain(&admin) {
            if let Err(e) = wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], *port)),
                Duration::from_secs(15),
            ) {
                let exited = gateway.child.try_wait().ok().flatten();
                let log = gateway.log();
                // Keep the directory so the config that failed can be inspected.
                let kept = std::mem::replace(&mut gateway.dir, tempfile::tempdir()?).keep();
                bail!(
                    "{e}; sluice exit status {exited:?}; config and log kept in {}; log:\n{log}",
                    kept.display()
                );
            }
        }
        Ok(gateway)
    }

    pub fn fill(yaml: &str, dir: &Path, admin_port: u16) -> String {
        yaml.replace("{{DIR}}", &dir.display().to_string())
            .replace("{{ADMIN}}", &admin_port.to_string())
    }

    /// Replaces the config file the way editors and `kubectl cp` do: write a temporary file, then
    /// rename it over the old one.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.path().join(".config.yaml.tmp");
        std::fs::write(&tmp, Self::fill(yaml, self.dir.path(), self.admin_port))?;
        std::fs::rename(&tmp, self.dir.path().join("config.yaml"))?;
        Ok(())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> Result<String> {
        Ok(client()
            .get(self.admin_url("/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }

    /// `GET /api/v1/status` with the admin token Sluice wrote into its certs directory.
    pub async fn status(&self) -> Result<serde_json::Value> {
        let token = std::fs::read_to_string(self.dir.path().join("certs/admin.token"))?;
        let response = client()
            .get(self.admin_url("/api/v1/status"))
            .bearer_auth(token.trim())
            .send()
            .await?;
        Ok(response.json().await?)
    }

    /// Polls the status until `done` holds or `timeout` passes.
    pub async fn wait_for_status(
        &self,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            if let Ok(status) = self.status().await {
                if done(&status) {
                    return Ok(status);
                }
                if start.elapsed() > timeout {
                    bail!("status did not reach the expected state in {timeout:?}: {status}");
                }
            } else if start.elapsed() > timeout {
                bail!(
                    "admin API not answering after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `HUP`, `QUIT`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) -> Result<()> {
        send_signal(self.child.id(), name)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[0])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sluice.log")).unwrap_or_default()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        // A gateway that exited before the test ended crashed or refused its config: its log is the
        // only trace of why (shown when the test fails).
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!("sluice exited on its own ({status}); log:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `sluice run --config <config>`, logging to `<dir>/sluice.log` (appending, so an upgraded
/// process shares the log of the one it replaces).
pub fn spawn_sluice(config: &Path, dir: &Path, upgrade: bool) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sluice.log"))?;
    let mut command = Command::new(sluice_bin()?);
    command.args(["run", "--config"]).arg(config);
    if upgrade {
        command.arg("--upgrade");
    }
    command
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("spawning sluice")
}

pub fn send_signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// Starts an echo upstream named `name` on an ephemeral loopback port.
pub async fn echo(name: &str) -> Result<SocketAddr> {
    Ok(sluice::echo::start(name, SocketAddr::from(([127, 0, 0, 1], 0))).await?)
}

/// An HTTP client that does not follow redirects (tests assert on them).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// What an echo upstream reported about a request it received.
#[derive(Debug)]
pub struct Echoed {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Echoed {
    pub fn backend(&self) -> &str {
        self.body["backend"].as_str().unwrap_or("")
    }
    pub fn path(&self) -> &str {
        self.body["path"].as_str().unwrap_or("")
    }
    pub fn request_header(&self, name: &str) -> Option<&str> {
        self.body["headers"][name].as_str()
    }
}

/// Sends `request` and decodes the echo body (a non-JSON body, such as Sluice's own 404, gives
/// `Value::Null`).
pub async fn send(request: reqwest::RequestBuilder) -> Result<Echoed> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok(Echoed {
        status,
        headers,
        body,
    })
}

/// Reads one HTTP/1.1 response with a `content-length` body from a raw connection (for requests
/// a client library would not send as written): its status line and body.
pub async fn read_http1_response(
    stream: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> Result<(String, Vec<u8>)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut status = String::new();
    stream.read_line(&mut status).await?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            bail!("connection closed inside a response head after {status:?}");
        }
        if line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok((status.trim_end().to_string(), body))
}

/// `GET http://127.0.0.1:{port}{path}` with `Host: host`.
pub async fn get(port: u16, host: &str, path: &str) -> Result<Echoed> {
    send(
        client()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", host),
    )
    .await
}

/// Runs `sluice validate` on the given paths.
pub fn validate(paths: &[&Path]) -> Result<Output> {
    let mut command = Command::new(sluice_bin()?);
    command.arg("validate");
    for path in paths {
        command.arg("--config").arg(path);
    }
    Ok(command.output()?)
}

/// The standard header of a test config: settings binding on loopback and a Gateway `gw` with one
/// HTTP server on `port` for `hosts`.
pub fn gateway_yaml(port: u16, hosts: &[&str]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "{}---\n\
         apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n\
         \x20 - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [{}]\n",
        settings_yaml(""),
        hosts.join(", ")
    )
}

/// A GatewaySettings document for tests: loopback, one thread, the gateway's own directory and admin
/// port (see [`TestGateway::start`]), plus `extra` lines of `spec` (each starting with two spaces).
pub fn settings_yaml(extra: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {{name: sluice}}\nspec:\n\
         \x20 bindAddress: 127.0.0.1\n  threads: 1\n  admin: {{address: \"127.0.0.1:{{{{ADMIN}}}}\"}}\n\
         \x20 certsDir: \"{{{{DIR}}}}/certs\"\n  upgradeSocket: \"{{{{DIR}}}}/upgrade.sock\"\n{extra}"
    )
}

/// One HTTPS server of a Gateway, for `gateway_with_servers`: `hosts` as YAML list items, `tls` the
/// server's `tls` block as a YAML flow map.
pub fn https_server(port: u16, hosts: &str, tls: &str) -> String {
    format!("  - port: {{number: {port}, name: https, protocol: HTTPS}}\n    hosts: [{hosts}]\n    tls: {tls}\n")
}

/// Settings and a Gateway `gw` with the given `servers` (no routes).
pub fn gateway_with_servers(servers: &str) -> String {
    format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n{servers}",
        settings_yaml("")
    )
}

/// A loopback address nothing listens on: connections to it are refused.
pub fn refusing_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A STATIC ServiceEntry `host` on service port 80 whose endpoints are `(address, labels)`.
pub fn service_entry_yaml(name: &str, host: &str, endpoints: &[(SocketAddr, &str)]) -> String {
    let mut out = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n\
         \x20 hosts: [{host}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints:\n"
    );
    for (addr, labels) in endpoints {
        out.push_str(&format!(
            "  - {{address: {}, ports: {{http: {}}}, labels: {{{labels}}}}}\n",
            addr.ip(),
            addr.port()
        ));
    }
    out
}

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub requests: u64,
    pub statuses: std::collections::BTreeMap<u16, u64>,
    /// Connections refused (nothing was listening): not a failure of an accepted request.
    pub refused: u64,
    /// Every other transport error, with the first few messages.
    pub errors: u64,
    pub error_samples: Vec<String>,
}

impl LoadReport {
    pub fn non_2xx(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(code, _)| !(200..300).contains(*code))
            .map(|(_, n)| n)
            .sum()
    }

    fn merge(&mut self, other: LoadReport) {
        self.requests += other.requests;
        for (code, n) in other.statuses {
            *self.statuses.entry(code).or_insert(0) += n;
        }
        self.refused += other.refused;
        self.errors += other.errors;
        self.error_samples
            .extend(other.error_samples.into_iter().take(5));
    }
}

/// Steady keep-alive load: `connections` workers each send `GET url` with `Host: host` one after
/// another until stopped, or until `max` time passes (every load loop here is bounded).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(url: String, host: &str, connections: usize, max: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let deadline = Instant::now() + max;
        let workers = (0..connections)
            .map(|_| {
                let (url, host, stop) = (url.clone(), host.to_string(), stop.clone());
                tokio::spawn(async move {
                    let client = client();
                    let mut report = LoadReport::default();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        report.requests += 1;
                        match client.get(&url).header("host", &host).send().await {
                            Ok(response) => {
                                let code = response.status().as_u16();
                                let body = response.bytes().await;
                                if let Err(e) = body {
                                    report.errors += 1;
                                    if report.error_samples.len() < 5 {
                                        report.error_samples.push(format!("body: {e:?}"));
                                    }
                                }
                                *report.statuses.entry(code).or_insert(0) += 1;
                            }
                            Err(e) if e.is_connect() => {
                                report.refused += 1;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(e) => {
                                report.errors += 1;
                                if report.error_samples.len() < 5 {
                                    report.error_samples.push(format!("{e:?}"));
                                }
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, workers }
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadReport::default();
        for worker in self.workers {
            if let Ok(report) = worker.await {
                total.merge(report);
            }
        }
        total
    }
}

/// ServiceEntry `reviews.default.svc.cluster.local` with endpoints `v1` and `v2` (labelled
/// `version`), and the DestinationRule defining subsets v1 and v2.
pub fn reviews_subsets_yaml(v1: SocketAddr, v2: SocketAddr) -> String {
    let mut yaml = service_entry_yaml(
        "reviews",
        "reviews.default.svc.cluster.local",
        &[(v1, "version: v1"), (v2, "version: v2")],
    );
    yaml += "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n\
             spec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n";
    yaml
}

/// Test certificates, made with the `openssl` command as an operator would.
pub struct Pki {
    pub dir: PathBuf,
}

#[derive(Clone, Copy, Debug)]
pub enum KeyType {
    Ecdsa,
    Rsa,
}

impl Pki {
    pub fn new(dir: &Path) -> Result<Self> {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("running openssl")?;
        if !output.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// A self-signed CA `name`: `<name>.crt` and `<name>.key`.
    pub fn ca(&self, name: &str) -> Result<PathBuf> {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ])?;
        Ok(self.dir.join(format!("{name}.crt")))
    }

    /// A leaf `name` signed by CA `ca`, for `sans` (`DNS:a.test`, `IP:127.0.0.1`, `URI:spiffe://…`).
    /// Writes `<name>.key` and `<name>.crt`, the latter holding the full chain (leaf, then CA).
    /// `client` makes it a client certificate (for mutual TLS) instead of a server one.
    pub fn leaf(
        &self,
        name: &str,
        ca: &str,
        sans: &[&str],
        key: KeyType,
        client: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let newkey = match key {
            KeyType::Ecdsa => vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            KeyType::Rsa => vec!["-newkey", "rsa:2048"],
        };
        let mut args = vec!["req"];
        args.extend(newkey);
        let subject = format!("/CN={name}");
        let key_file = format!("{name}.key");
        let csr = format!("{name}.csr");
        args.extend([
            "-nodes", "-subj", &subject, "-keyout", &key_file, "-out", &csr,
        ]);
        self.openssl(&args)?;
        let usage = if client { "clientAuth" } else { "serverAuth" };
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!(
                "basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )?;
        let leaf = format!("{name}.leaf.crt");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-out",
            &leaf,
            "-extfile",
            &format!("{name}.ext"),
        ])?;
        let chain = std::fs::read_to_string(self.dir.join(&leaf))?
            + &std::fs::read_to_string(self.dir.join(format!("{ca}.crt")))?;
        std::fs::write(self.dir.join(format!("{name}.crt")), chain)?;
        Ok((
            self.dir.join(format!("{name}.crt")),
            self.dir.join(key_file),
        ))
    }
}

impl Pki {
    /// Copies leaf `name`'s chain and key (made by [`Pki::leaf`]) to `cert` and `key`, the way an
    /// operator installs a certificate where Sluice reads it.
    pub fn copy_pair(&self, name: &str, cert: &Path, key: &Path) -> Result<()> {
        std::fs::copy(self.dir.join(format!("{name}.crt")), cert)?;
        std::fs::copy(self.dir.join(format!("{name}.key")), key)?;
        Ok(())
    }
}

/// A client that trusts only `ca` (PEM file) and reaches every host at 127.0.0.1:`port`.
pub fn tls_client(ca: &Path, hosts: &[&str], port: u16) -> Result<reqwest::ClientBuilder> {
    let pem = std::fs::read(ca)?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    for host in hosts {
        builder = builder.resolve(host, SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Ok(builder)
}

/// A TLS connection to 127.0.0.1:`port` for `server_name`, trusting only `ca` (PEM file) and
/// offering `alpn` (rustls, as a real client).
pub async fn tls_connect(
    ca: &Path,
    server_name: &str,
    port: u16,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from(server_name.to_string())?,
                tcp,
            )
            .await?,
    )
}

/// `name{labels} value` lines of a Prometheus text exposition, labels as a sorted map.
pub fn samples(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
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
