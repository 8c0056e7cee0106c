//! The access log: one line per request, JSON by default or a `%FIELD%` format string.
//!
//! Requests never wait for the disk: lines go through a bounded channel to a writer task, and when
//! the channel is full (a slow or stuck disk) lines are dropped and counted in
//! `sluice_access_log_dropped_total`.

use std::io::Write;
use std::sync::Arc;

use async_trait::async_trait;
use log::warn;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sluice_core::model::AccessLog;
use tokio::sync::mpsc;

/// Lines waiting for the disk before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// How long the writer lets lines gather between writes: also the most a line waits for the disk.
const BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// What one line says about a request. Absent values print as `-`.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    pub client_address: Option<String>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'static str,
    pub status: u16,
    pub response_flags: &'static str,
    pub bytes_received: usize,
    pub bytes_sent: usize,
    pub duration_ms: f64,
    pub upstream_address: Option<String>,
    pub route: Option<&'a str>,
    pub destination: Option<String>,
    pub request_id: Option<&'a str>,
    pub trace_id: Option<&'a str>,
}

#[derive(Debug)]
pub struct AccessLogger {
    format: Option<String>,
    sender: mpsc::Sender<String>,
    dropped: prometheus::IntCounter,
}

impl AccessLogger {
    /// The logger and the service that writes its lines to `settings.path`.
    pub fn new(
        settings: &AccessLog,
        dropped: prometheus::IntCounter,
    ) -> (Arc<Self>, AccessLogWriter) {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let logger = Arc::new(Self {
            format: settings.format.clone(),
            sender,
            dropped,
        });
        let writer = AccessLogWriter {
            path: settings.path.clone(),
            receiver: tokio::sync::Mutex::new(receiver),
        };
        (logger, writer)
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let line = match &self.format {
            Some(format) => format_line(format, entry),
            None => json_line(entry),
        };
        if self.sender.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

fn or_dash(value: Option<&str>) -> &str {
    value.filter(|v| !v.is_empty()).unwrap_or("-")
}

fn field(name: &str, entry: &Entry<'_>, start_time: &str) -> String {
    match name {
        "START_TIME" => start_time.to_string(),
        "CLIENT_ADDRESS" => or_dash(entry.client_address.as_deref()).to_string(),
        "METHOD" => or_dash(Some(entry.method)).to_string(),
        "AUTHORITY" => or_dash(Some(entry.authority)).to_string(),
        "PATH" => or_dash(Some(entry.path)).to_string(),
        "PROTOCOL" => entry.protocol.to_string(),
        "STATUS" => entry.status.to_string(),
        "RESPONSE_FLAGS" => entry.response_flags.to_string(),
        "BYTES_RECEIVED" => entry.bytes_received.to_string(),
        "BYTES_SENT" => entry.bytes_sent.to_string(),
        "DURATION" => format!("{:.0}", entry.duration_ms),
        "UPSTREAM_ADDRESS" => or_dash(entry.upstream_address.as_deref()).to_string(),
        "ROUTE" => or_dash(entry.route).to_string(),
        "DESTINATION" => or_dash(entry.destination.as_deref()).to_string(),
        "REQUEST_ID" => or_dash(entry.request_id).to_string(),
        "TRACE_ID" => or_dash(entry.trace_id).to_string(),
        _ => "-".to_string(),
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Fills `%FIELD%` placeholders (validated when the config loaded).
fn format_line(format: &str, entry: &Entry<'_>) -> String {
    let start_time = now();
    let mut out = String::with_capacity(format.len() + 64);
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('%') {
            Some(end) => {
                out.push_str(&field(&after[..end], entry, &start_time));
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn json_line(entry: &Entry<'_>) -> String {
    serde_json::json!({
        "start_time": now(),
        "client_address": entry.client_address,
        "method": entry.method,
        "authority": entry.authority,
        "path": entry.path,
        "protocol": entry.protocol,
        "status": entry.status,
        "response_flags": entry.response_flags,
        "bytes_received": entry.bytes_received,
        "bytes_sent": entry.bytes_sent,
        "duration_ms": (entry.duration_ms * 1000.0).round() / 1000.0,
        "upstream_address": entry.upstream_address,
        "route": entry.route,
        "destination": entry.destination,
        "request_id": entry.request_id,
        "trace_id": entry.trace_id,
    })
    .to_string()
}

/// Writes queued lines to the log file, batching what is waiting into one write.
pub struct AccessLogWriter {
    path: std::path::PathBuf,
    receiver: tokio::sync::Mutex<mpsc::Receiver<String>>,
}

#[async_trait]
impl BackgroundService for AccessLogWriter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path);
        let mut file = match file {
            Ok(f) => std::io::BufWriter::with_capacity(64 * 1024, f),
            Err(e) => {
                warn!("access log {}: {e}; no access log", self.path.display());
                return;
            }
        };
        let mut receiver = self.receiver.lock().await;
        let mut batch = Vec::with_capacity(QUEUE);
        loop {
            let received = tokio::select! {
                n = receiver.recv_many(&mut batch, QUEUE) => n,
                _ = shutdown.changed() => 0,
            };
            if received == 0 {
                break;
            }
            // Blocking file I/O happens here, on the writer task, never on a request.
            let write = batch
                .drain(..)
                .try_for_each(|l| writeln!(file, "{l}"))
                .and_then(|_| file.flush());
            if let Err(e) = write {
                warn!("access log {}: {e}", self.path.display());
            }
            // Waking for every line would cost a context switch per request under load: let
            // lines gather for a moment (the queue holds far more than arrive meanwhile).
            tokio::select! {
                _ = tokio::time::sleep(BATCH_INTERVAL) => {}
                _ = shutdown.changed() => break,
            }
        }
        while let Ok(line) = receiver.try_recv() {
            let _ = writeln!(file, "{line}");
        }
        let _ = file.flush();
    }
}
