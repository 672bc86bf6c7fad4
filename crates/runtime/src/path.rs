//! Paths: the interfaces the client agent can send from, and connecting
//! out of a chosen one.
//!
//! A path is an interface name, optionally bound with `SO_BINDTODEVICE` (a
//! source address alone does not choose the egress interface on Linux) and a
//! source address. Paths come from the `[interfaces]` table of the client
//! configuration; without one the agent uses the host's routing as is,
//! through a single path called `default`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use baton_os::{IfaceAddr, InterfaceTable};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ClientConfig;
use crate::util::lock;

/// One way out of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Path {
    /// Interface name (as the user and `baton switch` name it).
    pub name: String,
    /// Device to bind to (`SO_BINDTODEVICE`), if any.
    pub device: Option<String>,
    /// Source address to bind to, if any.
    pub source: Option<IpAddr>,
}

/// A path and whether it is usable now.
#[derive(Debug, Clone, Serialize)]
pub struct PathStatus {
    /// The path.
    #[serde(flatten)]
    pub path: Path,
    /// Up (usable) or down.
    pub up: bool,
    /// Preference: lower first.
    pub priority: u32,
    /// Link kind, when the kernel told.
    pub kind: Option<baton_os::Kind>,
    /// Addresses, when the kernel told.
    pub addresses: Vec<String>,
}

#[derive(Debug)]
struct Entry {
    path: Path,
    up: bool,
    priority: u32,
    /// Fires when the path goes down: every connection on it is cut.
    cut: CancellationToken,
    /// The interface's addresses when last seen (kernel mode).
    addrs: BTreeSet<IfaceAddr>,
    /// The link kind, when the kernel told.
    kind: Option<baton_os::Kind>,
    /// The kernel's default-route metric, when known.
    metric: Option<u32>,
}

/// The client agent's paths, in order of preference.
#[derive(Debug)]
pub(crate) struct Paths {
    entries: Mutex<Vec<Entry>>,
    /// The user's attributes: a `never_use` interface is never a path, not
    /// even when the current one is lost.
    policy: baton_policy::PolicyConfig,
    changed: watch::Sender<u64>,
    /// Paths follow the kernel's interface table.
    pub(crate) kernel: bool,
}

/// The loopback device: a path only to a gateway on this host.
pub(crate) const LOOPBACK: &str = "lo";

impl Paths {
    pub(crate) fn from_config(config: &ClientConfig) -> Self {
        let mut entries: Vec<Entry> = config
            .interfaces
            .iter()
            .map(|(name, i)| Entry {
                path: Path {
                    name: name.clone(),
                    device: i.device.clone(),
                    source: i.source,
                },
                up: true,
                priority: i.priority,
                cut: CancellationToken::new(),
                addrs: BTreeSet::new(),
                kind: None,
                metric: None,
            })
            .collect();
        let kernel = entries.is_empty();
        let paths = Self {
            entries: Mutex::new(Vec::new()),
            policy: config.policy.clone(),
            changed: watch::channel(0).0,
            kernel,
        };
        paths.sort(&mut entries);
        *lock(&paths.entries) = entries;
        paths
    }

