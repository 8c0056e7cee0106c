//! The compiled snapshot: immutable routing tables built from a validated [`Model`].
//!
//! Third config type. Per listener port: a host table → virtual host → ordered routes → weighted
//! targets → clusters → endpoints. Everything a request needs is resolved here (cluster indices,
//! compiled matchers, cumulative weights), so the request path does hash lookups and comparisons,
//! never parsing or allocation for the common case. A snapshot never changes; reload builds a new one.

pub mod hosts;
pub mod request;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::model::{
    Action, Binding, EndpointAddress, Gateway, HeaderRules, HostPattern, HttpRoute, Model,
    RouteMatch, ServerProtocol, ServiceKey, Settings, UpstreamProtocol,
};
use crate::validate::labels_match;
pub use hosts::{host_of_authority, HostTable};
pub use request::{normalize_path, redirect_location, rewrite_path, RequestInfo};

/// The port a [`Listener`] serves and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerSpec {
    pub port: u16,
    pub protocol: ServerProtocol,
}

#[derive(Debug)]
pub struct Snapshot {
    pub settings: Settings,
    listeners: Vec<Listener>,
    clusters: Vec<Cluster>,
    dns_names: Vec<String>,
}

#[derive(Debug)]
pub struct Listener {
    pub spec: ListenerSpec,
    hosts: HostTable<usize>,
    virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Arc<Route>>,
}

/// One route as compiled for one Gateway: `match` blocks that name other gateways are dropped.
#[derive(Debug)]
pub struct Route {
    pub def: Arc<HttpRoute>,
    pub targets: Vec<Target>,
    total_weight: u32,
}

/// One weighted destination of a forwarding route.
#[derive(Debug)]
pub struct Target {
    pub cluster: usize,
    pub service: ServiceKey,
    pub headers: HeaderRules,
    /// Running sum of weights up to and including this target.
    cumulative: u32,
}

/// An upstream: one service port (and subset) with its endpoints.
#[derive(Debug)]
pub struct Cluster {
    pub key: ServiceKey,
    pub protocol: UpstreamProtocol,
    pub endpoints: Vec<UpstreamEndpoint>,
    next: AtomicUsize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamEndpoint {
    Addr(SocketAddr),
    /// `slot` indexes [`Snapshot::dns_names`]; the proxy keeps the resolved addresses.
    Dns {
        slot: usize,
        port: u16,
    },
}

/// The result of looking a request up.
#[derive(Debug)]
pub enum RouteLookup<'s> {
    NoListener,
    NoHost,
    NoRoute,
    Found {
        route: &'s Arc<Route>,
        /// Index of the `match` block that matched (`None` for a route without `match`).
        matched: Option<usize>,
    },
}

impl Snapshot {
    pub fn compile(model: &Model) -> Snapshot {
        Compiler::default().run(model)
    }

    pub fn listeners(&self) -> impl Iterator<Item = &Listener> {
        self.listeners.iter()
    }

    pub fn listener(&self, port: u16) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.spec.port == port)
    }

    pub fn cluster(&self, index: usize) -> Option<&Cluster> {
        self.clusters.get(index)
    }

    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    /// Host names the proxy must resolve by DNS, indexed by [`UpstreamEndpoint::Dns::slot`].
    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }

    pub fn route(&self, req: &RequestInfo<'_>) -> RouteLookup<'_> {
        match self.listener(req.port) {
            Some(listener) => listener.route(req),
            None => RouteLookup::NoListener,
        }
    }
}

impl Listener {
    pub fn route(&self, req: &RequestInfo<'_>) -> RouteLookup<'_> {
        let host = host_of_authority(req.authority);
        let Some(vhost) = self
            .hosts
            .lookup(host)
            .and_then(|i| self.virtual_hosts.get(*i))
        else {
            return RouteLookup::NoHost;
        };
        for route in &vhost.routes {
            if route.def.matches.is_empty() {
                return RouteLookup::Found {
                    route,
                    matched: None,
                };
            }
            if let Some(m) = route.def.matches.iter().position(|m| m.matches(req)) {
                return RouteLookup::Found {
                    route,
                    matched: Some(m),
                };
            }
        }
        RouteLookup::NoRoute
    }

    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.virtual_hosts
    }
}

impl Route {
    /// Picks a target at random in proportion to the weights (Istio: weight ÷ sum of weights).
    pub fn pick_target(&self) -> Option<usize> {
        match self.targets.len() {
            0 => None,
            1 => Some(0),
            _ => {
                let roll = fastrand::u32(..self.total_weight.max(1));
                self.targets.iter().position(|t| roll < t.cumulative)
            }
        }
    }

    /// The `match` block at `index`, as returned in [`RouteLookup::Found`].
    pub fn matched(&self, index: Option<usize>) -> Option<&RouteMatch> {
        self.def.matches.get(index?)
    }
}

