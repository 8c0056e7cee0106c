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

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
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
    child: Child,
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
}

impl TestGateway {
    /// Starts sluice with `yaml` (a multi-document config) and waits for `ports` to accept.
    pub fn start(yaml: &str, ports: &[u16]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("config.yaml"), yaml)?;
        let log = std::fs::File::create(dir.path().join("sluice.log"))?;
        let child = Command::new(sluice_bin()?)
            .args(["run", "--config"])
            .arg(dir.path().join("config.yaml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning sluice")?;
        let mut gateway = TestGateway {
            child,
            dir,
            ports: ports.to_vec(),
        };
        for port in ports {
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[0])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sluice.log")).unwrap_or_default()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        "apiVersion: sluice.dev/v1alpha1\nkind: GatewaySettings\nmetadata: {{name: sluice}}\n\
         spec: {{bindAddress: 127.0.0.1, threads: 1}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n\
         \x20 - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [{}]\n",
        hosts.join(", ")
    )
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
