//! Real-network tests of the bed. They need root and `ip`, `iptables`, `tc`, `ping`
//! (CI runs as root and installs them). Every wait in them is bounded: pings carry deadlines,
//! commands a 30 s limit, sockets read/write/connect timeouts.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use baton_netbed::{Bed, Host, Link};

const IO_LIMIT: Duration = Duration::from_secs(15);

fn bed(tag: &str) -> Bed {
    Bed::new(tag).expect("netbed needs root and iproute2, iptables, iputils-ping")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Opens a TCP connection from MOBILE (default route) to SERVER; returns the address SERVER
/// saw as peer.
fn peer_seen_by_server(bed: &Bed) -> Ipv4Addr {
    let listener = bed
        .in_ns(Host::Server, || TcpListener::bind((bed.server_addr(), 0)))
        .unwrap()
        .unwrap();
    let to = listener.local_addr().unwrap();
    let _client = bed
        .in_ns(Host::Mobile, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    let (_s, peer) = listener.accept().unwrap();
    match peer {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(a) => panic!("IPv6 peer {a}"),
    }
}

/// Sends `bytes` from MOBILE to SERVER over one TCP connection; returns the time until SERVER
/// read the last byte.
fn upload(bed: &Bed, bytes: usize) -> Duration {
    let listener = bed
        .in_ns(Host::Server, || TcpListener::bind((bed.server_addr(), 0)))
        .unwrap()
        .unwrap();
    let to = listener.local_addr().unwrap();
    let mut client = bed
        .in_ns(Host::Mobile, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    let (mut server, _) = listener.accept().unwrap();
    server.set_read_timeout(Some(IO_LIMIT)).unwrap();
    client.set_write_timeout(Some(IO_LIMIT)).unwrap();
    let start = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        loop {
            match server.read(&mut buf) {
                Ok(0) => return (total, start.elapsed()),
                Ok(n) => total += n,
                Err(e) => panic!("server read after {total} bytes: {e}"),
            }
        }
    });
    let chunk = vec![0x5a; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        client.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    client.shutdown(Shutdown::Write).unwrap();
    let (got, took) = reader.join().unwrap();
    assert_eq!(got, bytes);
    took
}

#[test]
fn topology_pings_end_to_end_over_each_link() {
    let bed = bed("topology");
    for link in Link::ALL {
        let r = bed
            .ping_via(link, bed.server_addr(), 3, Duration::from_millis(20))
            .unwrap();
        assert_eq!(r.received, 3, "server over {link:?}: {r:?}");
        let rtt = bed.ping_rtt(link).unwrap();
        assert!(rtt < Duration::from_millis(20), "{link:?} rtt {rtt:?}");
    }
    let r = bed
        .ping(
            Host::Server,
            bed.mobile_addr(Link::Lte),
            3,
            Duration::from_millis(20),
        )
        .unwrap();
    assert_eq!(r.received, 3);
    // wlan has the lower metric: it carries the default route.
    assert_eq!(peer_seen_by_server(&bed), bed.mobile_addr(Link::Wlan));
    assert_eq!(bed.mobile_addr(Link::Wlan), Ipv4Addr::new(10, 81, 1, 2));
    assert_eq!(bed.mobile_addr(Link::Lte), Ipv4Addr::new(10, 82, 1, 2));
    assert_eq!(bed.server_addr(), Ipv4Addr::new(10, 89, 1, 2));
}

#[test]
fn wlan_down_moves_traffic_to_lte_and_back() {
    let bed = bed("linkdown");
    bed.link_down(Link::Wlan).unwrap();
    let r = bed
        .ping(
            Host::Mobile,
            bed.server_addr(),
            3,
            Duration::from_millis(20),
        )
        .unwrap();
    assert_eq!(r.received, 3, "{r:?}");
    assert_eq!(peer_seen_by_server(&bed), bed.mobile_addr(Link::Lte));
    let routes = bed.exec(Host::Mobile, &["ip", "route"]).unwrap();
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("dev wlan"));

    bed.link_up(Link::Wlan).unwrap();
    assert_eq!(peer_seen_by_server(&bed), bed.mobile_addr(Link::Wlan));
    let routes = bed.exec(Host::Mobile, &["ip", "route"]).unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains("default via 10.81.1.1 dev wlan metric 100"),
        "{routes}"
    );
}

