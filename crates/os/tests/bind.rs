//! `connect_via` against a real kernel: a client namespace with two links
//! (veth pairs `ca`/`sa` and `cb`/`sb`) into a server namespace. Routes in
//! the client prefer `ca`; binding to `cb` must make the connection leave
//! through `cb`, which the server sees as the peer address and the packet
//! counters confirm.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use baton_os::connect_via;
use common::{Netns, Ns};
use tokio::net::{TcpListener, TcpStream};

const SERVER: &str = "10.210.9.9";
/// Routed towards the server namespace, which has no such address and does
/// not forward: packets to it vanish, so a connect can only time out.
const BLACK_HOLE: &str = "10.210.8.8";
const CONNECT: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip address")
}

/// Client `ca` 10.210.1.1 — `sa` 10.210.1.2 server; client `cb` 10.210.2.1
/// — `sb` 10.210.2.2 server; the server's service address on its loopback.
fn topology(client: &Ns, server: &Ns) {
    for (c, s, net) in [("ca", "sa", 1), ("cb", "sb", 2)] {
        client.ip(&format!(
            "link add {c} type veth peer name {s} netns {}",
            server.name
        ));
        client.ip(&format!("addr add 10.210.{net}.1/24 dev {c}"));
        server.ip(&format!("addr add 10.210.{net}.2/24 dev {s}"));
        client.ip(&format!("link set {c} up"));
        server.ip(&format!("link set {s} up"));
    }
    server.ip("link set lo up");
    server.ip(&format!("addr add {SERVER}/32 dev lo"));
    client.ip(&format!(
        "route add {SERVER}/32 via 10.210.1.2 dev ca metric 100"
    ));
    client.ip(&format!(
        "route add {SERVER}/32 via 10.210.2.2 dev cb metric 200"
    ));
    client.ip(&format!("route add {BLACK_HOLE}/32 via 10.210.1.2 dev ca"));
}

/// Connects and returns the address the server saw and the packets each
/// client link sent meanwhile. The streams are returned too: kept open, they
/// send nothing more that could blur the next measurement.
async fn measure(
    client: &Ns,
    listener: &TcpListener,
    device: Option<&str>,
    source: Option<IpAddr>,
) -> (IpAddr, u64, u64, TcpStream, TcpStream) {
    let dest = listener.local_addr().expect("listener address");
    let (ca0, cb0) = (client.tx_packets("ca"), client.tx_packets("cb"));
    let stream = connect_via(dest, device, source, CONNECT)
        .await
        .expect("connect_via");
    let (accepted, peer) = listener.accept().await.expect("accept");
    assert_eq!(peer, stream.local_addr().expect("local address"));
    // Let the handshake's last ACK be counted.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (ca, cb) = (client.tx_packets("ca") - ca0, client.tx_packets("cb") - cb0);
    (peer.ip(), ca, cb, stream, accepted)
}

#[test]
fn device_binding_chooses_the_egress_interface() {
    let client = Netns::new("bind-c", false);
    let server = Netns::new("bind-s", false);
    topology(&client, &server);
    // The listener is created inside the server namespace and stays there,
    // whichever thread later uses it.
    let listener = server.run(|| async {
        let l = TcpListener::bind(SocketAddr::new(ip(SERVER), 0))
            .await
            .expect("listen");
        l.into_std().expect("std listener")
    });
    let c = client.handle();
    client.run(move || async move {
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let mut keep = Vec::new();

        // Routes alone: the lower metric, through ca.
        let (peer, ca, cb, s, a) = measure(&c, &listener, None, None).await;
        keep.extend([s, a]);
        assert_eq!(peer, ip("10.210.1.1"));
        assert!(ca >= 2 && cb == 0, "ca sent {ca}, cb sent {cb}");

        // Device binding: through cb, from cb's address.
        let (peer, ca, cb, s, a) = measure(&c, &listener, Some("cb"), None).await;
        keep.extend([s, a]);
        assert_eq!(peer, ip("10.210.2.1"));
        assert!(cb >= 2 && ca == 0, "ca sent {ca}, cb sent {cb}");

        // Device and source together.
        let (peer, ca, cb, s, a) = measure(&c, &listener, Some("cb"), Some(ip("10.210.2.1"))).await;
        keep.extend([s, a]);
        assert_eq!(peer, ip("10.210.2.1"));
        assert!(cb >= 2 && ca == 0, "ca sent {ca}, cb sent {cb}");

        // A source address alone does not move the traffic: the packets
        // carry cb's address but still leave through ca.
        let (peer, ca, _cb, s, a) = measure(&c, &listener, None, Some(ip("10.210.2.1"))).await;
        keep.extend([s, a]);
        assert_eq!(peer, ip("10.210.2.1"));
        assert!(ca >= 2, "ca sent {ca}");

        // Bound to a device with no route to the destination: refused at
        // once, not left to time out.
        let dest = listener.local_addr().expect("listener address");
        let start = Instant::now();
        let err = connect_via(dest, Some("lo"), None, CONNECT)
            .await
            .expect_err("no route via lo");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{err} took {:?}",
            start.elapsed()
        );
        drop(keep);
    });
}

#[test]
fn connect_times_out_on_a_black_hole() {
    let client = Netns::new("timeout-c", false);
    let server = Netns::new("timeout-s", false);
    topology(&client, &server);
    client.run(|| async {
        let dest = SocketAddr::new(ip(BLACK_HOLE), 80);
        let start = Instant::now();
        let err = connect_via(dest, Some("ca"), None, Duration::from_millis(300))
            .await
            .expect_err("nothing answers");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("via ca"), "{err}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "took {took:?}"
        );
    });
}
