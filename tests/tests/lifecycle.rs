//! Live operations: reloads that drop nothing, broken writes that change nothing, SIGHUP, listener
//! changes reported as needing a restart, SIGTERM draining and graceful upgrades, all under load.
//!
//! The tests in this file run one at a time: each drives steady load, and two loads at once on a
//! two-core machine would make the timing assertions measure the machine instead of Sluice.

use std::time::{Duration, Instant};

use sluice_tests::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Write `i` of the reload test: weights flip every write, an extra route comes and goes, and every
/// tenth write is broken (a negative weight).
fn reload_config(port: u16, backends: &str, i: usize) -> String {
    let (w1, w2) = if i.is_multiple_of(2) {
        (90, 10)
    } else {
        (10, 90)
    };
    let w1: i64 = if i % 10 == 9 { -1 } else { w1 };
    let extra = if i.is_multiple_of(3) {
        "  - match: [{uri: {prefix: /extra}}]\n    directResponse: {status: 200, body: {string: extra}}\n"
    } else {
        ""
    };
    format!(
        "{}{backends}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: load}}\n\
         spec:\n  hosts: [load.test]\n  gateways: [gw]\n  http:\n{extra}\
         \x20 - route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: {w1}}}\n\
         \x20   - {{destination: {{host: reviews, subset: v2}}, weight: {w2}}}\n",
        gateway_yaml(port, &["*"])
    )
}

#[tokio::test]
async fn a_hundred_rewrites_under_load_drop_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let backends = reviews_subsets_yaml(echo("v1").await?, echo("v2").await?);
    let gw = TestGateway::start(&reload_config(port, &backends, 0), &[port])?;
    let load = Load::start(gw.url("/"), "load.test", 32, Duration::from_secs(90));
    let started = Instant::now();
    let mut generation = 1;
    for i in 1..=100 {
        gw.write_config(&reload_config(port, &backends, i))?;
        let attempts = i as u64;
        if i % 10 == 9 {
            let status = gw
                .wait_for_status(Duration::from_secs(10), |s| {
                    s["reloadAttempts"].as_u64() >= Some(attempts)
                        && s["lastReloadSuccessful"] == false
                })
                .await?;
            assert_eq!(
                status["generation"], generation,
                "a broken write changed the generation"
            );
            let error = status["lastError"].as_str().unwrap_or("");
            assert!(
                error.contains("config.yaml:") && error.contains("weight -1"),
                "{error}"
            );
        } else {
            generation += 1;
            gw.wait_for_status(Duration::from_secs(10), |s| s["generation"] == generation)
                .await?;
        }
    }
    let report = load.finish().await;
    eprintln!(
        "reload under load: {} requests in {:?}, statuses {:?}, refused {}, errors {}",
        report.requests,
        started.elapsed(),
        report.statuses,
        report.refused,
        report.errors
    );
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.refused, 0);
    assert_eq!(report.non_2xx(), 0, "{:?}", report.statuses);
    assert!(
        report.requests > 1000,
        "too little load to mean anything: {report:?}"
    );
    let status = gw.status().await?;
    assert_eq!(status["generation"], 91);
    assert_eq!(status["lastReloadSuccessful"], true);
    let metrics = gw.metrics().await?;
    assert!(metrics.contains("sluice_config_generation 91"), "{metrics}");
    assert!(
        metrics.contains("sluice_config_reload_total{result=\"failure\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_config_last_reload_successful 1"),
        "{metrics}"
    );
    Ok(())
}

fn direct(port: u16, body: &str) -> String {
    gateway_yaml(port, &["*"])
        + &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: d}}\n\
             spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - directResponse: {{status: 200, body: {{string: {body}}}}}\n"
        )
}

async fn body(port: u16) -> anyhow::Result<String> {
    Ok(client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await?
        .text()
        .await?)
}

#[tokio::test]
async fn in_place_edits_and_sighup_reload() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let gw = TestGateway::start(&direct(port, "one"), &[port])?;
    assert_eq!(body(port).await?, "one");
    // Truncate and write in place, as some editors do.
    std::fs::write(
        gw.config_path(),
        TestGateway::fill(&direct(port, "two"), gw.dir.path(), gw.admin_port),
    )?;
    gw.wait_for_status(Duration::from_secs(10), |s| s["generation"] == 2)
        .await?;
    assert_eq!(body(port).await?, "two");
    // SIGHUP reloads even when nothing changed on disk.
    gw.signal("HUP")?;
    gw.wait_for_status(Duration::from_secs(10), |s| s["generation"] == 3)
        .await?;
    assert_eq!(body(port).await?, "two");
    Ok(())
}

