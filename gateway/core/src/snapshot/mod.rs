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

use crate::identity::{address_of, ByAddress};
use crate::model::{
    upstream_tls_for, Action, Binding, EndpointAddress, Gateway, HeaderOps, HeaderRules,
    HostPattern, HttpRoute, ListenerFamily, Model, Rewrite, RouteDestination, RouteMatch, Server,
    ServerTls, ServiceKey, Settings, StrMatch, TlsMode, UpstreamProtocol, UpstreamTls,
};
use crate::validate::labels_match;
pub use hosts::{host_of_authority, HostTable};
pub use request::{normalize_path, redirect_location, rewrite_path, RequestInfo};

/// The port a [`Listener`] serves and what it speaks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerSpec {
    pub port: u16,
    pub family: ListenerFamily,
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
    /// Hosts of plaintext servers with `tls.httpsRedirect`.
    https_redirect: HostTable<()>,
    /// Terminating servers and passthrough routes, by SNI (TLS listeners).
    pub tls: TlsTable,
    /// Routes of a TCP listener, first match first.
    pub tcp_routes: Vec<Arc<L4Route>>,
}

/// How a TLS listener treats each server name.
#[derive(Debug, Default)]
pub struct TlsTable {
    pub servers: Vec<TlsServer>,
    /// SNI → index into `servers`. A server for `*` also takes clients without (or with unknown) SNI.
    terminate: HostTable<usize>,
    /// SNI → passthrough routes, first match first.
    passthrough: HostTable<Vec<Arc<L4Route>>>,
}

/// A terminating (HTTPS) server of a TLS listener.
#[derive(Debug)]
pub struct TlsServer {
    /// `namespace/gateway servers[i]`, for logs.
    pub label: String,
    /// The server's `hosts`, as written (for per-host certificate metrics).
    pub hosts: Vec<String>,
    pub tls: ServerTls,
}

/// What to do with a TLS connection, decided from its ClientHello.
#[derive(Debug)]
pub enum TlsDecision<'s> {
    /// Terminate with the server at this index of [`TlsTable::servers`].
    Terminate(usize, &'s TlsServer),
    Passthrough(&'s Arc<L4Route>),
    /// No server or route for this name: refuse the handshake.
    Refuse,
}

impl TlsTable {
    /// The most specific name wins across both tables (an exact HTTPS host over a passthrough
    /// wildcard, and the reverse); on a tie, passthrough.
    pub fn decide(&self, sni: Option<&str>) -> TlsDecision<'_> {
        let name = sni.unwrap_or("");
        let passthrough = sni
            .and_then(|n| self.passthrough.lookup_ranked(n))
            .and_then(|(routes, rank)| routes.first().map(|route| (route, rank)));
        let terminate = self
            .terminate
            .lookup_ranked(name)
            .and_then(|(i, rank)| self.servers.get(*i).map(|server| (*i, server, rank)));
        match (passthrough, terminate) {
            (Some((route, p)), Some((_, _, t))) if p >= t => TlsDecision::Passthrough(route),
            (Some((route, _)), None) => TlsDecision::Passthrough(route),
            (_, Some((index, server, _))) => TlsDecision::Terminate(index, server),
            (None, None) => TlsDecision::Refuse,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.passthrough.is_empty()
    }
}

/// A TLS passthrough or TCP route: weighted destinations, no HTTP.
#[derive(Debug)]
pub struct L4Route {
    pub label: String,
    pub targets: Targets,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Arc<Route>>,
    /// The path guard of `routes[i]`, side by side: first-match over a host's routes rejects most
    /// of them here without following their pointers, and often accepts the one that matches. In
    /// a large config every route a request looks at is a cache miss or four (route, definition,
    /// match list, prefix).
    path_guards: Vec<PathGuard>,
}

/// One route as compiled for one Gateway: `match` blocks that name other gateways are dropped.
#[derive(Debug)]
pub struct Route {
    pub def: Arc<HttpRoute>,
    pub targets: Targets,
    /// Which parts of `def` a request needs, worked out once too: a route that only forwards
    /// reads nothing of its definition per request (in a large config, each part read is a cache
    /// miss). See the accessors on `Route`.
    uses: Uses,
}

#[derive(Debug, Clone, Copy)]
struct Uses {
    forward: bool,
    rewrite: bool,
    request_headers: bool,
    response_headers: bool,
}

impl Uses {
    fn of(route: &HttpRoute) -> Self {
        // Every field named, so a new kind of rewrite cannot be skipped by `Route::rewrite`.
        let Rewrite { uri, authority } = &route.rewrite;
        Uses {
            forward: matches!(route.action, Action::Forward(_)),
            rewrite: uri.is_some() || authority.is_some(),
            request_headers: !route.headers.request.is_empty(),
            response_headers: !route.headers.response.is_empty(),
        }
    }
}

/// The first bytes every path a route matches starts with (the common head of its `match` blocks'
/// case-sensitive `uri` exact or prefix values, at most 15 bytes): a necessary condition, checked
/// before the route itself. Empty when some block does not constrain the path that way.
///
/// Often it is the route's whole condition too (no `match`, or one block that is a short uri
/// prefix or exact value and nothing else): then the guard decides, and a request finds its route
/// without reading the route's definition, which in a large config is several cache misses.
#[derive(Debug, Clone, Copy)]
struct PathGuard {
    head: [u8; 15],
    len: u8,
    decides: Decides,
}

/// What passing a [`PathGuard`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decides {
    /// Only that the route may match: its `match` blocks must be checked.
    Nothing,
    /// The route matches (it has no `match` blocks).
    Always,
    /// Its one `match` block matches (a uri prefix, the guard's head).
    Prefix,
    /// Its one `match` block matches if the path is exactly the guard's head.
    Exact,
}

