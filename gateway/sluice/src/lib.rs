//! Sluice: an edge gateway configured with Istio's objects, on Pingora.
//!
//! This crate is the I/O half of the data flow; `sluice-core` is the pure half.
//! ```text
//! cli ─▶ sluice_core::load_paths ─▶ Snapshot ─▶ state::Live (ArcSwap) ─▶ server (Pingora services)
//!            ▲ reload (files, SIGHUP, admin)                   │ load() per request
//!            └──────────────────────────────                  ▼
//!   proxy_protocol (client address) ─▶ proxy::GatewayProxy ─▶ upstream endpoint (static / dns)
//!   admin (health, status, metrics) · lifecycle (drain, upgrade) · dns (refresh)
//! ```

pub mod accept;
pub mod access_log;
pub mod acme;
pub mod admin;
pub mod cli;
pub mod demo;
pub mod dns;
pub mod echo;
pub mod files;
pub mod headers;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod replay_io;
pub mod server;
pub mod spans;
pub mod state;
pub mod tls;
pub mod upstream;
