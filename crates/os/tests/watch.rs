//! The interface watcher against a real kernel, in a private network
//! namespace: every change made with `ip` must show up as an event within a
//! second and in the table, and the table must stay right when the kernel
//! changes routes silently or drops notifications.

mod common;

use std::time::{Duration, Instant};

use baton_os::{IfaceAddr, IfaceEvent, InterfaceTable, Kind, Watcher};
use common::Netns;
use tokio::sync::broadcast::{self, error::RecvError};

/// How long an event may take to arrive after the command that caused it.
const EVENT_DEADLINE: Duration = Duration::from_secs(1);

/// Waits for the first event matching `want`, skipping others (IPv6
/// autoconfiguration and the like), and fails after [`EVENT_DEADLINE`].
async fn expect(
    rx: &mut broadcast::Receiver<IfaceEvent>,
    what: &str,
    want: impl Fn(&IfaceEvent) -> bool,
) -> IfaceEvent {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = EVENT_DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) if want(&ev) => return ev,
            Ok(Ok(ev)) => seen.push(ev),
            Ok(Err(RecvError::Lagged(n))) => panic!("lagged by {n} events waiting for {what}"),
            Ok(Err(RecvError::Closed)) => panic!("watcher stopped waiting for {what}"),
            Err(_) => panic!("no {what} within {EVENT_DEADLINE:?}; saw {seen:?}"),
        }
    }
}

/// Waits for interface `name` (index `index`) to come up, or go down, and checks that
/// the event names it.
async fn expect_link(rx: &mut broadcast::Receiver<IfaceEvent>, name: &str, index: u32, up: bool) {
    let want = if up {
        IfaceEvent::LinkUp {
            index,
            name: name.into(),
        }
    } else {
        IfaceEvent::LinkDown {
            index,
            name: name.into(),
        }
    };
    let what = format!("{name} {}", if up { "up" } else { "down" });
    // Matched by index alone, so that an event with a wrong name fails the check below
    // instead of timing out.
    let ev = expect(rx, &what, |e| match e {
        IfaceEvent::LinkUp { index: i, .. } => up && *i == index,
        IfaceEvent::LinkDown { index: i, .. } => !up && *i == index,
        _ => false,
    })
    .await;
    assert_eq!(ev, want);
}

/// Runs `ip ARGS` (a route change) and waits for the watcher to report it.
async fn change_route(ns: &common::Ns, rx: &mut broadcast::Receiver<IfaceEvent>, args: &str) {
    ns.ip(args);
    expect(rx, "route change", |e| *e == IfaceEvent::RouteChanged).await;
}

fn addr(s: &str) -> IfaceAddr {
    let (a, p) = s.split_once('/').expect("address with prefix");
    IfaceAddr {
        addr: a.parse().expect("ip address"),
        prefix_len: p.parse().expect("prefix length"),
    }
}

fn names(t: &InterfaceTable) -> Vec<String> {
    t.candidates().iter().map(|i| i.name.clone()).collect()
}