/// A path checked against a [`PathGuard`].
#[derive(Debug, PartialEq, Eq)]
enum Guarded {
    Rejected,
    /// The route matches, by this `match` block (`None`: the route has none).
    Matched(Option<usize>),
    /// The route's `match` blocks decide.
    Unsure,
}

impl PathGuard {
    const ANY: PathGuard = PathGuard {
        head: [0; 15],
        len: 0,
        decides: Decides::Nothing,
    };

    fn of(route: &HttpRoute) -> Self {
        let mut guard = Self::necessary(route);
        guard.decides = match route.matches.as_slice() {
            [] => Decides::Always,
            [only] => match only.uri_literal_only() {
                // The whole literal is in the guard (it is at most 15 bytes).
                Some((literal, exact)) if literal.len() == usize::from(guard.len) => {
                    if exact {
                        Decides::Exact
                    } else {
                        Decides::Prefix
                    }
                }
                _ => Decides::Nothing,
            },
            _ => Decides::Nothing,
        };
        guard
    }

    /// The head alone: what every path the route matches must start with.
    fn necessary(route: &HttpRoute) -> Self {
        let mut common: Option<&[u8]> = None;
        for m in &route.matches {
            let literal = match &m.uri {
                Some(StrMatch::Exact(s) | StrMatch::Prefix(s)) if !m.ignore_uri_case => {
                    s.as_bytes()
                }
                _ => return Self::ANY,
            };
            common = Some(match common {
                None => literal,
                Some(so_far) => {
                    let same = so_far
                        .iter()
                        .zip(literal)
                        .take_while(|(a, b)| a == b)
                        .count();
                    &so_far[..same]
                }
            });
        }
        let Some(common) = common else {
            return Self::ANY;
        };
        let mut guard = Self::ANY;
        let len = common.len().min(guard.head.len());
        guard.head[..len].copy_from_slice(&common[..len]);
        guard.len = len as u8;
        guard
    }

