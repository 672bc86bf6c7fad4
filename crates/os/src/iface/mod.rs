//! The interface table: which network interfaces exist, whether they can
//! carry traffic, their addresses and default routes, kept live from the
//! kernel.
//!
//! The types here are plain data with pure functions, so the decision engine
//! can be tested on synthetic tables; [`watch()`] is the driver that fills them
//! from rtnetlink.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

mod kind;
mod state;
mod watch;

pub use watch::{watch, Watcher};

/// One address of an interface with its prefix length (`192.0.2.7/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IfaceAddr {
    /// The interface's own (local) address.
    pub addr: IpAddr,
    /// Length of the on-link prefix, in bits.
    pub prefix_len: u8,
}

impl IfaceAddr {
    /// Whether `dest` lies inside this address's on-link prefix.
    pub fn contains(&self, dest: IpAddr) -> bool {
        match (self.addr, dest) {
            (IpAddr::V4(a), IpAddr::V4(d)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(a) & mask == u32::from(d) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(d)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(a) & mask == u128::from(d) & mask
            }
            _ => false,
        }
    }

    /// Whether the address is link-local (`169.254/16`, `fe80::/10`). Such an
    /// address cannot reach a gateway beyond the link, so it does not make an
    /// interface a candidate.
    pub fn is_link_local(&self) -> bool {
        is_link_local(self.addr)
    }
}

impl fmt::Display for IfaceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// What kind of link an interface is, as far as the kernel tells. The user's
/// policy (cost, metered) is usually keyed on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The loopback device (`IFF_LOOPBACK`): never a way out.
    Loopback,
    /// Wired Ethernet, or anything else with an Ethernet link layer that is
    /// neither Wi-Fi nor a modem (veth, bridges, many VM NICs).
    Ethernet,
    /// A wireless LAN device (cfg80211 or wireless extensions in sysfs).
    Wifi,
    /// A cellular modem (`DEVTYPE=wwan`, `wwan*`, `rmnet*`).
    Cellular,
    /// Tunnels, PPP and everything else.
    Other,
}

/// One network interface as the client agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Kernel interface index: stable while the interface exists, unlike the
    /// name, which can be changed.
    pub index: u32,
    /// Interface name (`eth0`, `wlan0`).
    pub name: String,
    /// Administratively up *and* operationally up (carrier present, Wi-Fi
    /// associated): only then can a connection leave through it.
    pub up: bool,
    /// Link kind.
    pub kind: Kind,
    /// Usable addresses, sorted. Tentative (IPv6 duplicate address detection
    /// still running) and DAD-failed addresses are left out: a socket cannot
    /// bind them.
    pub addrs: Vec<IfaceAddr>,
    /// Lowest metric of a default route (IPv4 or IPv6, main table) through
    /// this interface; `None` when it has none. The system's own preference
    /// between uplinks, which the decision engine starts from.
    pub default_route_metric: Option<u32>,
    /// Of `addrs`, those whose preferred lifetime is over (the kernel's
    /// "deprecated" flag, IPv6, and IPv4 since Linux 3.9): connections that
    /// have them go on, but new ones should use another address, which is
    /// why a server announcing its addresses stops announcing these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deprecated: Vec<IfaceAddr>,
}

impl Interface {
    /// Whether the interface could carry a leg now: up, not loopback, and
    /// with an address that can reach beyond the link.
    pub fn is_candidate(&self) -> bool {
        self.up && self.kind != Kind::Loopback && self.addrs.iter().any(|a| !a.is_link_local())
    }
}

/// A snapshot of every interface, keyed by index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceTable {
    /// Interfaces by kernel index.
    pub interfaces: BTreeMap<u32, Interface>,
}

impl InterfaceTable {
    /// Interfaces a leg could use now ([`Interface::is_candidate`]), best
    /// first: by default-route metric, lowest first, those without a default
    /// route last, then by index so that the order is stable.
    pub fn candidates(&self) -> Vec<&Interface> {
        let mut out: Vec<&Interface> = self
            .interfaces
            .values()
            .filter(|i| i.is_candidate())
            .collect();
        out.sort_by_key(|i| {
            (
                i.default_route_metric.is_none(),
                i.default_route_metric,
                i.index,
            )
        });
        out
    }

