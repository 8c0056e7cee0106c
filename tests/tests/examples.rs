//! Our users' Istio configs (configs/examples/istio-users, unchanged) load and route with Istio's
//! semantics; the built-in demo works from its one command.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_tests::*;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/examples/istio-users")
        .join(name)
}

/// Starts v1/v2 echo upstreams and sluice with `example` plus a ServiceEntry for serviceA and a mesh
/// listener, then counts which version answers 400 requests for `Host: serviceA`.
async fn route_example(
    name: &str,
    extra: &str,
) -> anyhow::Result<(HashMap<String, usize>, String)> {
    let (v1, v2) = (echo("v1").await?, echo("v2").await?);
    let mesh_port = free_port();
    let mut yaml = settings_yaml(&format!("  meshListener: {{port: {mesh_port}}}\n"));
    yaml += &service_entry_yaml(
        "servicea",
        "serviceA.default.svc.cluster.local",
        &[(v1, "version: v1"), (v2, "version: v2")],
    );
    yaml += "---\n";
    yaml += &std::fs::read_to_string(example(name))?;
    yaml += extra;
    let gw = TestGateway::start(&yaml, &[mesh_port])?;
    let c = client();
    let mut counts = HashMap::new();
    for i in 0..400 {
        // In-cluster clients use every form of the name; the mesh listener answers to all.
        let host = [
            "serviceA",
            "servicea.default",
            "serviceA.default.svc.cluster.local",
        ][i % 3];
        let r = send(
            c.get(format!("http://127.0.0.1:{mesh_port}/"))
                .header("host", host),
        )
        .await?;
        *counts.entry(r.backend().to_string()).or_insert(0) += 1;
    }
    let dir = gw.dir.path().to_path_buf();
    let output = validate(&[&dir.join("config.yaml")])?;
    Ok((counts, String::from_utf8_lossy(&output.stdout).into_owned()))
}

#[tokio::test]
async fn two_single_destination_rules_send_everything_to_the_first_and_warn() -> anyhow::Result<()>
{
    let (counts, validate) = route_example("split-serviceA.yaml", "").await?;
    assert_eq!(counts.get("v1"), Some(&400), "{counts:?}");
    assert!(
        validate.contains("warning: `spec.http[1]` is unreachable: `spec.http[0]` before it matches every request"),
        "{validate}"
    );
    Ok(())
}

#[tokio::test]
async fn the_fixed_split_sends_half_to_each_version() -> anyhow::Result<()> {
    // The fixed file replaces only the VirtualService; the DestinationRule stays the one from
    // split-serviceA.yaml, as in the users' cluster.
    let original = std::fs::read_to_string(example("split-serviceA.yaml"))?;
    let rule = original.split("---\n").nth(1).unwrap_or_default();
    let (counts, _) = route_example("split-serviceA-fixed.yaml", &format!("\n---\n{rule}")).await?;
    let v2 = counts.get("v2").copied().unwrap_or(0);
    assert!((160..=240).contains(&v2), "{counts:?}");
    Ok(())
}

#[tokio::test]
async fn release_step_one_sends_all_to_v1() -> anyhow::Result<()> {
    let (counts, _) = route_example("release-serviceA-v2.yaml", "").await?;
    assert_eq!(counts.get("v1"), Some(&400), "{counts:?}");
    Ok(())
}

#[test]
fn mesh_bound_virtual_services_are_reported_when_no_mesh_listener_exists() -> anyhow::Result<()> {
    let entry =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/examples/serviceA-endpoints.yaml");
    let dir = tempfile::tempdir()?;
    // The same ServiceEntry without the settings document (and so without a mesh listener).
    let text = std::fs::read_to_string(&entry)?;
    let without_settings = text.split("---\n").nth(1).unwrap_or_default();
    let entry_only = dir.path().join("entry.yaml");
    std::fs::write(&entry_only, without_settings)?;
    let output = validate(&[&example("split-serviceA.yaml"), &entry_only])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("split-serviceA.yaml:6:3: warning: VirtualService `default/serviceA` is not bound to any Gateway server"),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn the_demo_serves_a_90_10_split_from_one_command() -> anyhow::Result<()> {
    let port = free_port();
    // The demo writes its admin token under ./certs: keep that out of the source tree.
    let cwd = tempfile::tempdir()?;
    let mut child = Command::new(sluice_bin()?)
        .current_dir(cwd.path())
        .args(["demo", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let outcome = (|| -> anyhow::Result<()> {
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(15))?;
        let runtime = tokio::runtime::Runtime::new()?;
        let counts = runtime.block_on(async {
            let c = client();
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..1000 {
                let r = send(c.get(format!("http://127.0.0.1:{port}/"))).await?;
                *counts.entry(r.backend().to_string()).or_insert(0) += 1;
            }
            Ok::<_, anyhow::Error>(counts)
        })?;
        let v2 = counts.get("v2").copied().unwrap_or(0);
        assert!((60..=140).contains(&v2), "{counts:?}");
        Ok(())
    })();
    let _ = child.kill();
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{port}/")),
        "{stdout}"
    );
    assert!(stdout.contains("curl"), "{stdout}");
    outcome
}