    fn check(&self, path: &str) -> Guarded {
        let head = &self.head[..usize::from(self.len)];
        if path.as_bytes().get(..head.len()) != Some(head) {
            return Guarded::Rejected;
        }
        match self.decides {
            Decides::Nothing => Guarded::Unsure,
            Decides::Always => Guarded::Matched(None),
            Decides::Prefix => Guarded::Matched(Some(0)),
            Decides::Exact if path.len() == head.len() => Guarded::Matched(Some(0)),
            Decides::Exact => Guarded::Rejected,
        }
    }
}

/// Weighted destinations, ready to pick from.
#[derive(Debug, Default)]
pub struct Targets {
    list: Vec<Target>,
    total_weight: u32,
}

impl Targets {
    /// Picks a target at random in proportion to the weights (Istio: weight ÷ sum of weights).
    pub fn pick(&self) -> Option<usize> {
        match self.list.len() {
            0 => None,
            1 => Some(0),
            _ => {
                let roll = fastrand::u32(..self.total_weight.max(1));
                self.list.iter().position(|t| roll < t.cumulative)
            }
        }
    }

    pub fn get(&self, index: usize) -> Option<&Target> {
        self.list.get(index)
    }

    /// One destination: Istio routes to its cluster directly, not through weighted clusters,
    /// which changes the order of header rules.
    pub fn is_single(&self) -> bool {
        self.list.len() == 1
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.list.iter()
    }
}

/// One weighted destination of a forwarding route.
#[derive(Debug)]
pub struct Target {
    pub cluster: usize,
    pub service: ServiceKey,
    /// Boxed, and only when there are rules (rarely): a request reads the target's cluster and
    /// rules, and in a large config each cache line of a target it reads is a miss.
    headers: Option<Box<HeaderRules>>,
    /// Running sum of weights up to and including this target.
    cumulative: u32,
}

impl Target {
    /// The destination's request header rules, when it has any.
    pub fn request_headers(&self) -> Option<&HeaderOps> {
        Some(&self.headers.as_ref()?.request).filter(|ops| !ops.is_empty())
    }

    /// The destination's response header rules, when it has any.
    pub fn response_headers(&self) -> Option<&HeaderOps> {
        Some(&self.headers.as_ref()?.response).filter(|ops| !ops.is_empty())
    }
}

/// An upstream: one service port (and subset) with its endpoints.
#[derive(Debug)]
pub struct Cluster {
    pub key: ServiceKey,
    pub protocol: UpstreamProtocol,
    /// TLS origination (`DestinationRule.trafficPolicy.tls`).
    pub tls: Option<UpstreamTls>,
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
    /// The host is served by a plaintext server with `httpsRedirect`.
    HttpsRedirect,
    Found {
        route: &'s Arc<Route>,
        /// Index of the `match` block that matched (`None` for a route without `match`).
        matched: Option<usize>,
    },
}

impl Snapshot {
    pub fn compile(model: &Model) -> Snapshot {
        Snapshot::compile_cached(model, &mut CompileCache::default())
    }

