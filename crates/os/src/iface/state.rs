//! The kernel's view, rebuilt from rtnetlink messages: links, addresses and
//! default routes, from which an [`InterfaceTable`] is computed.
//!
//! No I/O here except reading sysfs for a link's kind (done by the caller
//! through a function, so tests give their own): the watcher feeds messages
//! in, and asks when a route re-dump is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::kind::KindFacts;
use super::{IfaceAddr, Interface, InterfaceTable, Kind};

/// Kernel's `RT_TABLE_MAIN` as a 32-bit table id (`RTA_TABLE`).
const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// What we keep of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) name: String,
    /// `IFF_UP`: administratively up.
    pub(crate) admin_up: bool,
    /// `IFF_RUNNING`: the kernel sets it only when the link is admin up and
    /// its operational state is up (or unknown, for drivers that do not
    /// report carrier, such as loopback).
    pub(crate) running: bool,
    pub(crate) kind: Kind,
}

/// A default route in the main table, as the kernel identifies it: a delete
/// message repeats these fields, so equality finds the route to remove.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct DefaultRoute {
    pub(crate) v6: bool,
    pub(crate) tos: u8,
    pub(crate) metric: u32,
    /// (output interface, gateway) per next hop; several for multipath.
    pub(crate) hops: Vec<(u32, Option<IpAddr>)>,
}

/// One change carried by a netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Link(u32, Link),
    LinkGone(u32),
    Addr {
        index: u32,
        addr: IfaceAddr,
        present: bool,
        /// Its preferred lifetime is over (`IFA_F_DEPRECATED`).
        deprecated: bool,
    },
    Route {
        route: DefaultRoute,
        present: bool,
    },
}

/// Links, addresses and default routes as last reported by the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct State {
    pub(crate) links: BTreeMap<u32, Link>,
    pub(crate) addrs: BTreeMap<u32, BTreeSet<IfaceAddr>>,
    /// Of `addrs`, those whose preferred lifetime is over.
    pub(crate) deprecated: BTreeSet<(u32, IfaceAddr)>,
    pub(crate) routes: BTreeSet<DefaultRoute>,
}

impl State {
    /// Applies one change. Returns true when the routes must be dumped again
    /// because the kernel may have changed them without telling: when a link
    /// goes down or away, IPv4 flushes the routes through it and sends no
    /// RTM_DELROUTE for them.
    pub(crate) fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Link(index, link) => {
                let old = self.links.insert(index, link.clone());
                old.is_some_and(|o| o.admin_up != link.admin_up || o.running != link.running)
            }
            Change::LinkGone(index) => {
                self.links.remove(&index);
                // Addresses go with the link; their RTM_DELADDR may come
                // later or not at all, and must not resurrect anything.
                self.addrs.remove(&index);
                self.deprecated.retain(|(i, _)| *i != index);
                self.routes
                    .retain(|r| r.hops.iter().all(|&(oif, _)| oif != index));
                true
            }
            Change::Addr {
                index,
                addr,
                present: true,
                deprecated,
            } => {
                self.addrs.entry(index).or_default().insert(addr);
                if deprecated {
                    self.deprecated.insert((index, addr));
                } else {
                    self.deprecated.remove(&(index, addr));
                }
                false
            }
            Change::Addr {
                index,
                addr,
                present: false,
                ..
            } => {
                self.deprecated.remove(&(index, addr));
                if let Some(set) = self.addrs.get_mut(&index) {
                    set.remove(&addr);
                    if set.is_empty() {
                        self.addrs.remove(&index);
                    }
                }
                false
            }
            Change::Route {
                route,
                present: true,
            } => {
                self.routes.insert(route);
                false
            }
            Change::Route {
                route,
                present: false,
            } => {
                self.routes.remove(&route);
                false
            }
        }
    }

    /// Replaces all default routes with a fresh dump.
    pub(crate) fn replace_routes(&mut self, routes: impl IntoIterator<Item = DefaultRoute>) {
        self.routes = routes.into_iter().collect();
    }

    /// The table consumers see.
    pub(crate) fn table(&self) -> InterfaceTable {
        let mut metrics: BTreeMap<u32, u32> = BTreeMap::new();
        for route in &self.routes {
            for &(oif, _) in &route.hops {
                let m = metrics.entry(oif).or_insert(route.metric);
                *m = (*m).min(route.metric);
            }
        }
        let interfaces = self
            .links
            .iter()
            .map(|(&index, link)| {
                let iface = Interface {
                    index,
                    name: link.name.clone(),
                    up: link.admin_up && link.running,
                    kind: link.kind,
                    addrs: self
                        .addrs
                        .get(&index)
                        .map(|s| s.iter().copied().collect())
                        .unwrap_or_default(),
                    default_route_metric: metrics.get(&index).copied(),
                    deprecated: self
                        .deprecated
                        .iter()
                        .filter(|(i, _)| *i == index)
                        .map(|&(_, a)| a)
                        .collect(),
                };
                (index, iface)
            })
            .collect();
        InterfaceTable { interfaces }
    }
}

