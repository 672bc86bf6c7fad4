//! The gateway's own addresses, followed in the kernel's interface table
//! (`baton_os::watch`, the same watcher the client agent uses).
//!
//! Two things come of it (seed 003):
//! - **Dynamic addresses.** A gateway listening on a wildcard (`0.0.0.0`,
//!   `[::]`) without `advertise` announces the host's usable addresses on
//!   the wildcard's port, and announces again whenever they change: an
//!   address added, removed or deprecated, an interface up or down.
//! - **Its own check of an address it is about to lose.** An address that
//!   goes away, becomes deprecated (preferred lifetime over) or whose
//!   interface goes down: every session whose control connection is on it
//!   gets a go-to that lets the client agent choose another address. A
//!   deprecated address still works, so the go-to arrives before it goes
//!   and the session moves make before break. A removed address or a downed
//!   interface usually cannot carry the go-to any more: the client agent
//!   then finds its path dead and roams on its own (the address is the
//!   suspect), resuming every stream from the replay buffers.
//!
//! Probes and datagrams to a specific address must be answered from that
//! address (the agent's probe socket is connected to it), which a wildcard
//! UDP socket does not do: each such address gets a UDP socket of its own,
//! bound beside the wildcard one (both with `SO_REUSEADDR`; the kernel
//! hands a datagram to the socket bound to its destination).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use baton_os::{InterfaceTable, Kind};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{answer_probes, multihome, Shared};
use crate::util::lock;

/// How long a go-to for an address being lost waits for the sessions to
/// arrive elsewhere before it only logs those that did not.
const LOSS_WAIT: Duration = Duration::from_secs(10);

/// One address of the host as the gateway's status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostAddrStatus {
    /// The address.
    pub addr: IpAddr,
    /// Its interface.
    pub interface: String,
    /// Whether it can be used.
    pub state: HostAddrState,
}

/// Whether one of the host's addresses can be used; shown in lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum HostAddrState {
    /// Usable, and advertised when a wildcard `listen` address covers it.
    Preferred,
    /// Its preferred lifetime is over: it still works, new sessions should
    /// go elsewhere.
    Deprecated,
    /// Its interface is down.
    Down,
}

/// What the gateway knows of the host's addresses.
#[derive(Debug, Default)]
pub(super) struct HostView {
    /// The watcher runs (the key is on and rtnetlink answered).
    pub(super) watching: bool,
    /// Every address of every interface, loopback and link-local included,
    /// in interface order.
    pub(super) addrs: Vec<HostAddrStatus>,
    /// Per-address UDP sockets beside a wildcard one, and what stops each.
    probe_sockets: HashMap<SocketAddr, CancellationToken>,
}

