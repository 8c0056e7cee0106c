//! Sluice: an edge gateway configured with Istio's objects, on Pingora.
//!
//! This crate is the I/O half of the data flow; `sluice-core` is the pure half.
//! ```text
//! cli ─▶ sluice_core::load_paths ─▶ Snapshot ─▶ state::Live (ArcSwap) ─▶ server (Pingora services)
//!                                                     │ load() per request
//!                                                     ▼
//!                                               proxy::GatewayProxy ─▶ upstream (dns)
//! ```

pub mod cli;
pub mod demo;
pub mod dns;
pub mod echo;
pub mod proxy;
pub mod server;
pub mod state;
