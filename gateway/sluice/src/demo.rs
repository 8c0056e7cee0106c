//! `sluice demo`: a canary split working with no file to write.
//!
//! Two built-in echo backends (v1, v2) on ephemeral loopback ports, and a built-in config that sends
//! 90% of requests to v1 and 10% to v2. The config is ordinary YAML that goes through the same
//! load → validate → compile path as files on disk.

use std::net::SocketAddr;

use anyhow::{bail, Context};

pub const DEFAULT_PORT: u16 = 8080;

/// The demo config, with the two backend ports and the listen port filled in.
pub fn config(listen_port: u16, v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: GatewaySettings
metadata: {{name: sluice}}
spec:
  bindAddress: 127.0.0.1
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: demo-gateway}}
spec:
  servers:
  - port: {{number: {listen_port}, name: http, protocol: HTTP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [echo.demo.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - address: {v1_ip}
    ports: {{http: {v1_port}}}
    labels: {{version: v1}}
  - address: {v2_ip}
    ports: {{http: {v2_port}}}
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo}}
spec:
  host: echo.demo.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo}}
spec:
  hosts: ["*"]
  gateways: [demo-gateway]
  http:
  - route:
    - destination: {{host: echo.demo.local, subset: v1}}
      weight: 90
    - destination: {{host: echo.demo.local, subset: v2}}
      weight: 10
"#,
        v1_ip = v1.ip(),
        v1_port = v1.port(),
        v2_ip = v2.ip(),
        v2_port = v2.port(),
    )
}

/// Starts the backends on a background runtime (kept alive by leaking its handle into a thread) and
/// returns the demo config text.
pub fn start_backends(listen_port: u16) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("demo-backends".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("starting backend runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let any = SocketAddr::from(([127, 0, 0, 1], 0));
                let started = async {
                    let v1 = crate::echo::start("v1", any).await?;
                    let v2 = crate::echo::start("v2", any).await?;
                    Ok::<_, std::io::Error>((v1, v2))
                }
                .await;
                let _ = tx.send(started.map_err(anyhow::Error::from));
                std::future::pending::<()>().await;
            });
        })
        .context("starting demo backend thread")?;
    let (v1, v2) = match rx.recv() {
        Ok(result) => result?,
        Err(_) => bail!("demo backends did not start"),
    };
    Ok(config(listen_port, v1, v2))
}