    /// [`Snapshot::compile`], reusing the routes `cache` holds from the previous compile where
    /// they came from the very same validated route; `cache` then holds this compile's.
    pub fn compile_cached(model: &Model, cache: &mut CompileCache) -> Snapshot {
        let previous = std::mem::take(&mut cache.virtual_services);
        let compiler = Compiler {
            built: ByAddress::with_capacity_and_hasher(previous.len(), Default::default()),
            previous,
            ..Compiler::default()
        };
        let (snapshot, built) = compiler.run(model);
        cache.virtual_services = built;
        snapshot
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
        let vhost = self.hosts.lookup_ranked(host);
        if !self.https_redirect.is_empty() {
            // A redirecting server wins unless a plaintext route serves the name more specifically.
            if let Some((_, redirect_rank)) = self.https_redirect.lookup_ranked(host) {
                if vhost.is_none_or(|(_, rank)| redirect_rank >= rank) {
                    return RouteLookup::HttpsRedirect;
                }
            }
        }
        let Some(vhost) = vhost.and_then(|(i, _)| self.virtual_hosts.get(*i)) else {
            return RouteLookup::NoHost;
        };
        for (route, guard) in vhost.routes.iter().zip(&vhost.path_guards) {
            match guard.check(req.path) {
                Guarded::Rejected => continue,
                Guarded::Matched(matched) => return RouteLookup::Found { route, matched },
                Guarded::Unsure => {}
            }
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
    /// The `match` block at `index`, as returned in [`RouteLookup::Found`].
    pub fn matched(&self, index: Option<usize>) -> Option<&RouteMatch> {
        self.def.matches.get(index?)
    }

    /// Whether the route forwards to its targets (else it redirects or answers itself).
    pub fn forwards(&self) -> bool {
        self.uses.forward
    }

    /// The route's `rewrite`, when it changes anything.
    pub fn rewrite(&self) -> Option<&Rewrite> {
        self.uses.rewrite.then(|| &self.def.rewrite)
    }

    /// The route's request header rules, when it has any.
    pub fn request_headers(&self) -> Option<&HeaderOps> {
        self.uses.request_headers.then(|| &self.def.headers.request)
    }

    /// The route's response header rules, when it has any.
    pub fn response_headers(&self) -> Option<&HeaderOps> {
        self.uses
            .response_headers
            .then(|| &self.def.headers.response)
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

/// What one compile leaves for the next (a reload): each VirtualService's routes as compiled for
/// each gateway it binds to. A VirtualService that is the same `Arc` as last time (see
/// [`ValidateCache`](crate::validate::ValidateCache)) keeps its compiled routes, which is nearly
/// all of them when one VirtualService of thousands changed; and the generation it replaces then
/// frees only what changed.
#[derive(Default)]
pub struct CompileCache {
    /// By the address of the VirtualService.
    virtual_services: ByAddress<CompiledVirtualService>,
}

struct CompiledVirtualService {
    /// Held so its address is not reused while cached.
    source: Arc<crate::model::VirtualService>,
    views: Vec<GatewayView>,
}

/// A VirtualService's routes as one gateway sees them (`match.gateways` applied).
struct GatewayView {
    gateway: String,
    routes: Arc<ViewRoutes>,
    /// The upstreams the routes name, by number: valid only while those numbers still name the
    /// same upstreams (they follow the order services are first used in, which an edit elsewhere
    /// can change).
    clusters: Vec<(usize, ServiceKey)>,
}

/// Routes with their path guards, worked out once with the routes and kept beside them: a reload
/// that reuses the routes copies the guards into its virtual hosts without reading the routes or
/// their definitions again.
struct ViewRoutes {
    routes: Vec<Arc<Route>>,
    guards: Vec<PathGuard>,
}

impl ViewRoutes {
    fn with_capacity(capacity: usize) -> Self {
        ViewRoutes {
            routes: Vec::with_capacity(capacity),
            guards: Vec::with_capacity(capacity),
        }
    }

    /// The only way in: `guards[i]` is always `routes[i]`'s.
    fn push(&mut self, route: Route) {
        self.guards.push(PathGuard::of(&route.def));
        self.routes.push(Arc::new(route));
    }
}

/// Records `(port, host)` in `seen`; false when it was there already. `seen` holds one binding's
/// few hosts, so a scan beats hashing.
fn first_time(seen: &mut Vec<(u16, HostPattern)>, port: u16, host: &HostPattern) -> bool {
    if seen.iter().any(|(p, h)| *p == port && h == host) {
        return false;
    }
    seen.push((port, host.clone()));
    true
}

#[derive(Default)]
struct Compiler {
    listeners: Vec<Listener>,
    clusters: Vec<Cluster>,
    cluster_index: HashMap<ServiceKey, usize>,
    dns_names: Vec<String>,
    dns_index: HashMap<String, usize>,
    previous: ByAddress<CompiledVirtualService>,
    built: ByAddress<CompiledVirtualService>,
}

impl Compiler {
    fn run(mut self, model: &Model) -> (Snapshot, ByAddress<CompiledVirtualService>) {
        let gateways: HashMap<&str, &Gateway> =
            model.gateways.iter().map(|g| (g.id.as_str(), g)).collect();
        // Every configured port is bound, even with nothing routed to it yet (it answers 404, or
        // refuses the TLS handshake), so a listener never appears or vanishes with a route.
        for gateway in &model.gateways {
            for (index, server) in gateway.servers.iter().enumerate() {
                self.server(gateway, index, server);
            }
        }
        if let Some(port) = model.settings.mesh_port {
            self.listener(port, ListenerFamily::PlainHttp);
        }
        // A VirtualService is added once per (port, host) for each gateway it binds to, so two
        // gateways sharing a port each contribute their own view of its routes.
        let mut seen: Vec<(u16, HostPattern)> = Vec::new();
        for vs in &model.virtual_services {
            for binding in &vs.bindings {
                seen.clear();
                match binding {
                    Binding::Gateway(gateway_id) => {
                        let Some(gateway) = gateways.get(gateway_id.as_str()) else {
                            continue;
                        };
                        let routes = self.routes_for(model, vs, gateway_id);
                        for server in &gateway.servers {
                            let http = match (server.protocol.family(), &server.tls) {
                                (ListenerFamily::PlainHttp, _) => true,
                                (ListenerFamily::Tls, Some(tls)) => {
                                    tls.mode != TlsMode::Passthrough
                                }
                                _ => false,
                            };
                            for server_host in
                                server.hosts.iter().filter(|h| h.admits(&vs.namespace))
                            {
                                for host in &vs.hosts {
                                    let Some(served) = server_host.host.intersect(host) else {
                                        continue;
                                    };
                                    if !http || !first_time(&mut seen, server.port, &served) {
                                        continue;
                                    }
                                    if server.https_redirect {
                                        // Istio requires TLS on every virtual host of such a
                                        // server: its routes are never served in plaintext, and
                                        // each name it routes redirects at that name's rank.
                                        self.listener(server.port, ListenerFamily::PlainHttp)
                                            .https_redirect
                                            .get_or_insert_with(&served, || ());
                                    } else {
                                        self.add_routes(
                                            server.port,
                                            server.protocol.family(),
                                            &served,
                                            &routes,
                                        );
                                    }
                                }
                            }
                            self.layer4_routes(model, vs, gateway_id, server);
                        }
                    }
                    Binding::Mesh => {
                        let Some(port) = model.settings.mesh_port else {
                            continue;
                        };
                        let routes = self.routes_for(model, vs, "mesh");
                        for host in &vs.hosts {
                            for alias in mesh_aliases(host) {
                                if first_time(&mut seen, port, &alias) {
                                    self.add_routes(
                                        port,
                                        ListenerFamily::PlainHttp,
                                        &alias,
                                        &routes,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut listeners = self.listeners;
        listeners.sort_by_key(|l| l.spec.port);
        let snapshot = Snapshot {
            settings: model.settings.clone(),
            listeners,
            clusters: self.clusters,
            dns_names: self.dns_names,
        };
        (snapshot, self.built)
    }

    /// Registers what a server itself contributes: its listener, https redirects, TLS termination.
    fn server(&mut self, gateway: &Gateway, index: usize, server: &Server) {
        let listener = self.listener(server.port, server.protocol.family());
        if server.https_redirect {
            for host in &server.hosts {
                listener
                    .https_redirect
                    .get_or_insert_with(&host.host, || ());
            }
        }
        if let Some(tls) = server
            .tls
            .as_ref()
            .filter(|t| t.mode != TlsMode::Passthrough)
        {
            let next = listener.tls.servers.len();
            listener.tls.servers.push(TlsServer {
                label: format!("{} servers[{index}]", gateway.id),
                hosts: server.hosts.iter().map(|h| h.host.to_string()).collect(),
                tls: tls.clone(),
            });
            for host in &server.hosts {
                // The first server written for a name keeps it.
                listener
                    .tls
                    .terminate
                    .get_or_insert_with(&host.host, || next);
            }
        }
    }

    fn listener(&mut self, port: u16, family: ListenerFamily) -> &mut Listener {
        let index = match self.listeners.iter().position(|l| l.spec.port == port) {
            Some(i) => i,
            None => {
                self.listeners.push(Listener {
                    spec: ListenerSpec { port, family },
                    hosts: HostTable::default(),
                    virtual_hosts: Vec::new(),
                    https_redirect: HostTable::default(),
                    tls: TlsTable::default(),
                    tcp_routes: Vec::new(),
                });
                self.listeners.len() - 1
            }
        };
        &mut self.listeners[index]
    }

    fn add_routes(
        &mut self,
        port: u16,
        family: ListenerFamily,
        host: &HostPattern,
        routes: &ViewRoutes,
    ) {
        let listener = self.listener(port, family);
        let next = listener.virtual_hosts.len();
        let vhost_index = *listener.hosts.get_or_insert_with(host, || next);
        if vhost_index == next {
            listener.virtual_hosts.push(VirtualHost {
                name: host.to_string(),
                routes: Vec::new(),
                path_guards: Vec::new(),
            });
        }
        if let Some(vhost) = listener.virtual_hosts.get_mut(vhost_index) {
            vhost.routes.extend(routes.routes.iter().cloned());
            vhost.path_guards.extend_from_slice(&routes.guards);
        }
    }

    /// A VirtualService's `tls` routes on a passthrough server, and `tcp` routes on a TCP server.
    fn layer4_routes(
        &mut self,
        model: &Model,
        vs: &crate::model::VirtualService,
        gateway: &str,
        server: &Server,
    ) {
        let gateway_ok = |gateways: &Option<Vec<String>>| {
            gateways
                .as_ref()
                .is_none_or(|g| g.iter().any(|name| name == gateway))
        };
        let port_ok = |port: Option<u16>| port.is_none_or(|p| p == server.port);
        let passthrough = server
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == TlsMode::Passthrough);
        if passthrough {
            for route in &vs.tls {
                let compiled = Arc::new(L4Route {
                    label: route.label.clone(),
                    targets: self.targets(model, &route.destinations),
                });
                for m in route
                    .matches
                    .iter()
                    .filter(|m| gateway_ok(&m.gateways) && port_ok(m.port))
                {
                    for server_host in server.hosts.iter().filter(|h| h.admits(&vs.namespace)) {
                        for sni in &m.sni_hosts {
                            if let Some(served) = server_host.host.intersect(sni) {
                                let listener = self.listener(server.port, ListenerFamily::Tls);
                                listener
                                    .tls
                                    .passthrough
                                    .get_or_insert_with(&served, Vec::new)
                                    .push(compiled.clone());
                            }
                        }
                    }
                }
            }
        }
        if server.protocol.family() == ListenerFamily::Tcp {
            let admitted = server.hosts.iter().any(|h| h.admits(&vs.namespace));
            for route in vs.tcp.iter().filter(|_| admitted) {
                let applies = route.matches.is_empty()
                    || route
                        .matches
                        .iter()
                        .any(|m| gateway_ok(&m.gateways) && port_ok(m.port));
                if applies {
                    let compiled = Arc::new(L4Route {
                        label: route.label.clone(),
                        targets: self.targets(model, &route.destinations),
                    });
                    self.listener(server.port, ListenerFamily::Tcp)
                        .tcp_routes
                        .push(compiled);
                }
            }
        }
    }

    fn targets(&mut self, model: &Model, destinations: &[RouteDestination]) -> Targets {
        let mut list = Vec::with_capacity(destinations.len());
        let mut cumulative = 0u32;
        for d in destinations {
            cumulative = cumulative.saturating_add(d.weight);
            list.push(Target {
                cluster: self.cluster(model, &d.service),
                service: d.service.clone(),
                headers: (!d.headers.is_empty()).then(|| Box::new(d.headers.clone())),
                cumulative,
            });
        }
        Targets {
            list,
            total_weight: cumulative,
        }
    }

    /// The VirtualService's routes as seen through one gateway (`match.gateways` applied): from
    /// this compile or the previous one when they are still valid, otherwise built.
    fn routes_for(
        &mut self,
        model: &Model,
        vs: &Arc<crate::model::VirtualService>,
        gateway: &str,
    ) -> Arc<ViewRoutes> {
        let key = address_of(vs);
        if let Some(view) = self
            .built
            .get(&key)
            .and_then(|built| built.views.iter().find(|v| v.gateway == gateway))
        {
            return view.routes.clone();
        }
        let reusable = self.previous.get_mut(&key).and_then(|previous| {
            let index = previous.views.iter().position(|v| v.gateway == gateway)?;
            Arc::ptr_eq(&previous.source, vs).then(|| previous.views.swap_remove(index))
        });
        let view = match reusable {
            Some(view) if self.same_clusters(model, &view.clusters) => view,
            _ => self.build_view(model, &vs.http, gateway),
        };
        let routes = view.routes.clone();
        self.built
            .entry(key)
            .or_insert_with(|| CompiledVirtualService {
                source: vs.clone(),
                views: Vec::new(),
            })
            .views
            .push(view);
        routes
    }

    /// Whether each upstream number still names the same upstream in this compile (numbering the
    /// ones not met yet, in the order met, as building the routes would).
    fn same_clusters(&mut self, model: &Model, clusters: &[(usize, ServiceKey)]) -> bool {
        clusters
            .iter()
            .all(|(index, key)| match self.clusters.get(*index) {
                Some(cluster) => cluster.key == *key,
                None => self.cluster(model, key) == *index,
            })
    }

    fn build_view(&mut self, model: &Model, http: &[Arc<HttpRoute>], gateway: &str) -> GatewayView {
        let mut routes = ViewRoutes::with_capacity(http.len());
        let mut clusters: Vec<(usize, ServiceKey)> = Vec::new();
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
            let targets = match &def.action {
                Action::Forward(destinations) => self.targets(model, destinations),
                _ => Targets::default(),
            };
            for target in &targets.list {
                if !clusters.iter().any(|(index, _)| *index == target.cluster) {
                    clusters.push((target.cluster, target.service.clone()));
                }
            }
            let uses = Uses::of(&def);
            routes.push(Route { def, targets, uses });
        }
        GatewayView {
            gateway: gateway.to_string(),
            routes: Arc::new(routes),
            clusters,
        }
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
        let tls = upstream_tls_for(&model.upstream_tls, &key.host, key.subset.as_deref()).cloned();
        let index = self.clusters.len();
        self.clusters.push(Cluster {
            key: key.clone(),
            protocol,
            tls,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DirectResponse, Rewrite};

    fn route(matches: Vec<RouteMatch>) -> HttpRoute {
        HttpRoute {
            label: "test".into(),
            matches,
            action: Action::Respond(DirectResponse {
                status: 200,
                body: Vec::new(),
            }),
            rewrite: Rewrite::default(),
            headers: HeaderRules::default(),
        }
    }

    fn uri(m: StrMatch) -> RouteMatch {
        RouteMatch {
            uri: Some(m),
            ..RouteMatch::default()
        }
    }

    #[test]
    fn a_path_guard_never_contradicts_its_route() {
        let prefix = |s: &str| uri(StrMatch::Prefix(s.into()));
        let exact = |s: &str| uri(StrMatch::Exact(s.into()));
        let ignoring_case = RouteMatch {
            ignore_uri_case: true,
            ..prefix("/api/")
        };
        let regex = uri(StrMatch::Regex(regex::Regex::new("^/r[0-9]/$").unwrap()));
        let routes = [
            route(vec![]),
            route(vec![prefix("/r3/")]),
            route(vec![prefix("/api/v1/"), exact("/api/v2")]),
            route(vec![prefix("/a-prefix-longer-than-the-guard/")]),
            route(vec![prefix("/api/"), RouteMatch::default()]),
            route(vec![ignoring_case]),
            route(vec![regex, prefix("/r3/")]),
            route(vec![prefix("")]),
            route(vec![exact("/api/v2")]),
            route(vec![RouteMatch {
                method: Some(StrMatch::Exact("GET".into())),
                ..prefix("/r3/")
            }]),
            route(vec![RouteMatch {
                port: Some(8080),
                ..exact("/api/v2")
            }]),
            // At the guard's length and one past it.
            route(vec![exact("/fifteen-bytes/")]),
            route(vec![prefix("/fifteen-bytes/")]),
            route(vec![exact("/sixteen-bytes/x")]),
            route(vec![prefix("/sixteen-bytes/x")]),
            route(vec![exact("")]),
            route(vec![RouteMatch::default()]),
            // A two-byte character across the 15th byte.
            route(vec![prefix("/fourteen-byte\u{e9}/")]),
        ];
        let paths = [
            "/",
            "/r3/",
            "/r3/x",
            "/r4/",
            "/R3/",
            "/api/v1/a",
            "/api/v2",
            "/api/v3",
            "/API/x",
            "/a-prefix-longer-than-the-guard/x",
            "/a-prefix-longer-than-the-g",
            "",
            "/r1/",
            "/fifteen-bytes/",
            "/fifteen-bytes/x",
            "/fifteen-bytes",
            "/sixteen-bytes/x",
            "/sixteen-bytes/xy",
            "/sixteen-bytes/",
            "/fourteen-byte\u{e9}/a",
            "/fourteen-byte\u{e8}/a",
        ];
        let headers = http::HeaderMap::new();
        let req = |path| RequestInfo {
            method: "GET",
            scheme: "http",
            authority: "a.test",
            path,
            query: None,
            headers: &headers,
            port: 80,
        };
        let (mut rejected, mut decided) = (0, 0);
        for route in &routes {
            let guard = PathGuard::of(route);
            for path in paths {
                // What the route's own `match` blocks say: no match, or the first block that
                // matches (`Some(None)` for a route without blocks).
                let block = if route.matches.is_empty() {
                    Some(None)
                } else {
                    route
                        .matches
                        .iter()
                        .position(|m| m.matches(&req(path)))
                        .map(Some)
                };
                match guard.check(path) {
                    Guarded::Rejected => {
                        assert_eq!(block, None, "{path} rejected by the guard of {route:?}");
                        rejected += 1;
                    }
                    Guarded::Matched(matched) => {
                        assert_eq!(block, Some(matched), "{path} with the guard of {route:?}");
                        decided += 1;
                    }
                    Guarded::Unsure => {}
                }
            }
        }
        assert!(rejected > 20, "the guards reject little: {rejected}");
        assert!(decided > 25, "the guards decide little: {decided}");
        assert_eq!(PathGuard::of(&routes[11]).decides, Decides::Exact);
        assert_eq!(PathGuard::of(&routes[13]).decides, Decides::Nothing);
        // The common head of `/api/v1/` and `/api/v2` is `/api/v`: necessary, not sufficient.
        let api = PathGuard::of(&routes[2]);
        assert_eq!(api.check("/api/v9"), Guarded::Unsure);
        assert_eq!(api.check("/api/x"), Guarded::Rejected);
        // Conditions beyond the path leave the decision to the route.
        assert_eq!(PathGuard::of(&routes[9]).check("/r3/"), Guarded::Unsure);
        assert_eq!(PathGuard::of(&routes[10]).check("/api/v2"), Guarded::Unsure);
        assert_eq!(
            PathGuard::of(&routes[8]).check("/api/v2/"),
            Guarded::Rejected
        );
    }
}