#[test]
fn readdress_keeps_the_link_routable() {
    let bed = bed("readdress");
    bed.readdress(Link::Wlan, 7).unwrap();
    assert_eq!(bed.mobile_addr(Link::Wlan), Ipv4Addr::new(10, 81, 1, 7));
    let addrs = bed
        .exec(
            Host::Mobile,
            &["ip", "-4", "-o", "addr", "show", "dev", "wlan"],
        )
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        addrs.contains("10.81.1.7/24") && !addrs.contains("10.81.1.2/"),
        "{addrs}"
    );
    assert_eq!(peer_seen_by_server(&bed), Ipv4Addr::new(10, 81, 1, 7));
    let r = bed
        .ping(
            Host::Server,
            bed.mobile_addr(Link::Wlan),
            3,
            Duration::from_millis(20),
        )
        .unwrap();
    assert_eq!(r.received, 3);
    // Renumbering a link that is down takes effect when it comes back.
    bed.link_down(Link::Wlan).unwrap();
    bed.readdress(Link::Wlan, 9).unwrap();
    bed.link_up(Link::Wlan).unwrap();
    assert_eq!(peer_seen_by_server(&bed), Ipv4Addr::new(10, 81, 1, 9));
    assert!(bed.readdress(Link::Wlan, 1).is_err());
}

#[test]
fn delay_adds_to_the_round_trip_on_its_link_only() {
    let bed = bed("delay");
    bed.set_delay(Link::Wlan, 10).unwrap();
    let rtt10 = bed.ping_rtt(Link::Wlan).unwrap();
    let lte = bed.ping_rtt(Link::Lte).unwrap();
    bed.set_delay(Link::Wlan, 40).unwrap();
    let rtt40 = bed.ping_rtt(Link::Wlan).unwrap();
    // End to end too: request and reply each cross the delayed link once.
    let server = bed
        .ping(
            Host::Mobile,
            bed.server_addr(),
            5,
            Duration::from_millis(50),
        )
        .unwrap();
    let stats = bed.delay_stats(Link::Wlan).unwrap();
    bed.set_delay(Link::Wlan, 0).unwrap();
    let rtt0 = bed.ping_rtt(Link::Wlan).unwrap();
    eprintln!(
        "ping rtt: 10 ms one way {:.2} ms, 40 ms one way {:.2} ms (server {:.2} ms), \
         none {:.2} ms, lte {:.2} ms; {stats:?}",
        ms(rtt10),
        ms(rtt40),
        ms(server.median().unwrap()),
        ms(rtt0),
        ms(lte)
    );
    assert!(
        (18.0..35.0).contains(&ms(rtt10)),
        "10 ms one way: {rtt10:?}"
    );
    assert!(
        (78.0..100.0).contains(&ms(rtt40)),
        "40 ms one way: {rtt40:?}"
    );
    assert!(
        (78.0..100.0).contains(&ms(server.median().unwrap())),
        "{server:?}"
    );
    assert!(ms(rtt0) < 10.0, "no delay: {rtt0:?}");
    assert!(ms(lte) < 10.0, "lte: {lte:?}");
    assert_eq!(bed.delay_stats(Link::Wlan), None);
    assert_eq!(stats.overruns + stats.errors, 0);
    assert_eq!(bed.delay_drops(Link::Wlan).unwrap(), 0);
}

