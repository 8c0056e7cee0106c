//! Sluice's own document, `kind: GatewaySettings` (`apiVersion: sluice.dev/v1alpha1`): process-wide
//! settings that Istio's objects have no place for. Every key is optional.

use serde::Deserialize;

pub const KIND: &str = "GatewaySettings";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySettingsSpec {
    /// Address every Gateway server port binds on. Default `0.0.0.0`.
    #[serde(default)]
    pub bind_address: Option<String>,
    #[serde(default)]
    pub admin: Option<AdminSettings>,
    /// Where certificates live (relative paths are relative to the working directory). Default `certs`.
    #[serde(default)]
    pub certs_dir: Option<String>,
    /// A plain-HTTP listener for VirtualServices bound to `mesh` (no `gateways`): what in-cluster
    /// clients would reach through their sidecar in Istio. Off unless set.
    #[serde(default)]
    pub mesh_listener: Option<MeshListener>,
    /// How often DNS endpoints are resolved again, as an Istio duration (`5s`, `1m`). Default `5s`.
    #[serde(default)]
    pub dns_refresh_rate: Option<String>,
    /// Worker threads per listener. Default: the number of CPUs.
    #[serde(default)]
    pub threads: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminSettings {
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshListener {
    pub port: i64,
}