#[tokio::test]
async fn busy_files_beside_the_config_do_not_reload_it() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let gw = TestGateway::start(&direct(port, "one"), &[port])?;
    // A log appended to on every request, and an editor's swap file: neither is config.
    let mut log = std::fs::File::create(gw.dir.path().join("requests.log"))?;
    for i in 0..2_000 {
        std::io::Write::write_all(&mut log, format!("request {i}\n").as_bytes())?;
    }
    drop(log);
    std::fs::write(gw.dir.path().join(".config.yaml.swp"), "swap")?;
    // Longer than a reload takes to start after the last event of a burst.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let unchanged = "config reload (file change): the files are unchanged";
    assert!(!gw.log().contains(unchanged), "{}", gw.log());
    // A YAML file beside it is looked at (it could be config), found to change nothing, and
    // logged: the absence above is not just a slow watcher.
    std::fs::write(gw.dir.path().join("notes.yaml"), "# not part of --config\n")?;
    let start = std::time::Instant::now();
    while !gw.log().contains(unchanged) {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.status().await?["generation"], 1, "{}", gw.log());
    // The watch still sees the config itself.
    gw.write_config(&direct(port, "two"))?;
    gw.wait_for_status(Duration::from_secs(10), |s| s["generation"] == 2)
        .await?;
    assert_eq!(body(port).await?, "two");
    Ok(())
}

#[tokio::test]
async fn a_new_listener_port_is_reported_as_needing_a_restart() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let new_port = free_port();
    let gw = TestGateway::start(&direct(port, "one"), &[port])?;
    let with_new_port = direct(port, "two").replace(
        "    hosts: [\"*\"]\n---",
        &format!("    hosts: [\"*\"]\n  - port: {{number: {new_port}, name: extra, protocol: HTTP}}\n    hosts: [\"*\"]\n---"),
    );
    gw.write_config(&with_new_port)?;
    let status = gw
        .wait_for_status(Duration::from_secs(10), |s| s["generation"] == 2)
        .await?;
    let needs = status["needsRestart"].to_string();
    assert!(
        needs.contains(&format!("listener port {new_port}")) && needs.contains("restart"),
        "{needs}"
    );
    // Everything else of the new config applies.
    assert_eq!(body(port).await?, "two");
    assert!(gw.log().contains(&format!("listener port {new_port}")));
    Ok(())
}

#[tokio::test]
async fn a_listener_port_already_taken_stops_the_start_naming_the_address() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        TestGateway::fill(&direct(port, "one"), dir.path(), free_port()),
    )?;
    let mut child = spawn_sluice(&config, dir.path(), false)?;
    // A few retries first: the port may be held by a process that is just exiting.
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let _ = child.kill();
    let log = std::fs::read_to_string(dir.path().join("sluice.log"))?;
    assert!(!status?.success(), "{log}");
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{log}"
    );
    drop(taken);
    Ok(())
}

async fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > timeout {
            anyhow::bail!("process still running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_then_exits_0_without_failing_accepted_requests() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let upstream = echo("app").await?;
    let yaml = gateway_yaml(port, &["*"]).replace("  threads: 1\n", "  threads: 1\n  drainSeconds: 1\n")
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app}\n\
           spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.svc}}]\n";
    let mut gw = TestGateway::start(&yaml, &[port])?;
    let ready = client().get(gw.admin_url("/readyz")).send().await?;
    assert_eq!(ready.status(), 200);
    let load = Load::start(gw.url("/"), "app.test", 16, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let signalled = Instant::now();
    gw.signal("TERM")?;
    let mut not_ready_after = None;
    while signalled.elapsed() < Duration::from_secs(1) {
        if let Ok(r) = client().get(gw.admin_url("/readyz")).send().await {
            if r.status() == 503 {
                not_ready_after = Some(signalled.elapsed());
                break;
            }
        }
    }
    let not_ready_after =
        not_ready_after.ok_or_else(|| anyhow::anyhow!("readyz never said 503"))?;

    // Draining still accepts new connections, and tells HTTP/1.1 clients to close.
    let fresh = reqwest::Client::new()
        .get(gw.url("/"))
        .header("host", "app.test")
        .send()
        .await?;
    assert_eq!(fresh.status(), 200);
    assert_eq!(fresh.headers()["connection"], "close");

    // A slow request that is still in flight when listeners close must finish.
    let slow_url = gw.url("/?sleep_ms=1500");
    let slow = tokio::spawn(async move {
        let response = client()
            .get(slow_url)
            .header("host", "app.test")
            .send()
            .await?;
        Ok::<_, reqwest::Error>((response.status().as_u16(), Instant::now()))
    });

    // A balancer checking readyz every 300 ms stops sending new requests by then.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish().await;

    let status = wait_exit(&mut gw.child, Duration::from_secs(15)).await?;
    let exited_after = signalled.elapsed();
    let (slow_status, slow_done) = slow.await??;
    eprintln!(
        "SIGTERM: readyz 503 after {not_ready_after:?}, slow request done after {:?}, exit after {exited_after:?}; \
         load {} requests, statuses {:?}, refused {}, errors {}",
        slow_done - signalled,
        report.requests,
        report.statuses,
        report.refused,
        report.errors
    );
    assert!(
        not_ready_after < Duration::from_millis(100),
        "readyz took {not_ready_after:?}"
    );
    assert_eq!(status.code(), Some(0), "log:\n{}", gw.log());
    assert_eq!(slow_status, 200);
    assert!(
        exited_after >= slow_done - signalled,
        "exited before the slow request finished"
    );
    assert!(
        exited_after >= Duration::from_secs(1),
        "exited before the drain period ended"
    );
    assert_eq!(
        (report.errors, report.refused),
        (0, 0),
        "{:?}",
        report.error_samples
    );
    assert_eq!(report.non_2xx(), 0, "{:?}", report.statuses);
    Ok(())
}