/// The change a netlink message carries, or `None` for messages that do not
/// concern the table. `kind_of` is asked for the kind of a link by name and
/// netlink facts (it reads sysfs in the watcher).
pub(crate) fn parse(
    msg: RouteNetlinkMessage,
    kind_of: &mut dyn FnMut(u32, &str, KindFacts) -> Kind,
) -> Option<Change> {
    match msg {
        RouteNetlinkMessage::NewLink(m) => link(&m, kind_of).map(|(i, l)| Change::Link(i, l)),
        RouteNetlinkMessage::DelLink(m) => {
            // A bridge sends RTM_DELLINK with AF_BRIDGE when a port leaves
            // it: the port itself still exists.
            (m.header.interface_family != AddressFamily::Bridge)
                .then_some(Change::LinkGone(m.header.index))
        }
        RouteNetlinkMessage::NewAddress(m) => {
            let (index, addr, usable, deprecated) = address(&m)?;
            // A NEWADDR that turns an address tentative (DAD restarted)
            // makes it unusable: treat it as a removal.
            Some(Change::Addr {
                index,
                addr,
                present: usable,
                deprecated,
            })
        }
        RouteNetlinkMessage::DelAddress(m) => {
            let (index, addr, _, _) = address(&m)?;
            Some(Change::Addr {
                index,
                addr,
                present: false,
                deprecated: false,
            })
        }
        RouteNetlinkMessage::NewRoute(m) => default_route(&m).map(|route| Change::Route {
            route,
            present: true,
        }),
        RouteNetlinkMessage::DelRoute(m) => default_route(&m).map(|route| Change::Route {
            route,
            present: false,
        }),
        _ => None,
    }
}

/// The link in a RTM_NEWLINK, unless it is a bridge-port notification.
pub(crate) fn link(
    m: &LinkMessage,
    kind_of: &mut dyn FnMut(u32, &str, KindFacts) -> Kind,
) -> Option<(u32, Link)> {
    if m.header.interface_family == AddressFamily::Bridge {
        return None;
    }
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let info_wwan = m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Wwan))),
        _ => false,
    });
    let flags = m.header.flags;
    let facts = KindFacts {
        loopback: flags.contains(LinkFlags::Loopback),
        ether: m.header.link_layer_type == LinkLayerType::Ether,
        info_wwan,
        ..KindFacts::default()
    };
    let kind = kind_of(m.header.index, &name, facts);
    Some((
        m.header.index,
        Link {
            name,
            admin_up: flags.contains(LinkFlags::Up),
            running: flags.contains(LinkFlags::Running),
            kind,
        },
    ))
}

/// The interface index, address, whether the address is usable (not
/// tentative, not DAD-failed), and whether it is deprecated (its preferred
/// lifetime is over: the kernel sets the flag for IPv6, and for IPv4 since
/// Linux 3.9) in an address message.
pub(crate) fn address(m: &AddressMessage) -> Option<(u32, IfaceAddr, bool, bool)> {
    // For point-to-point links IFA_ADDRESS is the peer and IFA_LOCAL ours;
    // otherwise only IFA_ADDRESS may be present (always so for IPv6).
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let addr = local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    // The 32-bit IFA_FLAGS attribute supersedes the 8-bit header field.
    let flags = m
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(m.header.flags.bits())));
    let usable = !flags.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed);
    Some((
        m.header.index,
        IfaceAddr {
            addr,
            prefix_len: m.header.prefix_len,
        },
        usable,
        flags.contains(AddressFlags::Deprecated),
    ))
}

