//! Two client agents with their own keys and services on one gateway;
//! refusals; garbage, forged control frames and forged or replayed leg
//! preambles close only the offending connection.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use baton_proto::wire::{ConnKind, Preface, TAG_LEN};
use baton_proto::{Message, Offset, RefuseReason, StreamId};
use baton_runtime::verify::{self, Dir, Mode};
use baton_runtime::SessionError;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Bed {
    shutdown: CancellationToken,
    gw: baton_runtime::Gateway,
    key_a: baton_proto::ClientKey,
    key_b: baton_proto::ClientKey,
    reports: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<verify::Report>>,
}

async fn bed() -> Bed {
    let shutdown = CancellationToken::new();
    let (server, reports) = verify_server().await;
    let (key_a, key_b) = (key(), key());
    let gw = gateway(
        &format!(
            r#"listen = ["127.0.0.1:0"]
               [services.alpha]
               target = "{server}"
               [services.beta]
               target = "{server}"
               [clients.a]
               key = "{}"
               services = ["alpha"]
               [clients.b]
               key = "{}"
               services = ["beta"]
            "#,
            key_a.public(),
            key_b.public()
        ),
        &shutdown,
    )
    .await;
    Bed {
        shutdown,
        gw,
        key_a,
        key_b,
        reports,
    }
}

async fn verified(addr: std::net::SocketAddr, seed: u64) -> bool {
    let s = TcpStream::connect(addr).await.unwrap();
    let run = verify::exchange(s, seed, 1 << 20, 1 << 20, Mode::Concurrent);
    match tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("stream stalled")
    {
        Ok(r) => r.is_exact(Dir::Down),
        Err(_) => false,
    }
}

async fn report(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<verify::Report>>,
) -> verify::Report {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("no server report")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_reaches_only_its_own_services() {
    let mut bed = bed().await;
    let gw_addr = bed.gw.local_addrs()[0];
    // Both clients configure both services; the gateway allows one each.
    let both = format!("{}{}", service("alpha"), service("beta"));
    let a = client("a", &bed.key_a, gw_addr, &both, &bed.shutdown).await;
    let b = client("b", &bed.key_b, gw_addr, &both, &bed.shutdown).await;
    a.wait_up("gw").await.unwrap();
    b.wait_up("gw").await.unwrap();
    assert!(verified(a.service_addr("alpha").unwrap(), 1).await);
    assert!(verified(b.service_addr("beta").unwrap(), 2).await);
    assert!(report(&mut bed.reports).await.is_exact(Dir::Up));
    assert!(report(&mut bed.reports).await.is_exact(Dir::Up));
    // The unlisted service: the application's connection is closed, nothing reaches the server.
    for addr in [
        a.service_addr("beta").unwrap(),
        b.service_addr("alpha").unwrap(),
    ] {
        // The refusal can be so quick that the reset lands before connect()
        // returns: that counts as closed too.
        if let Ok(mut s) = TcpStream::connect(addr).await {
            assert!(closed_within(&mut s, Duration::from_secs(3)).await);
        }
    }
    assert!(
        eventually(Duration::from_secs(3), || bed
            .gw
            .stats()
            .legs_refused
            .load(Ordering::Relaxed)
            == 2)
        .await
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bed.reports.recv())
            .await
            .is_err(),
        "a refused stream reached the server"
    );
    let mut clients = bed.gw.session_clients();
    clients.sort();
    assert_eq!(clients, ["a", "b"]);
    bed.shutdown.cancel();
}

#[tokio::test]
async fn wrong_key_and_unknown_client_are_refused() {
    let bed = bed().await;
    let gw_addr = bed.gw.local_addrs()[0];
    // b's key presented as a.
    let err = raw_session(gw_addr, "a", &bed.key_b).await.err().unwrap();
    assert!(
        matches!(
            err,
            Message::Refused {
                reason: RefuseReason::BadProof,
                ..
            }
        ),
        "{err:?}"
    );
    let err = raw_session(gw_addr, "nobody", &bed.key_a)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Message::Refused {
                reason: RefuseReason::UnknownClient,
                ..
            }
        ),
        "{err:?}"
    );
    // Through the client agent, the refusal surfaces with its reason.
    let c = client("a", &bed.key_b, gw_addr, &service("alpha"), &bed.shutdown).await;
    match c.wait_up("gw").await {
        Err(SessionError::Refused {
            reason: RefuseReason::BadProof,
            ..
        }) => {}
        other => panic!("expected BadProof, got {other:?}"),
    }
    assert_eq!(bed.gw.session_count(), 0);
    bed.shutdown.cancel();
}

