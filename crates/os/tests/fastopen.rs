//! TCP Fast Open against a real kernel: a client namespace linked to a
//! server namespace that takes data in SYNs (`net.ipv4.tcp_fastopen = 3`).
//! The first connection asks for a cookie; the next is returned before any
//! packet leaves and carries its first bytes in the SYN, which the server's
//! counters confirm. A host that turned Fast Open off still connects.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use baton_os::connect_via_with;
use baton_os::fastopen::{accept_fast_open, server_enabled};
use common::{run, Netns, Ns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "10.211.1.2:7700";
const CONNECT: Duration = Duration::from_secs(5);

/// Client `fa` 10.211.1.1 — `fb` 10.211.1.2 server; a listener there that
/// takes a Fast Open queue, accepting and echoing what it reads on another
/// thread.
fn topology(client: &Ns, server: &Ns) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    client.ip(&format!(
        "link add fa type veth peer name fb netns {}",
        server.name
    ));
    client.ip("addr add 10.211.1.1/24 dev fa");
    server.ip("addr add 10.211.1.2/24 dev fb");
    client.ip("link set fa up");
    server.ip("link set fb up");
    server.sysctl("net.ipv4.tcp_fastopen=3");
    let listener = server.run(|| async {
        assert_eq!(
            server_enabled(),
            Some(true),
            "read in the server's namespace"
        );
        let l = std::net::TcpListener::bind(SERVER).expect("listen");
        accept_fast_open(&l, 16).expect("fast open queue");
        l
    });
    std::thread::spawn(move || {
        use std::io::Read;
        let mut got = Vec::new();
        for _ in 0..2 {
            let (mut c, _) = listener.accept().expect("accept");
            let mut buf = Vec::new();
            c.set_read_timeout(Some(CONNECT)).expect("timeout");
            let _ = c.read_to_end(&mut buf);
            got.push(buf);
        }
        got
    })
}

fn tcp_ext(ns: &Ns, name: &str) -> u64 {
    let text = run(
        "ip",
        &["netns", "exec", &ns.name, "cat", "/proc/net/netstat"],
    );
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.parse().expect("a number"))
        .expect("counter present")
}

#[test]
fn with_a_cookie_the_first_bytes_ride_in_the_syn() {
    let client = Netns::new("tfo-c", false);
    let server = Netns::new("tfo-s", false);
    let accepted = topology(&client, &server);
    let dest: SocketAddr = SERVER.parse().expect("addr");
    let c = client.handle();
    client.run(move || async move {
        // No cookie yet: an ordinary handshake that asks for one.
        let first = connect_via_with(dest, Some("fa"), None, CONNECT, true)
            .await
            .expect("connect without a cookie");
        drop(first);
        let metrics = c.ip_output("tcp_metrics show 10.211.1.2");
        assert!(
            metrics.contains("fo_cookie"),
            "a cookie was kept: {metrics}"
        );
        // With one: returned before any packet leaves.
        let sent = c.tx_packets("fa");
        let mut second = connect_via_with(dest, Some("fa"), None, CONNECT, true)
            .await
            .expect("connect with a cookie");
        assert_eq!(
            c.tx_packets("fa"),
            sent,
            "nothing sent before the first write"
        );
        second.write_all(b"preamble").await.expect("write");
        second.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        second.read_to_end(&mut rest).await.expect("read");
    });
    let got = accepted.join().expect("server thread");
    assert_eq!(got, vec![Vec::new(), b"preamble".to_vec()]);
    assert_eq!(tcp_ext(&server, "TCPFastOpenCookieReqd"), 1);
    assert_eq!(
        tcp_ext(&server, "TCPFastOpenPassive"),
        1,
        "the second came by Fast Open"
    );
}

#[test]
fn a_host_without_fast_open_connects_as_usual() {
    let client = Netns::new("tfo-off-c", false);
    let server = Netns::new("tfo-off-s", false);
    let accepted = topology(&client, &server);
    client.sysctl("net.ipv4.tcp_fastopen=0");
    let dest: SocketAddr = SERVER.parse().expect("addr");
    client.run(move || async move {
        for bytes in [&b"one"[..], b"two"] {
            let mut c = connect_via_with(dest, Some("fa"), None, CONNECT, true)
                .await
                .expect("connect");
            c.write_all(bytes).await.expect("write");
            c.shutdown().await.expect("shutdown");
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.expect("read");
        }
    });
    let got = accepted.join().expect("server thread");
    assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(tcp_ext(&server, "TCPFastOpenPassive"), 0);
}