    /// Without the kernel's table (no netlink): the host's routing as is.
    pub(crate) fn fall_back_to_default(&self) {
        let mut entries = lock(&self.entries);
        if entries.is_empty() {
            entries.push(Entry {
                path: Path {
                    name: "default".into(),
                    device: None,
                    source: None,
                },
                up: true,
                priority: 0,
                cut: CancellationToken::new(),
                addrs: BTreeSet::new(),
                kind: None,
                metric: None,
            });
            drop(entries);
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Follows a new kernel interface table: candidates become usable paths
    /// in metric order; an interface that goes down or loses an address has
    /// its connections cut (they were bound to what is gone).
    pub(crate) fn apply_table(&self, table: &InterfaceTable) {
        type Next = (Path, u32, BTreeSet<IfaceAddr>, baton_os::Kind, Option<u32>);
        let mut next: Vec<Next> = table
            .candidates()
            .into_iter()
            .map(|i| {
                let path = Path {
                    name: i.name.clone(),
                    device: Some(i.name.clone()),
                    source: None,
                };
                let metric = i.default_route_metric;
                (
                    path,
                    metric.unwrap_or(u32::MAX - 1),
                    i.addrs.iter().copied().collect(),
                    i.kind,
                    metric,
                )
            })
            .collect();
        if let Some(lo) = table.by_name(LOOPBACK) {
            let path = Path {
                name: LOOPBACK.into(),
                device: Some(LOOPBACK.into()),
                source: None,
            };
            next.push((
                path,
                u32::MAX,
                lo.addrs.iter().copied().collect(),
                lo.kind,
                None,
            ));
        }
        let mut entries = lock(&self.entries);
        let mut changed = false;
        for e in entries.iter_mut() {
            match next.iter().find(|(p, ..)| p.name == e.path.name) {
                Some((_, metric, addrs, kind, route)) => {
                    // A returning link's route may come after its address:
                    // the engine must hear of the metric too.
                    if e.metric != *route || e.kind != Some(*kind) {
                        changed = true;
                    }
                    e.kind = Some(*kind);
                    e.metric = *route;
                    let lost = e.addrs.difference(addrs).next().is_some();
                    if !e.up || lost {
                        if lost {
                            info!(interface = %e.path.name, "address gone: cutting its connections");
                            e.cut.cancel();
                            e.cut = CancellationToken::new();
                        }
                        changed = true;
                    }
                    e.up = true;
                    e.priority = *metric;
                    e.addrs = addrs.clone();
                }
                None if e.up => {
                    info!(interface = %e.path.name, "interface gone or down: cutting its connections");
                    e.up = false;
                    e.cut.cancel();
                    e.cut = CancellationToken::new();
                    changed = true;
                }
                None => {}
            }
        }
        for (path, metric, addrs, kind, route) in next {
            if !entries.iter().any(|e| e.path.name == path.name) {
                info!(interface = %path.name, metric, "interface usable");
                entries.push(Entry {
                    path,
                    up: true,
                    priority: metric,
                    cut: CancellationToken::new(),
                    addrs,
                    kind: Some(kind),
                    metric: route,
                });
                changed = true;
            }
        }
        self.sort(&mut entries);
        drop(entries);
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Orders the paths as the seed's start-up search (Figure 20) wants
    /// them: the user's priority, then interfaces that connect without user
    /// interaction, unmetered before metered, cheaper first, then the
    /// kernel's metric (or the configured priority), then the name.
    fn sort(&self, entries: &mut [Entry]) {
        let key = |e: &Entry| {
            let a = self
                .policy
                .attributes(&e.path.name, crate::decide::kind(e.kind));
            // The loopback device only reaches this host: always last.
            let lo = e.path.name == LOOPBACK;
            (
                lo,
                a.priority.unwrap_or(u32::MAX),
                a.needs_user_interaction,
                a.metered,
                (a.cost * 1000.0) as i64,
                e.priority,
            )
        };
        entries.sort_by(|a, b| {
            key(a)
                .cmp(&key(b))
                .then_with(|| a.path.name.cmp(&b.path.name))
        });
    }

    fn allowed(&self, e: &Entry) -> bool {
        e.up && !self
            .policy
            .attributes(&e.path.name, crate::decide::kind(e.kind))
            .never_use
    }

    /// Usable paths, preferred first.
    pub(crate) fn usable(&self) -> Vec<Path> {
        lock(&self.entries)
            .iter()
            .filter(|e| self.allowed(e))
            .map(|e| e.path.clone())
            .collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Path> {
        lock(&self.entries)
            .iter()
            .find(|e| e.path.name == name && self.allowed(e))
            .map(|e| e.path.clone())
    }

    pub(crate) fn is_usable(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The token that fires when `name` goes down. A connection set up just
    /// before its path went down takes its token after the cut: that token
    /// comes back already fired (decided under the same lock as `set_up`),
    /// so no connection outlives its path unnoticed.
    pub(crate) fn cut_token(&self, name: &str) -> CancellationToken {
        let entries = lock(&self.entries);
        match entries.iter().find(|e| e.path.name == name) {
            Some(e) if e.up => e.cut.clone(),
            _ => {
                let gone = CancellationToken::new();
                gone.cancel();
                gone
            }
        }
    }

    pub(crate) fn status(&self) -> Vec<PathStatus> {
        lock(&self.entries)
            .iter()
            .map(|e| PathStatus {
                path: e.path.clone(),
                up: e.up,
                priority: e.priority,
                kind: e.kind,
                addresses: e.addrs.iter().map(ToString::to_string).collect(),
            })
            .collect()
    }

    /// Marks a path up or down. Down cuts every connection on it at once.
    pub(crate) fn set_up(&self, name: &str, up: bool) -> Result<(), String> {
        let mut entries = lock(&self.entries);
        let e = entries
            .iter_mut()
            .find(|e| e.path.name == name)
            .ok_or_else(|| format!("no interface {name:?}"))?;
        if e.up != up {
            e.up = up;
            if !up {
                e.cut.cancel();
                e.cut = CancellationToken::new();
            }
            drop(entries);
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// The paths as the decision engine sees them. The loopback device only
    /// serves a gateway on this host and is left out.
    pub(crate) fn policy_table(&self) -> Vec<baton_policy::Interface> {
        let entries = lock(&self.entries);
        let only_loopback = entries.iter().all(|e| e.path.name == LOOPBACK);
        entries
            .iter()
            .filter(|e| e.path.name != LOOPBACK || only_loopback)
            .map(|e| baton_policy::Interface {
                name: e.path.name.clone(),
                kind: crate::decide::kind(e.kind),
                up: e.up,
                has_address: e.up,
                // Static interfaces: their priority stands in for the metric.
                route_metric: if self.kernel {
                    e.metric
                } else {
                    Some(e.priority)
                },
            })
            .collect()
    }

    /// A receiver that sees every change of the paths.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves when the set of paths changes.
    pub(crate) async fn changed(&self) {
        let mut rx = self.changed.subscribe();
        let _ = rx.changed().await;
    }
}

/// Connects to `target` out of `path`, within `timeout`; with `fast_open`,
/// by TCP Fast Open ([`baton_os::connect_via_with`]: returned at once
/// where a cookie is held, the first write riding in the SYN).
pub(crate) async fn connect_via(
    target: SocketAddr,
    path: &Path,
    timeout: Duration,
    fast_open: bool,
) -> std::io::Result<TcpStream> {
    // The loopback device reaches only this host, and this host is reached
    // only through it: refuse the pairs that could only time out.
    if path.device.is_some() && (path.name == LOOPBACK) != target.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{target} is not reachable through {}", path.name),
        ));
    }
    match baton_os::connect_via_with(
        target,
        path.device.as_deref(),
        path.source,
        timeout,
        fast_open,
    )
    .await
    {
        // Without CAP_NET_RAW a device cannot be bound: the routing table
        // then chooses the egress, which is right as long as the preferred
        // interface is also the kernel's preferred route.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && path.device.is_some() => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| warn!("{e}; sending through the routing table instead (run with CAP_NET_RAW to choose the interface)"));
            baton_os::connect_via_with(target, None, path.source, timeout, fast_open).await
        }
        r => r,
    }
}

/// Starts following the kernel's interface table: the first table is
/// applied before this returns (so the first connection attempt already has
/// its paths), then a task keeps `paths` in step until `stop`.
pub(crate) async fn follow_kernel(
    paths: std::sync::Arc<Paths>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let watcher = match baton_os::watch().await {
        Ok(w) => w,
        Err(e) => {
            warn!("cannot read the kernel's interface table ({e}); using the host's routing as is");
            paths.fall_back_to_default();
            return None;
        }
    };
    let mut tables = watcher.tables();
    paths.apply_table(&tables.borrow_and_update().clone());
    Some(tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                r = tables.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            let table = tables.borrow_and_update().clone();
            paths.apply_table(&table);
        }
    }))
}
