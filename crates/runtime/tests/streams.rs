//! Many concurrent streams through one session, byte-exact both ways,
//! including half-closed ones; resets and unreachable targets.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use baton_runtime::verify::{self, Dir, Mode};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const STREAMS: u64 = 200;
const MIB: u64 = 1 << 20;
/// Bytes each way of most streams. All 200 at 16 MiB put up to gigabytes in
/// this one kernel's socket buffers (applications, agent, gateway and
/// server all on loopback), past `net.ipv4.tcp_mem`'s pressure mark (1.5 GB
/// here): the kernel then drops segments, and a loopback connection in
/// retransmission backoff can stall for a minute. A few streams (`BIG`)
/// still carry more than a replay buffer holds, half-closes included.
const PER: u64 = 4 * MIB;
const BIG: u64 = 16 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_streams_byte_exact_with_half_closes() {
    let shutdown = CancellationToken::new();
    let (server, mut reports) = verify_server().await;
    let k = key();
    let gw = gateway(
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[services.data]\ntarget = \"{server}\"\n[clients.c1]\nkey = \"{}\"\nservices = [\"data\"]\n",
            k.public()
        ),
        &shutdown,
    )
    .await;
    let client = client("c1", &k, gw.local_addrs()[0], &service("data"), &shutdown).await;
    let session = client.wait_up("gw").await.unwrap();
    let addr = client.service_addr("data").unwrap();

    // Every third stream half-closes one direction long before the other
    // ends: the client finishes first (AfterClientFin) or the server does
    // (ServerFinFirst); a few send nothing at all one way.
    let plan = |i: u64| -> (u64, u64, Mode) {
        let n = if i < 6 { BIG } else { PER };
        match i % 6 {
            0 | 3 => (n, n, Mode::Concurrent),
            1 => (n, n, Mode::AfterClientFin),
            2 => (n, n, Mode::ServerFinFirst),
            4 => (0, n, Mode::Concurrent),
            _ => (n, 0, Mode::AfterClientFin),
        }
    };
    let run = async {
        let mut tasks = Vec::new();
        for i in 0..STREAMS {
            let (up, down, mode) = plan(i);
            tasks.push(tokio::spawn(async move {
                let s = TcpStream::connect(addr).await?;
                verify::exchange(s, i, up, down, mode).await
            }));
        }
        let mut client_side = Vec::new();
        for t in tasks {
            client_side.push(t.await.unwrap().unwrap());
        }
        let mut server_side = Vec::new();
        for _ in 0..STREAMS {
            server_side.push(reports.recv().await.unwrap().unwrap());
        }
        (client_side, server_side)
    };
    let (client_side, server_side) = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("streams did not finish in time");
    for r in &client_side {
        assert_eq!(r.expected, plan(r.seed).1);
        assert!(
            r.is_exact(Dir::Down),
            "server→client of stream {} not exact: {r:?}",
            r.seed
        );
    }
    let mut seeds: Vec<u64> = server_side.iter().map(|r| r.seed).collect();
    seeds.sort();
    assert_eq!(seeds, (0..STREAMS).collect::<Vec<_>>());
    for r in &server_side {
        assert_eq!(r.expected, plan(r.seed).0);
        assert!(
            r.is_exact(Dir::Up),
            "client→server of stream {} not exact: {r:?}",
            r.seed
        );
    }
    // One session carried all of them, and their state was released.
    assert_eq!(gw.session_count(), 1);
    assert_eq!(
        gw.stats()
            .streams_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        STREAMS
    );
    assert!(eventually(Duration::from_secs(5), || gw.stream_count() == 0).await);
    assert_eq!(client.wait_up("gw").await.unwrap().id, session.id);
    shutdown.cancel();
}

/// A gateway with one service `s` relaying to `target`, and a client agent
/// `c` allowed it, its session up.
async fn one_service(
    target: std::net::SocketAddr,
    shutdown: &CancellationToken,
) -> (baton_runtime::Gateway, baton_runtime::Client) {
    let k = key();
    let gw = gateway(
        &format!("listen = [\"127.0.0.1:0\"]\n[services.s]\ntarget = \"{target}\"\n[clients.c]\nkey = \"{}\"\nservices = [\"s\"]\n", k.public()),
        shutdown,
    )
    .await;
    let c = client("c", &k, gw.local_addrs()[0], &service("s"), shutdown).await;
    c.wait_up("gw").await.unwrap();
    (gw, c)
}

#[tokio::test]
async fn resets_are_carried_as_resets_both_ways() {
    let shutdown = CancellationToken::new();
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let (_gw, c) = one_service(target, &shutdown).await;
    let addr = c.service_addr("s").unwrap();

    // Server resets: the application sees a reset, not a clean end.
    let mut app = TcpStream::connect(addr).await.unwrap();
    app.write_all(b"hello").await.unwrap();
    let (mut srv, _) = server.accept().await.unwrap();
    let mut buf = [0u8; 5];
    srv.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    baton_os::arm_reset(&srv).unwrap();
    drop(srv);
    let mut rbuf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), app.read(&mut rbuf))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);

    // Application resets: the server sees a reset.
    let mut app = TcpStream::connect(addr).await.unwrap();
    app.write_all(b"x").await.unwrap();
    let (mut srv, _) = server.accept().await.unwrap();
    srv.read_exact(&mut [0u8; 1]).await.unwrap();
    baton_os::arm_reset(&app).unwrap();
    drop(app);
    let r = tokio::time::timeout(Duration::from_secs(5), srv.read(&mut rbuf))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    shutdown.cancel();
}

#[tokio::test]
async fn unreachable_target_closes_the_application_promptly() {
    let shutdown = CancellationToken::new();
    // A port nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (gw, c) = one_service(dead, &shutdown).await;
    let mut app = TcpStream::connect(c.service_addr("s").unwrap())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut app, Duration::from_secs(2)).await,
        "application connection left open"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        gw.stats()
            .legs_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The session is unharmed.
    assert_eq!(gw.session_count(), 1);
    shutdown.cancel();
}

/// A port probe (connect, then close at once) closes before its stream's
/// first leg is open. The half-close must still reach the server when the
/// leg comes, and the stream must end, not ask for new legs forever.
#[tokio::test]
async fn a_connection_closed_before_its_first_leg_still_ends() {
    const PROBES: u64 = 5;
    let shutdown = CancellationToken::new();
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let (gw, c) = one_service(target, &shutdown).await;
    let addr = c.service_addr("s").unwrap();
    for _ in 0..PROBES {
        drop(TcpStream::connect(addr).await.unwrap());
    }
    for _ in 0..PROBES {
        let (mut srv, _) = tokio::time::timeout(Duration::from_secs(10), server.accept())
            .await
            .unwrap()
            .unwrap();
        // The server sees a clean end with no byte, not an open connection.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), srv.read(&mut buf))
            .await
            .expect("the server never saw the probe's end")
            .unwrap();
        assert_eq!(n, 0);
    }
    // The server's side is closed too (dropped above): every stream ends at
    // both ends, each on its first leg.
    assert!(
        eventually(Duration::from_secs(5), || gw.stream_count() == 0
            && c.stream_count() == 0)
        .await
    );
    let stats = gw.stats();
    assert_eq!(
        stats
            .streams_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        PROBES
    );
    assert_eq!(
        stats
            .legs_resumed
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a stream asked for a new leg"
    );
    shutdown.cancel();
}