#[tokio::test]
async fn graceful_upgrade_under_load_fails_no_request() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let upstream = echo("app").await?;
    let yaml = gateway_yaml(port, &["*"])
        + &service_entry_yaml("app", "app.svc", &[(upstream, "")])
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app}\n\
           spec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.svc}}]\n";
    let mut old = TestGateway::start(&yaml, &[port])?;
    let load = Load::start(old.url("/"), "app.test", 16, Duration::from_secs(40));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut new = spawn_sluice(&old.config_path(), old.dir.path(), true)?;
    let socket = old.dir.path().join("upgrade.sock");
    let waiting = Instant::now();
    while !socket.exists() {
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(10),
            "new process never listened on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    old.signal("QUIT")?;
    let old_status = wait_exit(&mut old.child, Duration::from_secs(20)).await;
    // The new process keeps serving on the same sockets after the old one is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    let new_running = new.try_wait()?.is_none();
    let served_by_new = get(port, "app.test", "/")
        .await
        .map(|r| r.backend().to_string());
    let _ = new.kill();
    let _ = new.wait();
    eprintln!(
        "upgrade: {} requests, statuses {:?}, refused {}, errors {}",
        report.requests, report.statuses, report.refused, report.errors
    );
    assert_eq!(old_status?.code(), Some(0), "log:\n{}", old.log());
    assert!(new_running, "new process died; log:\n{}", old.log());
    assert_eq!(served_by_new?, "app");
    assert_eq!(
        report.refused, 0,
        "connections were refused during the upgrade"
    );
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.non_2xx(), 0, "{:?}", report.statuses);
    Ok(())
}

#[tokio::test]
async fn admin_api_needs_its_token_and_the_health_port_answers() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let health = free_port();
    let yaml = direct(port, "one").replace(
        "  threads: 1\n",
        &format!("  threads: 1\n  healthPort: {health}\n"),
    );
    let gw = TestGateway::start(&yaml, &[port, health])?;
    let token_file = gw.dir.path().join("certs/admin.token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file)?.permissions().mode() & 0o777,
        0o600
    );

    let c = client();
    let anonymous = c.get(gw.admin_url("/api/v1/status")).send().await?;
    assert_eq!(anonymous.status(), 401);
    let wrong = c
        .get(gw.admin_url("/api/v1/status"))
        .bearer_auth("not-the-token")
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    let status = gw.status().await?;
    assert_eq!(
        (status["generation"].as_u64(), status["ready"].as_bool()),
        (Some(1), Some(true))
    );

    // Forced reload through the API.
    let token = std::fs::read_to_string(&token_file)?;
    let reloaded: serde_json::Value = c
        .post(gw.admin_url("/api/v1/reload"))
        .bearer_auth(token.trim())
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(reloaded["generation"], 2);

    for (url, expected) in [
        (format!("http://127.0.0.1:{health}/healthz"), "ok\n"),
        (format!("http://127.0.0.1:{health}/readyz"), "ready\n"),
        (gw.admin_url("/healthz"), "ok\n"),
        (gw.admin_url("/readyz"), "ready\n"),
    ] {
        let r = c.get(&url).send().await?;
        assert_eq!(
            (r.status().as_u16(), r.text().await?),
            (200, expected.to_string()),
            "{url}"
        );
    }
    // The health port serves nothing else.
    let r = c
        .get(format!("http://127.0.0.1:{health}/api/v1/status"))
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    Ok(())
}