    /// The interface called `name`, if any.
    pub fn by_name(&self, name: &str) -> Option<&Interface> {
        self.interfaces.values().find(|i| i.name == name)
    }

    /// A source address on interface `index` for a connection to `dest`: of
    /// the same family, preferring one whose prefix contains `dest` (on
    /// link), then any that is not link-local. A link-local address is only
    /// returned for a link-local `dest`, since it cannot be routed.
    pub fn source_for(&self, index: u32, dest: IpAddr) -> Option<IpAddr> {
        let iface = self.interfaces.get(&index)?;
        let same_family = || {
            iface
                .addrs
                .iter()
                .filter(move |a| a.addr.is_ipv4() == dest.is_ipv4())
        };
        let dest_link_local = is_link_local(dest);
        same_family()
            .find(|a| a.contains(dest) && (dest_link_local || !a.is_link_local()))
            .or_else(|| same_family().find(|a| a.is_link_local() == dest_link_local))
            .map(|a| a.addr)
    }

    /// The events that turn `self` into `next`, in an order a consumer can
    /// apply one by one: removals first (an interface going away, or down,
    /// is the urgent news), then changes per interface, then additions, then
    /// one [`IfaceEvent::RouteChanged`] if any default-route metric changed.
    ///
    /// The watcher derives its events this way rather than translating
    /// netlink messages one to one, so that a re-dump after a lost
    /// notification (ENOBUFS) yields exactly the events that were missed. A
    /// consumer that lagged behind the event channel can do the same with
    /// its last table and [`Watcher::table`].
    pub fn changes_to(&self, next: &InterfaceTable) -> Vec<IfaceEvent> {
        let mut events = Vec::new();
        let mut route_changed = false;
        for (&index, old) in &self.interfaces {
            if next.interfaces.contains_key(&index) {
                continue;
            }
            if old.up {
                events.push(IfaceEvent::LinkDown {
                    index,
                    name: old.name.clone(),
                });
            }
            for &addr in &old.addrs {
                events.push(IfaceEvent::AddressRemoved { index, addr });
            }
            events.push(IfaceEvent::Removed { index });
            route_changed |= old.default_route_metric.is_some();
        }
        for (&index, new) in &next.interfaces {
            let Some(old) = self.interfaces.get(&index) else {
                continue;
            };
            if old.up && !new.up {
                events.push(IfaceEvent::LinkDown {
                    index,
                    name: new.name.clone(),
                });
            }
            if old.addrs != new.addrs {
                // Sets, not `Vec::contains`: an interface can carry thousands of
                // addresses, and this runs on every notification.
                let (old_set, new_set): (BTreeSet<_>, BTreeSet<_>) =
                    (old.addrs.iter().collect(), new.addrs.iter().collect());
                for &&addr in old_set.difference(&new_set) {
                    events.push(IfaceEvent::AddressRemoved { index, addr });
                }
                for &&addr in new_set.difference(&old_set) {
                    events.push(IfaceEvent::AddressAdded { index, addr });
                }
            }
            if !old.up && new.up {
                events.push(IfaceEvent::LinkUp {
                    index,
                    name: new.name.clone(),
                });
            }
            route_changed |= old.default_route_metric != new.default_route_metric;
        }
        for (&index, new) in &next.interfaces {
            if self.interfaces.contains_key(&index) {
                continue;
            }
            events.push(IfaceEvent::Added { index });
            for &addr in &new.addrs {
                events.push(IfaceEvent::AddressAdded { index, addr });
            }
            if new.up {
                events.push(IfaceEvent::LinkUp {
                    index,
                    name: new.name.clone(),
                });
            }
            route_changed |= new.default_route_metric.is_some();
        }
        if route_changed {
            events.push(IfaceEvent::RouteChanged);
        }
        events
    }
}