#[test]
fn events_and_table_follow_the_kernel() {
    let ns = Netns::new("watch", true);
    let h = ns.handle();
    ns.run(move || async move {
        let ns = h;
        let w = baton_os::watch().await.expect("watcher starts");
        let mut rx = w.subscribe();

        // A fresh namespace has only a loopback device, down.
        let t = w.table();
        let lo = t.by_name("lo").expect("lo is listed");
        assert_eq!((lo.kind, lo.up), (Kind::Loopback, false));
        assert!(t.candidates().is_empty());

        // Two veth pairs appear.
        ns.ip("link add a0 type veth peer name a1");
        ns.ip("link add b0 type veth peer name b1");
        let (a0, b0) = (ns.index("a0"), ns.index("b0"));
        for (dev, index) in [("a0", a0), ("b0", b0)] {
            expect(&mut rx, dev, |e| *e == IfaceEvent::Added { index }).await;
            let i = w.table().interfaces[&index].clone();
            assert_eq!(
                (i.name.as_str(), i.kind, i.up),
                (dev, Kind::Ethernet, false)
            );
        }

        // Admin up alone is not up: a veth has carrier only when its peer
        // is up too.
        ns.ip("link set a0 up");
        ns.ip("link set b0 up");
        ns.ip("link set b1 up");
        expect_link(&mut rx, "b0", b0, true).await;
        assert!(!w.table().interfaces[&a0].up, "a0 has no carrier yet");
        ns.ip("link set a1 up");
        expect_link(&mut rx, "a0", a0, true).await;

        // Addresses, both families.
        for (dev, index, a) in [
            ("a0", a0, "10.200.1.1/24"),
            ("b0", b0, "10.200.2.1/24"),
            ("a0", a0, "fd00:200:1::1/64"),
        ] {
            ns.ip(&format!("addr add {a} dev {dev} nodad"));
            let want = IfaceEvent::AddressAdded {
                index,
                addr: addr(a),
            };
            expect(&mut rx, a, |e| *e == want).await;
            assert!(w.table().interfaces[&index].addrs.contains(&addr(a)));
        }
        // No default routes yet: ordered by index.
        let mut by_index = [(a0, "a0"), (b0, "b0")];
        by_index.sort();
        assert_eq!(
            names(&w.table()),
            by_index.iter().map(|p| p.1).collect::<Vec<_>>()
        );

        // Default routes order the candidates by metric, IPv4 and IPv6
        // alike, the lowest of an interface's routes counting.
        change_route(
            &ns,
            &mut rx,
            "route add default via 10.200.1.2 dev a0 metric 200",
        )
        .await;
        assert_eq!(w.table().interfaces[&a0].default_route_metric, Some(200));
        assert_eq!(names(&w.table()), ["a0", "b0"]);
        change_route(
            &ns,
            &mut rx,
            "route add default via 10.200.2.2 dev b0 metric 100",
        )
        .await;
        assert_eq!(names(&w.table()), ["b0", "a0"]);
        change_route(
            &ns,
            &mut rx,
            "-6 route add default via fd00:200:1::2 dev a0 metric 50",
        )
        .await;
        assert_eq!(w.table().interfaces[&a0].default_route_metric, Some(50));
        assert_eq!(names(&w.table()), ["a0", "b0"]);
        change_route(
            &ns,
            &mut rx,
            "-6 route del default via fd00:200:1::2 dev a0 metric 50",
        )
        .await;
        assert_eq!(names(&w.table()), ["b0", "a0"]);

        // Carrier lost (peer down), then back.
        ns.ip("link set b1 down");
        expect_link(&mut rx, "b0", b0, false).await;
        assert_eq!(names(&w.table()), ["a0"]);
        ns.ip("link set b1 up");
        expect_link(&mut rx, "b0", b0, true).await;
        assert_eq!(names(&w.table()), ["b0", "a0"]);

        // Admin down: the kernel flushes b0's IPv4 routes without a
        // notification; the watcher must notice anyway.
        ns.ip("link set b0 down");
        expect_link(&mut rx, "b0", b0, false).await;
        expect(&mut rx, "route change", |e| *e == IfaceEvent::RouteChanged).await;
        let t = w.table();
        assert_eq!(t.interfaces[&b0].default_route_metric, None);
        assert!(
            ns.ip_output("route show default").contains("a0")
                && !ns.ip_output("route show default").contains("b0")
        );
        assert_eq!(names(&t), ["a0"]);

        // Address removal.
        ns.ip("addr del 10.200.1.1/24 dev a0");
        let want = IfaceEvent::AddressRemoved {
            index: a0,
            addr: addr("10.200.1.1/24"),
        };
        expect(&mut rx, "address removal", |e| *e == want).await;
        assert!(!w.table().interfaces[&a0]
            .addrs
            .contains(&addr("10.200.1.1/24")));

        // Deleting one end of a veth pair deletes both.
        let a1 = ns.index("a1");
        ns.ip("link del a0");
        for index in [a0, a1] {
            expect(&mut rx, "removal", |e| *e == IfaceEvent::Removed { index }).await;
        }
        let t = w.table();
        assert!(!t.interfaces.contains_key(&a0) && !t.interfaces.contains_key(&a1));
        assert!(t.candidates().is_empty());
        assert_eq!(w.overruns(), 0);
    });
}

/// Enough changes at once to overflow the netlink socket's receive buffer
/// while the watcher cannot read (its runtime thread is blocked): the kernel
/// drops notifications (ENOBUFS), and the watcher must dump again and end up
/// with the right table anyway.
#[test]
fn lost_notifications_are_recovered_by_a_dump() {
    const ADDRS: usize = 6000;
    let ns = Netns::new("enobufs", false);
    let h = ns.handle();
    ns.run(move || async move {
        let ns = h;
        let w = baton_os::watch().await.expect("watcher starts");
        let mut tables = w.tables();
        ns.ip("link add v0 type veth peer name v1");
        let v0 = ns.index("v0");
        let batch: String = (0..ADDRS)
            .map(|i| format!("addr add 10.77.{}.{}/32 dev v0\n", i / 250, i % 250 + 1))
            .collect();
        let file = std::env::temp_dir().join(format!("{}-batch", ns.name));
        std::fs::write(&file, batch).expect("write batch file");
        // Blocking on purpose: the watcher shares this thread and reads
        // nothing until the batch is done.
        let out = common::run("ip", &["-n", &ns.name, "-batch", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        drop(out);

        let complete = |t: &InterfaceTable| {
            t.interfaces
                .get(&v0)
                .is_some_and(|i| i.addrs.len() == ADDRS)
        };
        tokio::time::timeout(Duration::from_secs(10), tables.wait_for(complete))
            .await
            .expect("table complete within 10 s")
            .expect("watcher running");
        assert!(
            w.overruns() >= 1,
            "the burst should have overflowed the netlink buffer"
        );
        assert!(w.table().interfaces[&v0]
            .addrs
            .contains(&addr("10.77.0.1/32")));

        // Still live after the recovery.
        let mut rx = w.subscribe();
        ns.ip("addr del 10.77.0.1/32 dev v0");
        let want = IfaceEvent::AddressRemoved {
            index: v0,
            addr: addr("10.77.0.1/32"),
        };
        expect(&mut rx, "address removal", |e| *e == want).await;
        keep(w);
    });
}

fn keep(_w: Watcher) {}