/// The route in a route message if it is a unicast default route of the
/// main table; `None` for every other route.
pub(crate) fn default_route(m: &RouteMessage) -> Option<DefaultRoute> {
    let h = &m.header;
    let v6 = match h.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    if h.destination_prefix_length != 0 || h.kind != RouteType::Unicast {
        return None;
    }
    // Table ids above 255 only fit the RTA_TABLE attribute.
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(h.table));
    if table != MAIN_TABLE {
        return None;
    }
    let mut metric = 0;
    let mut oif = None;
    let mut gateway = None;
    let mut hops = Vec::new();
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::MultiPath(nhs) => {
                for nh in nhs {
                    let gw = nh.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => route_ip(g),
                        _ => None,
                    });
                    hops.push((nh.interface_index, gw));
                }
            }
            _ => {}
        }
    }
    if let Some(oif) = oif {
        hops.push((oif, gateway));
    }
    if hops.is_empty() {
        return None;
    }
    hops.sort();
    Some(DefaultRoute {
        v6,
        tos: h.tos,
        metric,
        hops,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use crate::iface::kind::classify;

    use rtnetlink::packet_route::address::AddressHeaderFlags;
    use rtnetlink::packet_route::route::RouteNextHop;

    fn link_msg(index: u32, name: &str, flags: LinkFlags) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = flags;
        m.header.link_layer_type = LinkLayerType::Ether;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m
    }

    fn addr_msg(index: u32, ip: IpAddr, prefix: u8, flags: Option<AddressFlags>) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix;
        m.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.attributes.push(AddressAttribute::Address(ip));
        if let Some(f) = flags {
            m.attributes.push(AddressAttribute::Flags(f));
        }
        m
    }

    fn route_msg(oif: u32, gw: Ipv4Addr, metric: Option<u32>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        m.attributes.push(RouteAttribute::Oif(oif));
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        if let Some(p) = metric {
            m.attributes.push(RouteAttribute::Priority(p));
        }
        m
    }

    fn ether(_: u32, name: &str, facts: KindFacts) -> Kind {
        classify(name, &facts)
    }

    fn feed(state: &mut State, msg: RouteNetlinkMessage) -> bool {
        let change = parse(msg, &mut ether).expect("message concerns the table");
        state.apply(change)
    }

    const UP: LinkFlags = LinkFlags::Up.union(LinkFlags::Running);

    #[test]
    fn a_deprecated_address_stays_usable_and_is_marked() {
        let mut s = State::default();
        feed(
            &mut s,
            RouteNetlinkMessage::NewLink(link_msg(2, "srv2", UP)),
        );
        let ip: IpAddr = "10.90.1.3".parse().expect("ip");
        let a = IfaceAddr {
            addr: ip,
            prefix_len: 24,
        };
        feed(
            &mut s,
            RouteNetlinkMessage::NewAddress(addr_msg(2, ip, 24, Some(AddressFlags::Permanent))),
        );
        assert!(s.table().interfaces[&2].deprecated.is_empty());
        // `ip addr change ... preferred_lft 0` (or the lifetime running out).
        feed(
            &mut s,
            RouteNetlinkMessage::NewAddress(addr_msg(2, ip, 24, Some(AddressFlags::Deprecated))),
        );
        let t = s.table();
        assert_eq!(
            (
                t.interfaces[&2].addrs.clone(),
                t.interfaces[&2].deprecated.clone()
            ),
            (vec![a], vec![a])
        );
        feed(
            &mut s,
            RouteNetlinkMessage::NewAddress(addr_msg(2, ip, 24, None)),
        );
        assert!(
            s.table().interfaces[&2].deprecated.is_empty(),
            "a renewed lifetime clears it"
        );
        feed(
            &mut s,
            RouteNetlinkMessage::NewAddress(addr_msg(2, ip, 24, Some(AddressFlags::Deprecated))),
        );
        feed(
            &mut s,
            RouteNetlinkMessage::DelAddress(addr_msg(2, ip, 24, None)),
        );
        let t = s.table();
        assert!(t.interfaces[&2].addrs.is_empty() && t.interfaces[&2].deprecated.is_empty());
    }

    #[test]
    fn builds_a_table_from_messages() {
        let mut s = State::default();
        assert!(!feed(
            &mut s,
            RouteNetlinkMessage::NewLink(link_msg(2, "eth0", UP))
        ));
        assert!(!feed(
            &mut s,
            RouteNetlinkMessage::NewLink(link_msg(3, "eth1", UP))
        ));
        let ip: IpAddr = Ipv4Addr::new(10, 0, 0, 2).into();
        feed(
            &mut s,
            RouteNetlinkMessage::NewAddress(addr_msg(2, ip, 24, None)),
        );
        feed(
            &mut s,
            RouteNetlinkMessage::NewAddress(addr_msg(
                3,
                Ipv4Addr::new(10, 1, 0, 2).into(),
                24,
                None,
            )),
        );
        feed(
            &mut s,
            RouteNetlinkMessage::NewRoute(route_msg(2, Ipv4Addr::new(10, 0, 0, 1), Some(200))),
        );
        feed(
            &mut s,
            RouteNetlinkMessage::NewRoute(route_msg(3, Ipv4Addr::new(10, 1, 0, 1), Some(100))),
        );
        feed(
            &mut s,
            RouteNetlinkMessage::NewRoute(route_msg(2, Ipv4Addr::new(10, 0, 0, 1), Some(50))),
        );
        let t = s.table();
        assert_eq!(t.interfaces[&2].default_route_metric, Some(50));
        assert_eq!(t.interfaces[&3].default_route_metric, Some(100));
        assert_eq!(t.interfaces[&2].kind, Kind::Ethernet);
        assert_eq!(
            t.candidates().iter().map(|i| i.index).collect::<Vec<_>>(),
            [2, 3]
        );

        feed(
            &mut s,
            RouteNetlinkMessage::DelRoute(route_msg(2, Ipv4Addr::new(10, 0, 0, 1), Some(50))),
        );
        assert_eq!(s.table().interfaces[&2].default_route_metric, Some(200));
        assert_eq!(
            s.table()
                .candidates()
                .iter()
                .map(|i| i.index)
                .collect::<Vec<_>>(),
            [3, 2]
        );

        // Carrier lost: not up any more, and the routes must be re-read.
        assert!(feed(
            &mut s,
            RouteNetlinkMessage::NewLink(link_msg(2, "eth0", LinkFlags::Up))
        ));
        assert!(!s.table().interfaces[&2].up);

        feed(
            &mut s,
            RouteNetlinkMessage::DelAddress(addr_msg(
                3,
                Ipv4Addr::new(10, 1, 0, 2).into(),
                24,
                None,
            )),
        );
        assert!(s.table().interfaces[&3].addrs.is_empty());

        assert!(feed(
            &mut s,
            RouteNetlinkMessage::DelLink(link_msg(2, "eth0", LinkFlags::empty()))
        ));
        let t = s.table();
        assert!(!t.interfaces.contains_key(&2));
        assert!(!s.addrs.contains_key(&2));
        assert!(s.routes.iter().all(|r| r.hops.iter().all(|h| h.0 != 2)));
    }

    #[test]
    fn tentative_addresses_are_not_usable() {
        let ip: IpAddr = "2001:db8::5".parse().expect("ip");
        let tentative = addr_msg(
            2,
            ip,
            64,
            Some(AddressFlags::Tentative | AddressFlags::Permanent),
        );
        assert_eq!(address(&tentative).map(|a| a.2), Some(false));
        let done = addr_msg(2, ip, 64, Some(AddressFlags::Permanent));
        assert_eq!(address(&done).map(|a| a.2), Some(true));
        let mut header_only = addr_msg(2, ip, 64, None);
        header_only.header.flags = AddressHeaderFlags::Dadfailed;
        assert_eq!(address(&header_only).map(|a| a.2), Some(false));

        let mut s = State::default();
        s.apply(parse(RouteNetlinkMessage::NewAddress(done), &mut ether).expect("address"));
        assert_eq!(s.addrs[&2].len(), 1);
        s.apply(parse(RouteNetlinkMessage::NewAddress(tentative), &mut ether).expect("address"));
        assert!(!s.addrs.contains_key(&2));
    }

    #[test]
    fn point_to_point_uses_the_local_address() {
        let mut m = addr_msg(4, Ipv4Addr::new(10, 64, 0, 1).into(), 32, None);
        m.attributes
            .push(AddressAttribute::Local(Ipv4Addr::new(10, 64, 0, 2).into()));
        assert_eq!(
            address(&m).map(|a| a.1.addr),
            Some(Ipv4Addr::new(10, 64, 0, 2).into())
        );
    }

    #[test]
    fn only_main_table_unicast_default_routes_count() {
        let gw = Ipv4Addr::new(10, 0, 0, 1);
        let plain = route_msg(2, gw, None);
        assert_eq!(default_route(&plain).map(|r| r.metric), Some(0));

        let mut specific = route_msg(2, gw, None);
        specific.header.destination_prefix_length = 24;
        assert_eq!(default_route(&specific), None);

        let mut other_table = route_msg(2, gw, None);
        other_table.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(default_route(&other_table), None);

        let mut blackhole = route_msg(2, gw, None);
        blackhole.header.kind = RouteType::BlackHole;
        assert_eq!(default_route(&blackhole), None);

        let mut multipath = RouteMessage::default();
        multipath.header.address_family = AddressFamily::Inet6;
        multipath.header.table = RouteHeader::RT_TABLE_MAIN;
        multipath.header.kind = RouteType::Unicast;
        multipath.attributes.push(RouteAttribute::Priority(1024));
        for oif in [5, 4] {
            let mut nh = RouteNextHop::default();
            nh.interface_index = oif;
            nh.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet6(
                    Ipv6Addr::LOCALHOST,
                )));
            multipath
                .attributes
                .push(RouteAttribute::MultiPath(vec![nh]));
        }
        let r = default_route(&multipath).expect("multipath default route");
        assert!(r.v6);
        assert_eq!(r.hops.iter().map(|h| h.0).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn bridge_port_messages_are_ignored() {
        let mut m = link_msg(7, "eth0", UP);
        m.header.interface_family = AddressFamily::Bridge;
        assert_eq!(
            parse(RouteNetlinkMessage::DelLink(m.clone()), &mut ether),
            None
        );
        assert_eq!(parse(RouteNetlinkMessage::NewLink(m), &mut ether), None);
    }
}
