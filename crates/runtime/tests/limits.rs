//! The session limit and the inactivity timeout.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use baton_proto::{Message, RefuseReason};
use baton_runtime::verify::{self, Mode};
use baton_runtime::SessionError;
use common::*;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn session_limit_answers_refused_capacity_full() {
    let shutdown = CancellationToken::new();
    let (k1, k2) = (key(), key());
    let gw = gateway(
        &format!(
            "listen = [\"127.0.0.1:0\"]\nmax_sessions = 1\n[clients.one]\nkey = \"{}\"\nservices = []\n[clients.two]\nkey = \"{}\"\nservices = []\n",
            k1.public(),
            k2.public()
        ),
        &shutdown,
    )
    .await;
    let addr = gw.local_addrs()[0];
    let first = raw_session(addr, "one", &k1).await.unwrap();
    match raw_session(addr, "two", &k2).await {
        Err(Message::Refused {
            reason: RefuseReason::CapacityFull,
            detail,
        }) => assert!(detail.contains("1 sessions"), "{detail}"),
        Err(other) => panic!("expected CapacityFull, got {other:?}"),
        Ok(_) => panic!("a second session was accepted beyond max_sessions = 1"),
    }
    // Through the client agent the reason is visible, and it is not permanent.
    let c = client("two", &k2, addr, "", &shutdown).await;
    let failed = eventually(Duration::from_secs(3), || {
        matches!(
            c.link_state("gw"),
            Some(baton_runtime::LinkState::Failed(SessionError::Refused {
                reason: RefuseReason::CapacityFull,
                ..
            }))
        )
    })
    .await;
    assert!(failed);
    assert_eq!(gw.session_count(), 1);
    // Losing the control connection does not free the slot: the session is
    // held for its client until the inactivity timeout.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        raw_session(addr, "one", &k1).await.is_err(),
        "capacity freed while the first session is held"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn silent_session_is_released_with_its_streams() {
    let shutdown = CancellationToken::new();
    let (server, _reports) = verify_server().await;
    let k = key();
    let gw = gateway(
        &format!(
            "listen = [\"127.0.0.1:0\"]\ninactivity_timeout = \"600ms\"\nswitch_timeout = \"400ms\"\n[services.s]\ntarget = \"{server}\"\n[clients.c]\nkey = \"{}\"\nservices = [\"s\"]\n",
            k.public()
        ),
        &shutdown,
    )
    .await;
    let addr = gw.local_addrs()[0];

    // A live client agent pings often enough: its session survives several timeouts.
    let live = client("c", &k, addr, &service("s"), &shutdown).await;
    let live_id = live.wait_up("gw").await.unwrap().id;

    // A hand-driven session that opens a stream and then says nothing.
    let raw = raw_session(addr, "c", &k).await.unwrap();
    let mut leg = TcpStream::connect(addr).await.unwrap();
    let mut pre = baton_proto::Preface::new(baton_proto::ConnKind::Leg)
        .encode()
        .to_vec();
    let open = Message::LegOpen {
        session_id: raw.session_id,
        stream: baton_proto::StreamId(0),
        generation: 0,
        received: baton_proto::Offset(0),
        service: "s".into(),
        handover: false,
        compression: baton_proto::Compression::None,
    };
    raw.keys.leg_key().seal_open(&open, &mut pre);
    tokio::io::AsyncWriteExt::write_all(&mut leg, &pre)
        .await
        .unwrap();
    read_frame(&mut leg, true).await.unwrap();
    assert_eq!(gw.session_count(), 2);
    assert_eq!(gw.stream_count(), 1);

    // The silent session is detached after the inactivity timeout and
    // released after the switch timeout, with its stream; the live one stays.
    assert!(
        closed_within(&mut leg, Duration::from_secs(3)).await,
        "stream of the released session still open"
    );
    assert!(eventually(Duration::from_secs(1), || gw.session_count() == 1).await);
    assert_eq!(gw.stats().sessions_expired.load(Ordering::Relaxed), 1);
    assert_eq!(gw.stream_count(), 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(live.wait_up("gw").await.unwrap().id, live_id);
    assert_eq!(gw.session_count(), 1);
    let s = TcpStream::connect(live.service_addr("s").unwrap())
        .await
        .unwrap();
    assert!(verify::exchange(s, 5, 1000, 1000, Mode::Concurrent)
        .await
        .unwrap()
        .is_exact(verify::Dir::Down));
    drop(raw);
    shutdown.cancel();
}

#[tokio::test]
async fn disconnect_releases_the_session_at_once() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway(
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[clients.c]\nkey = \"{}\"\nservices = []\n",
            k.public()
        ),
        &shutdown,
    )
    .await;
    let client_stop = CancellationToken::new();
    let c = client("c", &k, gw.local_addrs()[0], "", &client_stop).await;
    c.wait_up("gw").await.unwrap();
    assert_eq!(gw.session_count(), 1);
    client_stop.cancel();
    c.wait().await;
    assert_eq!(
        gw.session_count(),
        0,
        "DISCONNECT did not release the session"
    );
    assert_eq!(gw.stats().sessions_expired.load(Ordering::Relaxed), 0);
    shutdown.cancel();
}

/// A session whose control connection is gone is released the switch
/// timeout after it went, also when that is much shorter than the
/// inactivity timeout it was waiting on while attached.
#[tokio::test]
async fn a_detached_session_is_released_after_the_switch_timeout() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway(
        &format!(
            "listen = [\"127.0.0.1:0\"]\ninactivity_timeout = \"1h\"\nswitch_timeout = \"300ms\"\n[clients.c]\nkey = \"{}\"\nservices = []\n",
            k.public()
        ),
        &shutdown,
    )
    .await;
    let raw = raw_session(gw.local_addrs()[0], "c", &k).await.unwrap();
    assert_eq!(gw.session_count(), 1);
    drop(raw);
    assert!(
        eventually(Duration::from_secs(10), || gw.session_count() == 0).await,
        "detached session never released"
    );
    assert_eq!(gw.stats().sessions_expired.load(Ordering::Relaxed), 1);
    shutdown.cancel();
}