impl HostView {
    /// The addresses a wildcard `listen` address stands for: the usable
    /// (preferred, interface up) addresses of its family, loopback and
    /// link-local left out unless the host has no other (a gateway on
    /// loopback only, as in tests), on its port.
    pub(super) fn expand(&self, wildcard: SocketAddr) -> Vec<SocketAddr> {
        let fit: Vec<&HostAddrStatus> = self
            .addrs
            .iter()
            .filter(|a| {
                a.state == HostAddrState::Preferred && a.addr.is_ipv4() == wildcard.is_ipv4()
            })
            .collect();
        let outside: Vec<SocketAddr> = fit
            .iter()
            .filter(|a| !a.addr.is_loopback() && !is_link_local(a.addr))
            .map(|a| SocketAddr::new(a.addr, wildcard.port()))
            .collect();
        if !outside.is_empty() {
            return outside;
        }
        fit.iter()
            .filter(|a| a.addr.is_loopback())
            .map(|a| SocketAddr::new(a.addr, wildcard.port()))
            .collect()
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The host's addresses in a table, with their state, by interface index.
pub(super) fn addresses(table: &InterfaceTable) -> Vec<HostAddrStatus> {
    let mut out = Vec::new();
    for iface in table.interfaces.values() {
        for a in &iface.addrs {
            let state = if !iface.up && iface.kind != Kind::Loopback {
                HostAddrState::Down
            } else if iface.deprecated.contains(a) {
                HostAddrState::Deprecated
            } else {
                HostAddrState::Preferred
            };
            out.push(HostAddrStatus {
                addr: a.addr,
                interface: iface.name.clone(),
                state,
            });
        }
    }
    out
}

/// The addresses that were preferred in `before` and are not any more in
/// `after`, each with why: the address about to be lost, or already gone.
pub(super) fn losing(before: &[HostAddrStatus], after: &[HostAddrStatus]) -> Vec<(IpAddr, String)> {
    before
        .iter()
        .filter(|b| b.state == HostAddrState::Preferred)
        .filter_map(|b| match after.iter().find(|a| a.addr == b.addr) {
            None => Some((b.addr, format!("removed from {}", b.interface))),
            Some(a) if a.state == HostAddrState::Deprecated => {
                Some((b.addr, format!("deprecated on {}", a.interface)))
            }
            Some(a) if a.state == HostAddrState::Down => {
                Some((b.addr, format!("interface {} down", a.interface)))
            }
            Some(_) => None,
        })
        .collect()
}

/// Starts following the host's addresses, if the configuration asks for it.
pub(super) async fn start(shared: &Arc<Shared>) {
    if !shared.config.watch_addresses {
        return;
    }
    let watcher = match baton_os::watch().await {
        Ok(w) => w,
        Err(e) => {
            warn!("cannot follow the host's addresses (rtnetlink: {e}): advertising the listen addresses only, and no go-to when an address goes");
            return;
        }
    };
    let first = addresses(&watcher.table());
    {
        let mut v = lock(&shared.host);
        v.watching = true;
        v.addrs = first;
    }
    info!(addresses = ?lock(&shared.host).addrs.iter().map(|a| a.addr).collect::<Vec<_>>(), "following the host's addresses");
    refresh_sockets(shared).await;
    let shared2 = shared.clone();
    shared.tasks.spawn(async move {
        let mut tables = watcher.tables();
        // The watcher's tasks live as long as it does: as long as this one.
        let _watcher = watcher;
        loop {
            tokio::select! {
                r = tables.changed() => if r.is_err() {
                    warn!("the host's addresses are no longer followed: the interface watcher stopped");
                    lock(&shared2.host).watching = false;
                    return;
                },
                _ = shared2.shutdown.cancelled() => return,
            }
            let next = addresses(&tables.borrow_and_update());
            on_change(&shared2, next).await;
        }
    });
}

async fn on_change(shared: &Arc<Shared>, next: Vec<HostAddrStatus>) {
    let lost = {
        let mut v = lock(&shared.host);
        if v.addrs == next {
            return;
        }
        let lost = losing(&v.addrs, &next);
        v.addrs = next;
        lost
    };
    // Stop announcing what is going before directing anyone away from it:
    // a client agent choosing another address must not choose it again.
    multihome::advertise(shared);
    refresh_sockets(shared).await;
    for (ip, why) in lost {
        let on_it = multihome::sessions_on(shared, ip);
        shared.stats.address_losses.fetch_add(1, Ordering::Relaxed);
        if on_it.is_empty() {
            info!(addr = %ip, "an address of the gateway is going ({why}); no session is on it");
            continue;
        }
        warn!(addr = %ip, sessions = on_it.len(), "an address of the gateway is going ({why}): directing its sessions elsewhere (go-to)");
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            let reports = multihome::direct(&shared2, on_it, None, LOSS_WAIT).await;
            for r in reports {
                if r.moved {
                    info!(client = %r.client, session = %r.session_id, from = ?r.from, to = ?r.to, ms = r.ms, "the session left the address being lost");
                } else {
                    warn!(client = %r.client, session = %r.session_id, addr = %ip, "the session did not leave the address being lost within {LOSS_WAIT:?}");
                }
            }
        });
    }
}