#[test]
fn loss_drops_packets_in_each_direction() {
    let bed = bed("loss");
    bed.set_loss(Link::Wlan, 30.0).unwrap();
    let r = bed
        .ping_via(
            Link::Wlan,
            bed.router_addr(Link::Wlan),
            200,
            Duration::from_millis(5),
        )
        .unwrap();
    // 30 % each way: a round trip survives with 0.7² = 0.49, so ~51 % of pings are lost.
    eprintln!(
        "30% loss each way: {} of {} pings lost",
        r.sent - r.received,
        r.sent
    );
    assert_eq!(r.sent, 200);
    assert!((0.36..0.66).contains(&r.loss()), "loss {:.3}", r.loss());
    let lte = bed
        .ping_via(
            Link::Lte,
            bed.router_addr(Link::Lte),
            50,
            Duration::from_millis(5),
        )
        .unwrap();
    assert_eq!(lte.received, 50, "lte must not lose");
    bed.set_loss(Link::Wlan, 0.0).unwrap();
    let r = bed
        .ping_via(Link::Wlan, bed.server_addr(), 50, Duration::from_millis(5))
        .unwrap();
    assert_eq!(r.received, 50);
    assert!(bed.set_loss(Link::Wlan, 101.0).is_err());
}

#[test]
fn rate_limits_a_tcp_transfer() {
    let bed = bed("rate");
    bed.set_rate(Link::Wlan, 2000).unwrap();
    // 1 MB at 2 Mbit/s is 4.2 s.
    let took = upload(&bed, 1_000_000);
    eprintln!("1 MB at 2 Mbit/s took {took:?}");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    bed.set_rate(Link::Wlan, 0).unwrap();
    let took = upload(&bed, 1_000_000);
    assert!(took < Duration::from_secs(1), "unlimited again: {took:?}");
}

#[test]
fn delayer_sustains_bulk_tcp() {
    let bed = bed("bulk");
    bed.set_delay(Link::Wlan, 10).unwrap();
    let bytes = 48 << 20;
    let took = upload(&bed, bytes);
    let mbit = bytes as f64 * 8.0 / took.as_secs_f64() / 1e6;
    let stats = bed.delay_stats(Link::Wlan).unwrap();
    let drops = bed.delay_drops(Link::Wlan).unwrap();
    eprintln!("48 MiB through a 10 ms delayed link: {took:?}, {mbit:.0} Mbit/s; {stats:?}, kernel drops {drops}");
    assert_eq!(drops, 0);
    assert_eq!(stats.overruns + stats.errors, 0);
    // ~100 Mbit/s and more on an idle machine; leave room for a busy 2-core CI box.
    assert!(mbit > 40.0, "{mbit:.1} Mbit/s");
}

/// The host namespace's iptables rules, read only.
fn host_rules() -> String {
    Command::new("iptables-save")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let rules_before = host_rules();
    let seen = std::sync::Mutex::new((Vec::new(), 0u32));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let bed = bed("panics");
        bed.set_delay(Link::Wlan, 20).unwrap();
        bed.set_loss(Link::Lte, 10.0).unwrap();
        bed.set_rate(Link::Lte, 1000).unwrap();
        let mut cmd = bed.command(Host::Server, "sleep");
        cmd.arg("30");
        let child = bed.spawn(&mut cmd).unwrap();
        let names = [Host::Mobile, Host::Router, Host::Server].map(|h| bed.ns(h).to_owned());
        *seen.lock().unwrap() = (names.to_vec(), child.id());
        // Leak the guard so only the bed's teardown can stop the process.
        std::mem::forget(child);
        panic!("test body fails");
    }));
    assert!(result.is_err());
    let (names, pid) = seen.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in &names {
        assert!(!list.contains(n.as_str()), "{n} survived: {list}");
    }
    // Killed by the bed; the leaked guard never reaped it, so at most a zombie remains.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        status.is_empty() || status.contains("State:\tZ"),
        "sleep still runs: {status}"
    );
    assert_eq!(host_rules(), rules_before, "host iptables changed");
}

#[test]
fn beds_of_dead_test_processes_are_swept() {
    // A pid that just exited stands for a test process killed before its beds dropped.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let stale = format!("nb-{pid}-0-stale-mobile");
    let added = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(added.success());
    let _bed = bed("sweeper");
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    if list.contains(&stale) {
        // Leave the machine clean even when the assertion below fails.
        let _ = Command::new("ip")
            .args(["netns", "delete", &stale])
            .status();
    }
    assert!(!list.contains(&stale), "{stale} survived: {list}");
}
