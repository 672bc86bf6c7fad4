//! The driver: keeps a [`State`] in step with the kernel through rtnetlink
//! and publishes tables and events.
//!
//! Order of work, each step for a reason:
//! 1. Open one netlink socket already bound to the multicast groups (links,
//!    IPv4/IPv6 addresses, IPv4/IPv6 routes) *before* dumping, so that no
//!    change between the dump and the subscription is missed; changes made
//!    meanwhile queue up and are applied after the dump.
//! 2. Spawn the connection future: rtnetlink does nothing until it is
//!    polled, and dump replies and notifications both arrive through it.
//! 3. Dump links, addresses and routes; then apply notifications one by one.
//! 4. When the kernel dropped notifications (receive buffer full: ENOBUFS,
//!    which netlink-proto hands over as an `Overrun` message), dump again:
//!    only a fresh dump is known to be right.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{Stream, StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use super::kind::{classify, KindFacts};
use super::state::{self, DefaultRoute, State};
use super::{IfaceEvent, InterfaceTable, Kind};

/// Room for events not yet read by a subscriber; one that falls further
/// behind gets `RecvError::Lagged` and should resynchronise from
/// [`Watcher::table`].
const EVENT_CAPACITY: usize = 1024;

/// Receive buffer asked for the netlink socket. The kernel caps it at
/// `net.core.rmem_max`; a bigger buffer makes ENOBUFS rarer when many
/// changes come at once (a VPN coming up, a dock plugged in).
const NETLINK_RCVBUF: usize = 1 << 20;

/// A live interface table, kept current from kernel notifications (never by
/// polling). Dropping the watcher stops its background tasks.
///
/// Created by [`watch()`]. Must be used inside a tokio runtime.
#[derive(Debug)]
pub struct Watcher {
    table: watch::Receiver<InterfaceTable>,
    /// Kept to hand out receivers; never read itself. A broadcast receiver
    /// that is not read does not hold senders back, it only lags.
    events: broadcast::Receiver<IfaceEvent>,
    overruns: Arc<AtomicU64>,
    tasks: [AbortHandle; 2],
}

impl Watcher {
    /// The current table.
    pub fn table(&self) -> InterfaceTable {
        self.table.borrow().clone()
    }

    /// A receiver of every event from now on. Events are sent after the
    /// table is updated, so [`Watcher::table`] already reflects an event
    /// when it is received. Receivers see `Closed` if the watcher stopped
    /// (netlink socket failed) or was dropped.
    pub fn subscribe(&self) -> broadcast::Receiver<IfaceEvent> {
        self.events.resubscribe()
    }

    /// A receiver of whole tables, for consumers that only need the latest
    /// state (`changed().await`, then `borrow()`), such as a status display.
    pub fn tables(&self) -> watch::Receiver<InterfaceTable> {
        self.table.clone()
    }

    /// How many times the kernel dropped notifications (ENOBUFS) and the
    /// table was dumped again. Nonzero is harmless but worth a metric.
    pub fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::Relaxed)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts watching the kernel's interfaces: subscribes to rtnetlink
/// notifications, dumps the current state, and returns once the first table
/// is complete.
///
/// Errors if the netlink socket cannot be opened or the first dump fails.
/// Must be called inside a tokio runtime; the watcher's tasks run on it.
pub async fn watch() -> io::Result<Watcher> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ];
    let (mut conn, handle, messages) = rtnetlink::new_multicast_connection(&groups)?;
    if let Err(e) = conn.socket_mut().socket_mut().set_rx_buf_sz(NETLINK_RCVBUF) {
        // Not fatal: the default buffer works, it only overflows sooner.
        tracing::debug!("netlink receive buffer left at default: {e}");
    }
    let conn_task = tokio::spawn(conn).abort_handle();

    let mut driver = Driver {
        handle,
        state: State::default(),
        kinds: HashMap::new(),
    };
    if let Err(e) = driver.dump_all().await {
        conn_task.abort();
        return Err(e);
    }
    let first = driver.state.table();
    let (table_tx, table_rx) = watch::channel(first.clone());
    let (events_tx, events_rx) = broadcast::channel(EVENT_CAPACITY);
    let overruns = Arc::new(AtomicU64::new(0));
    let publisher = Publisher {
        table_tx,
        events_tx,
        last: first,
        overruns: overruns.clone(),
    };
    let run_task = tokio::spawn(driver.run(messages, publisher)).abort_handle();
    Ok(Watcher {
        table: table_rx,
        events: events_rx,
        overruns,
        tasks: [conn_task, run_task],
    })
}