impl Cluster {
    /// Round robin over the cluster's endpoints. The turn number is returned too, so that a DNS
    /// endpoint with several addresses can rotate over them with the same counter.
    pub fn next_endpoint(&self) -> Option<(UpstreamEndpoint, usize)> {
        if self.endpoints.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let endpoint = self.endpoints.get(turn % self.endpoints.len()).copied()?;
        Some((endpoint, turn / self.endpoints.len()))
    }
}

#[derive(Default)]
struct Compiler {
    listeners: Vec<(ListenerSpec, HostTable<usize>, Vec<VirtualHost>)>,
    clusters: Vec<Cluster>,
    cluster_index: HashMap<ServiceKey, usize>,
    dns_names: Vec<String>,
    dns_index: HashMap<String, usize>,
}

impl Compiler {
    fn run(mut self, model: &Model) -> Snapshot {
        // A VirtualService is added once per (port, host) for each gateway it binds to, so two
        // gateways sharing a port each contribute their own view of its routes.
        let mut seen: HashSet<(u16, HostPattern, usize, usize)> = HashSet::new();
        let gateways: HashMap<&str, &Gateway> =
            model.gateways.iter().map(|g| (g.id.as_str(), g)).collect();
        for (vs_index, vs) in model.virtual_services.iter().enumerate() {
            for (binding_index, binding) in vs.bindings.iter().enumerate() {
                match binding {
                    Binding::Gateway(gateway_id) => {
                        let routes = self.routes_for(model, &vs.http, gateway_id);
                        let Some(gateway) = gateways.get(gateway_id.as_str()) else {
                            continue;
                        };
                        for server in &gateway.servers {
                            let spec = ListenerSpec {
                                port: server.port,
                                protocol: server.protocol,
                            };
                            for server_host in
                                server.hosts.iter().filter(|h| h.admits(&vs.namespace))
                            {
                                for host in &vs.hosts {
                                    if let Some(served) = server_host.host.intersect(host) {
                                        if seen.insert((
                                            server.port,
                                            served.clone(),
                                            vs_index,
                                            binding_index,
                                        )) {
                                            self.add_routes(spec, &served, &routes);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Binding::Mesh => {
                        let Some(port) = model.settings.mesh_port else {
                            continue;
                        };
                        let routes = self.routes_for(model, &vs.http, "mesh");
                        let spec = ListenerSpec {
                            port,
                            protocol: ServerProtocol::Http,
                        };
                        for host in &vs.hosts {
                            for alias in mesh_aliases(host) {
                                if seen.insert((port, alias.clone(), vs_index, binding_index)) {
                                    self.add_routes(spec, &alias, &routes);
                                }
                            }
                        }
                    }
                }
            }
        }
        // Gateway servers with no VirtualService still listen (and answer 404), so a port that is
        // configured is always bound.
        for server in model.gateways.iter().flat_map(|g| &g.servers) {
            self.listener(ListenerSpec {
                port: server.port,
                protocol: server.protocol,
            });
        }
        if let Some(port) = model.settings.mesh_port {
            self.listener(ListenerSpec {
                port,
                protocol: ServerProtocol::Http,
            });
        }
        let mut listeners: Vec<Listener> = self
            .listeners
            .into_iter()
            .map(|(spec, hosts, virtual_hosts)| Listener {
                spec,
                hosts,
                virtual_hosts,
            })
            .collect();
        listeners.sort_by_key(|l| l.spec.port);
        Snapshot {
            settings: model.settings.clone(),
            listeners,
            clusters: self.clusters,
            dns_names: self.dns_names,
        }
    }

    fn listener(&mut self, spec: ListenerSpec) -> usize {
        match self
            .listeners
            .iter()
            .position(|(s, ..)| s.port == spec.port)
        {
            Some(i) => i,
            None => {
                self.listeners
                    .push((spec, HostTable::default(), Vec::new()));
                self.listeners.len() - 1
            }
        }
    }

    fn add_routes(&mut self, spec: ListenerSpec, host: &HostPattern, routes: &[Arc<Route>]) {
        let index = self.listener(spec);
        let (_, table, vhosts) = &mut self.listeners[index];
        let next = vhosts.len();
        let vhost_index = *table.get_or_insert_with(host, || next);
        if vhost_index == next {
            vhosts.push(VirtualHost {
                name: host.to_string(),
                routes: Vec::new(),
            });
        }
        if let Some(vhost) = vhosts.get_mut(vhost_index) {
            vhost.routes.extend(routes.iter().cloned());
        }
    }

    /// The VirtualService's routes as seen through one gateway (`match.gateways` applied).
    fn routes_for(
        &mut self,
        model: &Model,
        http: &[Arc<HttpRoute>],
        gateway: &str,
    ) -> Vec<Arc<Route>> {
        let mut out = Vec::new();
        for def in http {
            // Most routes do not name gateways in `match` and are shared as they are.
            let def = if def.matches.iter().any(|m| m.gateways.is_some()) {
                let mut own = HttpRoute::clone(def);
                own.matches.retain(|m| {
                    m.gateways
                        .as_ref()
                        .is_none_or(|g| g.iter().any(|name| name == gateway))
                });
                if own.matches.is_empty() {
                    continue;
                }
                Arc::new(own)
            } else {
                def.clone()
            };
            let mut targets = Vec::new();
            let mut cumulative = 0u32;
            if let Action::Forward(destinations) = &def.action {
                for d in destinations {
                    cumulative = cumulative.saturating_add(d.weight);
                    targets.push(Target {
                        cluster: self.cluster(model, &d.service),
                        service: d.service.clone(),
                        headers: d.headers.clone(),
                        cumulative,
                    });
                }
            }
            out.push(Arc::new(Route {
                def,
                targets,
                total_weight: cumulative,
            }));
        }
        out
    }

    fn cluster(&mut self, model: &Model, key: &ServiceKey) -> usize {
        if let Some(i) = self.cluster_index.get(key) {
            return *i;
        }
        let mut endpoints = Vec::new();
        let mut protocol = UpstreamProtocol::Http1;
        match model.services.get(&key.host) {
            Some(service) => {
                let port = service.ports.iter().find(|p| p.number == key.port);
                if let Some(Ok(p)) = port.map(|p| &p.http) {
                    protocol = *p;
                }
                let selector = key
                    .subset
                    .as_ref()
                    .and_then(|s| model.subsets.get(&(key.host.clone(), s.clone())));
                for e in &service.endpoints {
                    if selector.is_some_and(|sel| !labels_match(sel, &e.labels)) {
                        continue;
                    }
                    let endpoint_port = port
                        .and_then(|p| {
                            p.name
                                .as_ref()
                                .and_then(|n| e.ports.get(n))
                                .copied()
                                .or(p.target_port)
                        })
                        .unwrap_or(key.port);
                    endpoints.push(self.endpoint(&e.address, endpoint_port));
                }
            }
            None => {
                endpoints.push(self.endpoint(&EndpointAddress::Dns(key.host.clone()), key.port))
            }
        }
        let index = self.clusters.len();
        self.clusters.push(Cluster {
            key: key.clone(),
            protocol,
            endpoints,
            next: AtomicUsize::new(0),
        });
        self.cluster_index.insert(key.clone(), index);
        index
    }

    fn endpoint(&mut self, address: &EndpointAddress, port: u16) -> UpstreamEndpoint {
        match address {
            EndpointAddress::Ip(ip) => UpstreamEndpoint::Addr(SocketAddr::new(*ip, port)),
            EndpointAddress::Dns(name) => {
                let next = self.dns_names.len();
                let slot = *self.dns_index.entry(name.clone()).or_insert(next);
                if slot == next {
                    self.dns_names.push(name.clone());
                }
                UpstreamEndpoint::Dns { slot, port }
            }
        }
    }
}

/// In-cluster clients call a service by its short forms too (`reviews`, `reviews.default`,
/// `reviews.default.svc`); the mesh listener answers to all of them, as a sidecar does.
fn mesh_aliases(host: &HostPattern) -> Vec<HostPattern> {
    let mut out = vec![host.clone()];
    if let HostPattern::Exact(name) = host {
        if let Some(short) = name.strip_suffix(".svc.cluster.local") {
            out.push(HostPattern::Exact(format!("{short}.svc")));
            out.push(HostPattern::Exact(short.to_string()));
            if let Some((service, _namespace)) = short.split_once('.') {
                out.push(HostPattern::Exact(service.to_string()));
            }
        }
    }
    out
}

/// A summary line for `sluice validate` and logs.
pub fn summary(snapshot: &Snapshot) -> String {
    let vhosts: usize = snapshot
        .listeners
        .iter()
        .map(|l| l.virtual_hosts.len())
        .sum();
    // A route shared by several hosts (aliases, several VirtualService hosts) counts once.
    let routes = snapshot
        .listeners
        .iter()
        .flat_map(|l| &l.virtual_hosts)
        .flat_map(|v| &v.routes)
        .map(Arc::as_ptr)
        .collect::<HashSet<_>>()
        .len();
    let ports: Vec<String> = snapshot
        .listeners
        .iter()
        .map(|l| l.spec.port.to_string())
        .collect();
    format!(
        "{} listener(s) on port(s) {}, {vhosts} virtual host(s), {routes} route(s), {} cluster(s)",
        snapshot.listeners.len(),
        if ports.is_empty() {
            "none".to_string()
        } else {
            ports.join(", ")
        },
        snapshot.clusters.len()
    )
}
