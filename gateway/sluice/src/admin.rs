//! The admin HTTP API on `GatewaySettings.spec.admin.address` (127.0.0.1:9901 by default).
//!
//! Open: `GET /healthz` (process alive), `GET /readyz` (config loaded, listeners bound, not
//! draining), `GET /metrics` (Prometheus). Behind a bearer token: `GET /api/v1/status`,
//! `POST /api/v1/reload`, `POST /api/v1/acme/renew?host=HOST`. The optional health port serves only the two health endpoints.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use log::{error, info};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::reload::Reloader;
use crate::state::Live;

#[derive(Clone)]
struct AdminState {
    live: Arc<Live>,
    reloader: Arc<Reloader>,
    token: Arc<str>,
}

pub struct AdminService {
    pub live: Arc<Live>,
    pub reloader: Arc<Reloader>,
    pub token: Arc<str>,
}

fn health_routes() -> Router<Arc<Live>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
}

async fn readyz(State(live): State<Arc<Live>>) -> Response {
    if live.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if live.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n").into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    state
        .live
        .metrics
        .record_upstream_endpoints(&state.live.current().snapshot, &state.live.dns);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.live.metrics.render(),
    )
        .into_response()
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    token_matches(given.as_bytes(), token.as_bytes())
}

fn denied() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "admin API needs `Authorization: Bearer <token>` (see spec.admin.tokenFile)\n",
    )
        .into_response()
}

async fn status(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &state.token) {
        return denied();
    }
    let status = state.live.status();
    Json(serde_json::json!({
        "generation": status.generation,
        "reloadAttempts": status.reload_attempts,
        "lastReloadSuccessful": status.last_reload_successful,
        "lastError": status.last_error,
        "warnings": status.warnings,
        "files": status.files,
        "needsRestart": status.needs_restart,
        "ready": state.live.is_ready(),
        "draining": state.live.is_draining(),
                "inFlight": state.live.in_flight(),
        "acme": state.live.acme.status(),
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct RenewQuery {
    host: String,
}

/// `POST /api/v1/acme/renew?host=HOST`: order a new certificate now (after a key compromise, or
/// to try again without waiting out the backoff).
async fn acme_renew(
    State(state): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<RenewQuery>,
) -> Response {
    if !authorized(&headers, &state.token) {
        return denied();
    }
    let host = query.host.to_ascii_lowercase();
    if state
        .live
        .acme
        .force_renewal(&state.live.current().snapshot, &host)
    {
        (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"host": host, "renewal": "scheduled"})),
        )
            .into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            format!(
                "{host} is not served with an ACME certificate (credentialName: acme:<issuer>)\n"
            ),
        )
            .into_response()
    }
}

async fn reload(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &state.token) {
        return denied();
    }
    let reloader = state.reloader.clone();
    match tokio::task::spawn_blocking(move || reloader.reload("admin API", true)).await {
        Ok(Ok(generation)) => Json(serde_json::json!({"generation": generation})).into_response(),
        Ok(Err(errors)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({"error": errors})),
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "reload task failed\n").into_response(),
    }
}

/// How long to keep trying to bind: during a graceful upgrade the old process holds the admin and
/// health ports until it exits (only the proxy listeners are handed over).
const BIND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

async fn serve(addr: SocketAddr, app: Router, mut shutdown: ShutdownWatch, what: &str) {
    let started = std::time::Instant::now();
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < BIND_RETRY_FOR =>
            {
                if started.elapsed() < std::time::Duration::from_millis(50) {
                    info!("{what} address {addr} is in use (an upgrade in progress?); retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => return,
                }
            }
            Err(e) => {
                error!("cannot bind the {what} on {addr}: {e}");
                return;
            }
        }
    };
    info!("{what} listening on http://{addr}/");
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        error!("{what} stopped: {e}");
    }
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let settings = self.live.current().snapshot.settings.clone();
        let state = AdminState {
            live: self.live.clone(),
            reloader: self.reloader.clone(),
            token: self.token.clone(),
        };
        let admin = Router::new()
            .route("/metrics", get(metrics))
            .route("/api/v1/status", get(status))
            .route("/api/v1/reload", post(reload))
            .route("/api/v1/acme/renew", post(acme_renew))
            .with_state(state)
            .merge(health_routes().with_state(self.live.clone()));
        let health_port = settings.health_port.map(|port| {
            let app = health_routes().with_state(self.live.clone());
            let addr = SocketAddr::new(settings.bind_address, port);
            serve(addr, app, shutdown.clone(), "health port")
        });
        let admin = serve(settings.admin_address, admin, shutdown, "admin API");
        match health_port {
            Some(health) => {
                tokio::join!(admin, health);
            }
            None => admin.await,
        }
    }
}

/// Reads the admin token from `path`, creating it (mode 0600, 32 random bytes as hex) when missing.
pub fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.len() < 16 {
                anyhow::bail!(
                    "admin token in {} is shorter than 16 characters",
                    path.display()
                );
            }
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                log::warn!(
                    "admin token file {} is readable by others (mode {:o}): chmod 600 it",
                    path.display(),
                    mode & 0o777
                );
            }
            return Ok(token);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("reading admin token {}", path.display()));
        }
        Err(_) => {}
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom for the admin token")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Another replica starting at the same moment either sees no token or a whole one; if it wrote
    // one first, both use that.
    let written =
        crate::files::write_whole(path, token.as_bytes(), 0o600, crate::files::IfExists::Keep)
            .with_context(|| format!("creating admin token file {}", path.display()))?;
    if !written {
        return load_or_create_token(path);
    }
    info!("admin token written to {} (mode 0600)", path.display());
    Ok(token)
}