/// Sends the table and the events that led to it.
struct Publisher {
    table_tx: watch::Sender<InterfaceTable>,
    events_tx: broadcast::Sender<IfaceEvent>,
    last: InterfaceTable,
    overruns: Arc<AtomicU64>,
}

impl Publisher {
    fn publish(&mut self, next: InterfaceTable) {
        if next == self.last {
            return;
        }
        let events = self.last.changes_to(&next);
        // Table first: a subscriber woken by an event must find it applied.
        self.table_tx.send_replace(next.clone());
        self.last = next;
        for event in events {
            tracing::debug!(?event, "interface event");
            // An error only means nobody subscribes right now.
            let _ = self.events_tx.send(event);
        }
    }
}

struct Driver {
    handle: Handle,
    state: State,
    /// Kinds already classified, by index and name: sysfs is read once per
    /// link (and again after a rename), not on every RTM_NEWLINK.
    kinds: HashMap<(u32, String), Kind>,
}

impl Driver {
    async fn run(
        mut self,
        mut messages: impl Stream<Item = (NetlinkMessage<RouteNetlinkMessage>, SocketAddr)> + Unpin,
        mut publisher: Publisher,
    ) {
        while let Some((msg, _)) = messages.next().await {
            let result = match msg.payload {
                NetlinkPayload::InnerMessage(inner) => self.notified(inner).await,
                NetlinkPayload::Overrun(_) => {
                    let n = publisher.overruns.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(
                        overruns = n,
                        "netlink notifications lost (ENOBUFS); dumping again"
                    );
                    self.dump_all().await
                }
                _ => Ok(()),
            };
            if let Err(e) = result {
                // The connection is gone (or the kernel refuses dumps):
                // nothing more will come. Dropping the senders tells the
                // subscribers.
                tracing::error!("interface watcher stopped: {e}");
                return;
            }
            publisher.publish(self.state.table());
        }
        tracing::error!("interface watcher stopped: netlink connection closed");
    }

    async fn notified(&mut self, msg: RouteNetlinkMessage) -> io::Result<()> {
        let kinds = &mut self.kinds;
        let Some(change) = state::parse(msg, &mut |index, name, facts| {
            kind_of(kinds, index, name, facts)
        }) else {
            return Ok(());
        };
        if let state::Change::LinkGone(index) = change {
            self.kinds.retain(|(i, _), _| *i != index);
        }
        if self.state.apply(change) {
            self.dump_routes().await?;
        }
        Ok(())
    }

    async fn dump_all(&mut self) -> io::Result<()> {
        let mut fresh = State::default();
        let mut links = self.handle.link().get().execute();
        while let Some(m) = links.try_next().await.map_err(to_io)? {
            let kinds = &mut self.kinds;
            if let Some((index, link)) = state::link(&m, &mut |i, n, f| kind_of(kinds, i, n, f)) {
                fresh.links.insert(index, link);
            }
        }
        self.kinds
            .retain(|(i, n), _| fresh.links.get(i).is_some_and(|l| &l.name == n));
        let mut addrs = self.handle.address().get().execute();
        while let Some(m) = addrs.try_next().await.map_err(to_io)? {
            if let Some((index, addr, true, deprecated)) = state::address(&m) {
                fresh.addrs.entry(index).or_default().insert(addr);
                if deprecated {
                    fresh.deprecated.insert((index, addr));
                }
            }
        }
        fresh.routes = self.default_routes().await?.into_iter().collect();
        self.state = fresh;
        Ok(())
    }

    async fn dump_routes(&mut self) -> io::Result<()> {
        let routes = self.default_routes().await?;
        self.state.replace_routes(routes);
        Ok(())
    }

    /// Dumps IPv4 and IPv6 routes and keeps the default ones. Two dumps,
    /// because a route dump is per family.
    async fn default_routes(&self) -> io::Result<Vec<DefaultRoute>> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(msg).execute();
            while let Some(m) = routes.try_next().await.map_err(to_io)? {
                out.extend(state::default_route(&m));
            }
        }
        Ok(out)
    }
}

fn kind_of(
    cache: &mut HashMap<(u32, String), Kind>,
    index: u32,
    name: &str,
    mut facts: KindFacts,
) -> Kind {
    if let Some(&kind) = cache.get(&(index, name.to_owned())) {
        return kind;
    }
    // Reading sysfs blocks, but only on an in-memory filesystem and once per
    // link, so it is done inline rather than on the blocking pool.
    facts.read_sysfs(name);
    let kind = classify(name, &facts);
    cache.insert((index, name.to_owned()), kind);
    kind
}

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}