#[tokio::test]
async fn protocol_version_mismatch_is_refused_with_reason() {
    let bed = bed().await;
    let mut s = TcpStream::connect(bed.gw.local_addrs()[0]).await.unwrap();
    let mut p = Preface::new(ConnKind::Control).encode();
    p[5] = 9;
    s.write_all(&p).await.unwrap();
    let (frame, _) = read_frame(&mut s, false).await.unwrap();
    match Message::decode(frame[0], &frame[3..]).unwrap() {
        Message::Refused {
            reason: RefuseReason::Version,
            ..
        } => {}
        m => panic!("{m:?}"),
    }
    bed.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_forgeries_close_only_that_connection() {
    let mut bed = bed().await;
    let gw_addr = bed.gw.local_addrs()[0];
    let a = client("a", &bed.key_a, gw_addr, &service("alpha"), &bed.shutdown).await;
    let live = a.wait_up("gw").await.unwrap();
    let alpha = a.service_addr("alpha").unwrap();

    // A long stream in flight while the attacks happen.
    let long = tokio::spawn(async move {
        let s = TcpStream::connect(alpha).await.unwrap();
        verify::exchange(s, 77, 32 << 20, 32 << 20, Mode::Concurrent)
            .await
            .unwrap()
    });

    // 1. Garbage instead of a preface.
    let mut g = TcpStream::connect(gw_addr).await.unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut g, Duration::from_secs(2)).await);

    // 2. A valid preface and an absurd frame length.
    let mut g = TcpStream::connect(gw_addr).await.unwrap();
    g.write_all(&Preface::new(ConnKind::Control).encode())
        .await
        .unwrap();
    g.write_all(&[0x01, 0xff, 0xff, 0, 0]).await.unwrap();
    assert!(closed_within(&mut g, Duration::from_secs(2)).await);

    // 3. A session of our own, then a control frame with a forged tag.
    let mut raw = raw_session(gw_addr, "b", &bed.key_b).await.unwrap();
    let mut frame = Vec::new();
    raw.cipher.seal(&Message::Ping { seq: 1 }, &mut frame);
    let n = frame.len();
    frame[n - 1] ^= 0x40;
    raw.stream.write_all(&frame).await.unwrap();
    assert!(closed_within(&mut raw.stream, Duration::from_secs(2)).await);

    // 4. A forged Disconnect for the live session of client a, built with
    //    another session's keys, sent on a new connection: no effect possible
    //    without a's keys, and a leg preamble for a's session with a bad tag
    //    is dropped.
    let mut leg = TcpStream::connect(gw_addr).await.unwrap();
    let mut pre = Preface::new(ConnKind::Leg).encode().to_vec();
    let open = Message::LegOpen {
        session_id: live.id,
        stream: StreamId(0),
        generation: 1,
        received: Offset(0),
        service: String::new(),
        handover: false,
        compression: baton_proto::Compression::None,
    };
    raw.keys.leg_key().seal_open(&open, &mut pre);
    leg.write_all(&pre).await.unwrap();
    assert!(closed_within(&mut leg, Duration::from_secs(2)).await);

    // 5. A replay of a valid preamble of our own session (take-over attempt):
    //    the first open is accepted, the replay refused.
    let raw2 = raw_session(gw_addr, "b", &bed.key_b).await.unwrap();
    let open = Message::LegOpen {
        session_id: raw2.session_id,
        stream: StreamId(0),
        generation: 0,
        received: Offset(0),
        service: "beta".into(),
        handover: false,
        compression: baton_proto::Compression::None,
    };
    let mut pre = Preface::new(ConnKind::Leg).encode().to_vec();
    let open_tag = raw2.keys.leg_key().seal_open(&open, &mut pre);
    let mut first = TcpStream::connect(gw_addr).await.unwrap();
    first.write_all(&pre).await.unwrap();
    let (reply, tag) = read_frame(&mut first, true).await.unwrap();
    assert!(raw2.keys.leg_key().verify_reply(&open_tag, &reply, &tag));
    assert!(matches!(
        Message::decode(reply[0], &reply[3..]).unwrap(),
        Message::LegReply { result: Ok(_), .. }
    ));
    let mut replay = TcpStream::connect(gw_addr).await.unwrap();
    replay.write_all(&pre).await.unwrap();
    let (reply, _) = read_frame(&mut replay, true).await.unwrap();
    assert!(matches!(
        Message::decode(reply[0], &reply[3..]).unwrap(),
        Message::LegReply {
            result: Err(RefuseReason::BadStream),
            ..
        }
    ));
    assert_eq!(tag.len(), TAG_LEN);

    // 6. Random bytes after a valid leg preface.
    let mut g = TcpStream::connect(gw_addr).await.unwrap();
    g.write_all(&Preface::new(ConnKind::Leg).encode())
        .await
        .unwrap();
    g.write_all(&[0x20, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    g.write_all(&[0u8; TAG_LEN]).await.unwrap();
    assert!(closed_within(&mut g, Duration::from_secs(2)).await);

    // The gateway counted the violations and kept serving: the long stream
    // is intact and new streams work.
    assert!(bed.gw.stats().protocol_errors.load(Ordering::Relaxed) >= 4);
    let r = tokio::time::timeout(Duration::from_secs(60), long)
        .await
        .expect("long stream stalled")
        .unwrap();
    assert!(r.is_exact(Dir::Down));
    // Drain server reports: the long stream (77) and raw2's stream 0 (closed
    // mid-header, an error) may come in any order.
    let mut saw_long = false;
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(2), bed.reports.recv()).await {
        if let Ok(r) = r {
            if r.seed == 77 {
                assert!(r.is_exact(Dir::Up));
                saw_long = true;
            }
        }
        if saw_long {
            break;
        }
    }
    assert!(saw_long);
    assert!(verified(alpha, 78).await);
    assert!(bed.gw.session_clients().contains(&"a".to_owned()));
    drop(first);
    bed.shutdown.cancel();
}

#[tokio::test]
async fn nothing_from_the_network_panics_the_gateway() {
    // Seeded random junk after each preface kind; the gateway must answer by
    // closing, and still accept a real session afterwards.
    let bed = bed().await;
    let gw_addr = bed.gw.local_addrs()[0];
    let seed: u64 = 0x5eed_0001;
    println!("junk seed {seed:#x}");
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..200 {
        let mut s = TcpStream::connect(gw_addr).await.unwrap();
        let kind = if i % 2 == 0 {
            ConnKind::Control
        } else {
            ConnKind::Leg
        };
        let mut junk = Preface::new(kind).encode().to_vec();
        let len = (next() % 200) as usize;
        junk.extend((0..len).map(|_| next() as u8));
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut sink)).await;
    }
    assert!(raw_session(gw_addr, "a", &bed.key_a).await.is_ok());
    bed.shutdown.cancel();
}