/// A change in the interface table. By the time a subscriber receives an
/// event, [`Watcher::table`] already shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum IfaceEvent {
    /// The interface became able to carry traffic (admin and oper up).
    LinkUp {
        /// Interface index.
        index: u32,
        /// Interface name at the time.
        name: String,
    },
    /// The interface can no longer carry traffic: legs through it are dead
    /// or about to be.
    LinkDown {
        /// Interface index.
        index: u32,
        /// Interface name at the time.
        name: String,
    },
    /// A usable address appeared on the interface.
    AddressAdded {
        /// Interface index.
        index: u32,
        /// The new address.
        addr: IfaceAddr,
    },
    /// An address went away: legs bound to it cannot continue.
    AddressRemoved {
        /// Interface index.
        index: u32,
        /// The address that went away.
        addr: IfaceAddr,
    },
    /// The default-route metric of at least one interface changed (a default
    /// route appeared, went away or was re-weighted), so the ordering of
    /// [`InterfaceTable::candidates`] may have changed.
    RouteChanged,
    /// A new interface appeared.
    Added {
        /// Interface index.
        index: u32,
    },
    /// The interface was removed from the system.
    Removed {
        /// Interface index.
        index: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> IfaceAddr {
        let (a, p) = s.split_once('/').expect("test address has a prefix");
        IfaceAddr {
            addr: a.parse().expect("test address"),
            prefix_len: p.parse().expect("prefix"),
        }
    }

    fn iface(
        index: u32,
        name: &str,
        up: bool,
        kind: Kind,
        addrs: &[&str],
        metric: Option<u32>,
    ) -> Interface {
        Interface {
            index,
            name: name.to_owned(),
            up,
            kind,
            addrs: addrs.iter().map(|a| addr(a)).collect(),
            default_route_metric: metric,
            deprecated: Vec::new(),
        }
    }

    fn table(ifaces: Vec<Interface>) -> InterfaceTable {
        InterfaceTable {
            interfaces: ifaces.into_iter().map(|i| (i.index, i)).collect(),
        }
    }

    fn names(t: &InterfaceTable) -> Vec<&str> {
        t.candidates().iter().map(|i| i.name.as_str()).collect()
    }

    #[test]
    fn candidates_order_by_metric_then_index_with_none_last() {
        let t = table(vec![
            iface(1, "lo", true, Kind::Loopback, &["127.0.0.1/8"], Some(0)),
            iface(2, "eth0", true, Kind::Ethernet, &["10.0.0.2/24"], Some(100)),
            iface(3, "wlan0", true, Kind::Wifi, &["192.168.1.5/24"], Some(600)),
            iface(4, "wwan0", true, Kind::Cellular, &["100.64.0.9/30"], None),
            iface(
                5,
                "usb0",
                true,
                Kind::Ethernet,
                &["172.20.0.2/24"],
                Some(100),
            ),
            iface(6, "eth1", true, Kind::Ethernet, &["10.1.0.2/24"], None),
            iface(7, "wlan1", true, Kind::Wifi, &["10.2.0.2/24"], Some(0)),
        ]);
        assert_eq!(
            names(&t),
            ["wlan1", "eth0", "usb0", "wlan0", "wwan0", "eth1"]
        );
    }

    #[test]
    fn candidates_skip_down_addressless_loopback_and_link_local_only() {
        let t = table(vec![
            iface(
                1,
                "lo",
                true,
                Kind::Loopback,
                &["127.0.0.1/8", "::1/128"],
                None,
            ),
            iface(
                2,
                "eth0",
                false,
                Kind::Ethernet,
                &["10.0.0.2/24"],
                Some(100),
            ),
            iface(3, "wlan0", true, Kind::Wifi, &[], Some(600)),
            iface(
                4,
                "eth1",
                true,
                Kind::Ethernet,
                &["fe80::1/64", "169.254.3.4/16"],
                None,
            ),
            iface(
                5,
                "eth2",
                true,
                Kind::Ethernet,
                &["fe80::2/64", "2001:db8::2/64"],
                Some(1024),
            ),
        ]);
        assert_eq!(names(&t), ["eth2"]);
        assert!(InterfaceTable::default().candidates().is_empty());
    }

    #[test]
    fn source_for_matches_family_and_prefers_on_link() {
        let t = table(vec![iface(
            2,
            "eth0",
            true,
            Kind::Ethernet,
            &[
                "10.0.0.2/24",
                "10.9.0.2/16",
                "fe80::2/64",
                "2001:db8::2/64",
                "fd00::2/64",
            ],
            Some(1),
        )]);
        let ip = |s: &str| s.parse::<IpAddr>().expect("test address");
        assert_eq!(t.source_for(2, ip("198.51.100.1")), Some(ip("10.0.0.2")));
        assert_eq!(t.source_for(2, ip("10.9.3.3")), Some(ip("10.9.0.2")));
        assert_eq!(
            t.source_for(2, ip("2001:db8:1::1")),
            Some(ip("2001:db8::2"))
        );
        assert_eq!(t.source_for(2, ip("fd00::99")), Some(ip("fd00::2")));
        assert_eq!(t.source_for(2, ip("fe80::99")), Some(ip("fe80::2")));
        assert_eq!(t.source_for(3, ip("10.0.0.1")), None);
        let v4_only = table(vec![iface(
            2,
            "eth0",
            true,
            Kind::Ethernet,
            &["10.0.0.2/24"],
            None,
        )]);
        assert_eq!(v4_only.source_for(2, ip("2001:db8::1")), None);
        let ll_only = table(vec![iface(
            2,
            "eth0",
            true,
            Kind::Ethernet,
            &["fe80::2/64"],
            None,
        )]);
        assert_eq!(ll_only.source_for(2, ip("2001:db8::1")), None);
    }

    #[test]
    fn prefix_containment() {
        assert!(addr("10.1.2.3/8").contains("10.200.0.1".parse().expect("ip")));
        assert!(!addr("10.1.2.3/32").contains("10.1.2.4".parse().expect("ip")));
        assert!(addr("10.1.2.3/0").contains("192.0.2.1".parse().expect("ip")));
        assert!(addr("2001:db8::1/0").contains("::1".parse().expect("ip")));
        assert!(!addr("2001:db8::1/64").contains("10.0.0.1".parse().expect("ip")));
        assert_eq!(addr("2001:db8::1/64").to_string(), "2001:db8::1/64");
    }

    #[test]
    fn changes_to_lists_every_difference_in_order() {
        let before = table(vec![
            iface(2, "eth0", true, Kind::Ethernet, &["10.0.0.2/24"], Some(100)),
            iface(3, "wlan0", true, Kind::Wifi, &["192.168.1.5/24"], Some(600)),
            iface(4, "wwan0", true, Kind::Cellular, &["100.64.0.9/30"], None),
        ]);
        let after = table(vec![
            iface(2, "eth0", false, Kind::Ethernet, &["10.0.0.2/24"], None),
            iface(3, "wlan0", true, Kind::Wifi, &["192.168.1.6/24"], Some(600)),
            iface(5, "usb0", true, Kind::Ethernet, &["172.20.0.2/24"], None),
        ]);
        let a = |s| addr(s);
        assert_eq!(
            before.changes_to(&after),
            vec![
                IfaceEvent::LinkDown {
                    index: 4,
                    name: "wwan0".into()
                },
                IfaceEvent::AddressRemoved {
                    index: 4,
                    addr: a("100.64.0.9/30")
                },
                IfaceEvent::Removed { index: 4 },
                IfaceEvent::LinkDown {
                    index: 2,
                    name: "eth0".into()
                },
                IfaceEvent::AddressRemoved {
                    index: 3,
                    addr: a("192.168.1.5/24")
                },
                IfaceEvent::AddressAdded {
                    index: 3,
                    addr: a("192.168.1.6/24")
                },
                IfaceEvent::Added { index: 5 },
                IfaceEvent::AddressAdded {
                    index: 5,
                    addr: a("172.20.0.2/24")
                },
                IfaceEvent::LinkUp {
                    index: 5,
                    name: "usb0".into()
                },
                IfaceEvent::RouteChanged,
            ]
        );
        assert!(after.changes_to(&after).is_empty());
    }

    #[test]
    fn serializes_for_status_output() {
        let t = table(vec![iface(
            2,
            "eth0",
            true,
            Kind::Ethernet,
            &["10.0.0.2/24"],
            Some(100),
        )]);
        let json = serde_json::to_value(&t).expect("serializes");
        assert_eq!(json["interfaces"]["2"]["kind"], "ethernet");
        assert_eq!(json["interfaces"]["2"]["addrs"][0]["addr"], "10.0.0.2");
        let ev = serde_json::to_value(IfaceEvent::Added { index: 2 }).expect("serializes");
        assert_eq!(ev, serde_json::json!({"event": "added", "index": 2}));
    }
}