/// Keeps one UDP socket per address that a wildcard stands for (see the
/// module's doc), so that probes and datagrams are answered from the
/// address they came to.
pub(super) async fn refresh_sockets(shared: &Arc<Shared>) {
    let wildcards: Vec<SocketAddr> = lock(&shared.served)
        .iter()
        .map(|(a, _)| *a)
        .filter(|a| a.ip().is_unspecified())
        .collect();
    let wanted: Vec<SocketAddr> = {
        let v = lock(&shared.host);
        wildcards.iter().flat_map(|w| v.expand(*w)).collect()
    };
    let stale: Vec<SocketAddr> = lock(&shared.host)
        .probe_sockets
        .keys()
        .copied()
        .filter(|a| !wanted.contains(a))
        .collect();
    for a in stale {
        if let Some(stop) = lock(&shared.host).probe_sockets.remove(&a) {
            stop.cancel();
            debug!(addr = %a, "UDP socket of a gone address closed");
        }
    }
    for a in wanted {
        if lock(&shared.host).probe_sockets.contains_key(&a) {
            continue;
        }
        match super::bind_udp(a, true, shared.shares_ports()) {
            Ok(udp) => {
                let stop = shared.shutdown.child_token();
                lock(&shared.host).probe_sockets.insert(a, stop.clone());
                shared
                    .tasks
                    .spawn(answer_probes(shared.clone(), Arc::new(udp), stop));
                debug!(addr = %a, "UDP socket for an address of the wildcard");
            }
            // The wildcard socket still answers (from the routing table's
            // choice of source, which a probe to another address ignores).
            Err(e) => debug!(addr = %a, "no UDP socket of its own: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_os::{IfaceAddr, Interface};

    fn iface(
        index: u32,
        name: &str,
        up: bool,
        kind: Kind,
        addrs: &[&str],
        deprecated: &[&str],
    ) -> Interface {
        let parse = |s: &&str| {
            let (a, p) = s.split_once('/').expect("prefix");
            IfaceAddr {
                addr: a.parse().expect("ip"),
                prefix_len: p.parse().expect("len"),
            }
        };
        Interface {
            index,
            name: name.into(),
            up,
            kind,
            addrs: addrs.iter().map(parse).collect(),
            default_route_metric: None,
            deprecated: deprecated.iter().map(parse).collect(),
        }
    }

    fn view(ifaces: Vec<Interface>) -> (InterfaceTable, HostView) {
        let t = InterfaceTable {
            interfaces: ifaces.into_iter().map(|i| (i.index, i)).collect(),
        };
        let v = HostView {
            watching: true,
            addrs: addresses(&t),
            probe_sockets: HashMap::new(),
        };
        (t, v)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn a_wildcard_stands_for_the_usable_outside_addresses_of_its_family() {
        let (_, v) = view(vec![
            iface(
                1,
                "lo",
                true,
                Kind::Loopback,
                &["127.0.0.1/8", "::1/128"],
                &[],
            ),
            iface(
                2,
                "srv",
                true,
                Kind::Ethernet,
                &["10.89.1.2/24", "fe80::1/64", "2001:db8::2/64"],
                &[],
            ),
            iface(
                3,
                "srv2",
                true,
                Kind::Ethernet,
                &["10.90.1.2/24", "10.90.1.3/24"],
                &["10.90.1.3/24"],
            ),
            iface(4, "eth9", false, Kind::Ethernet, &["10.91.1.2/24"], &[]),
            iface(5, "ll", true, Kind::Ethernet, &["169.254.1.1/16"], &[]),
        ]);
        assert_eq!(
            v.expand(sa("0.0.0.0:7700")),
            vec![sa("10.89.1.2:7700"), sa("10.90.1.2:7700")]
        );
        assert_eq!(v.expand(sa("[::]:7700")), vec![sa("[2001:db8::2]:7700")]);
    }

    #[test]
    fn a_gateway_on_loopback_only_advertises_loopback() {
        let (_, v) = view(vec![iface(
            1,
            "lo",
            true,
            Kind::Loopback,
            &["127.0.0.1/8"],
            &[],
        )]);
        assert_eq!(v.expand(sa("0.0.0.0:7700")), vec![sa("127.0.0.1:7700")]);
    }

    #[test]
    fn removed_deprecated_and_downed_addresses_are_being_lost() {
        let (_, before) = view(vec![
            iface(2, "srv", true, Kind::Ethernet, &["10.89.1.2/24"], &[]),
            iface(
                3,
                "srv2",
                true,
                Kind::Ethernet,
                &["10.90.1.2/24", "10.90.1.3/24"],
                &[],
            ),
            iface(
                4,
                "srv3",
                true,
                Kind::Ethernet,
                &["10.91.1.2/24"],
                &["10.91.1.2/24"],
            ),
        ]);
        let (_, after) = view(vec![
            iface(2, "srv", false, Kind::Ethernet, &["10.89.1.2/24"], &[]),
            iface(
                3,
                "srv2",
                true,
                Kind::Ethernet,
                &["10.90.1.3/24"],
                &["10.90.1.3/24"],
            ),
            iface(4, "srv3", true, Kind::Ethernet, &[], &[]),
        ]);
        let lost = losing(&before.addrs, &after.addrs);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            lost,
            vec![
                (ip("10.89.1.2"), "interface srv down".to_owned()),
                (ip("10.90.1.2"), "removed from srv2".to_owned()),
                (ip("10.90.1.3"), "deprecated on srv2".to_owned()),
            ],
            "an address already deprecated is not lost again when it goes"
        );
        assert!(losing(&after.addrs, &after.addrs).is_empty());
    }
}
