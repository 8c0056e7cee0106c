//! Prometheus metrics: one registry, handles created once and held in one struct.
//!
//! Served as text on the admin address at `/metrics`. This module owns Sluice's own operational
//! metrics; request metrics with Istio's names belong here too when they arrive.

use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reload_total: IntCounterVec,
    last_reload_successful: IntGauge,
    generation: IntGauge,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let reload_total = IntCounterVec::new(
            Opts::new(
                "sluice_config_reload_total",
                "Config reloads by result (success|failure).",
            ),
            &["result"],
        )?;
        let last_reload_successful = IntGauge::new(
            "sluice_config_last_reload_successful",
            "1 if the last config reload was applied, 0 if it was rejected.",
        )?;
        let generation = IntGauge::new(
            "sluice_config_generation",
            "Number of the config generation currently serving.",
        )?;
        registry.register(Box::new(reload_total.clone()))?;
        registry.register(Box::new(last_reload_successful.clone()))?;
        registry.register(Box::new(generation.clone()))?;
        // Both label values exist from the start so rate() queries see zeros, not gaps.
        reload_total.with_label_values(&["success"]);
        reload_total.with_label_values(&["failure"]);
        Ok(Self {
            registry,
            reload_total,
            last_reload_successful,
            generation,
        })
    }
    /// Records a reload attempt. The initial load counts as a successful reload of generation 1.
    pub fn record_reload(&self, success: bool, generation: u64) {
        let result = if success { "success" } else { "failure" };
        self.reload_total.with_label_values(&[result]).inc();
        self.last_reload_successful.set(i64::from(success));
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
