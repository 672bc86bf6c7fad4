//! Client services (server → client) on loopback: a server beside the
//! gateway connects to the address the gateway assigned to a client agent,
//! and reaches a service on the agent's side through it. Each test has its
//! own pool (127.77.N.0/24) so that tests running in parallel never share an
//! address; every agent's push service is on port 7000 there.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use baton_proto::ClientKey;
use baton_runtime::client::{ExposedState, SwitchKind};
use baton_runtime::config::ClientConfig;
use baton_runtime::verify::{self, Dir, Mode};
use baton_runtime::{Client, Gateway};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const PORT: u16 = 7000;

/// A gateway with the client service `push` (port 7000), `camera` (7001),
/// the pool `127.77.{net}.0/24`, and the given clients: (id, key, exposes).
async fn gateway_with(
    net: u8,
    clients: &[(&str, &ClientKey, &str)],
    shutdown: &CancellationToken,
) -> Gateway {
    let mut toml = format!(
        "listen = [\"127.0.0.1:0\"]\nvirtual_pool = \"127.77.{net}.0/24\"\n[exposed.push]\nport = {PORT}\n[exposed.camera]\nport = {}\n",
        PORT + 1
    );
    for (id, key, exposes) in clients {
        toml.push_str(&format!(
            "[clients.{id}]\nkey = \"{}\"\nexposes = [{exposes}]\n",
            key.public()
        ));
    }
    gateway(&toml, shutdown).await
}

/// A client agent exposing `push` (and whatever `more` adds) through `gw`,
/// with the interfaces `a` (127.0.0.2) and `b` (127.0.0.3).
async fn agent(
    id: &str,
    key: &ClientKey,
    gw: &Gateway,
    target: SocketAddr,
    more: &str,
    shutdown: &CancellationToken,
) -> Client {
    let toml = format!(
        "id = \"{id}\"\nkey_file = \"unused\"\n[interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n[interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n\
         [gateways.gw]\naddresses = [\"{}\"]\n[exposed.push]\ngateway = \"gw\"\ntarget = \"{target}\"\n{more}",
        gw.local_addrs()[0]
    );
    let cfg = ClientConfig::from_toml(std::path::Path::new("client-services.toml"), &toml).unwrap();
    let c = Client::start(cfg, key.clone(), shutdown.clone())
        .await
        .unwrap();
    c.wait_up("gw").await.unwrap();
    c
}

/// Waits for the gateway's answer about `service` and returns it.
async fn answer(c: &Client, service: &str) -> baton_runtime::client::ExposedStatus {
    let find = || c.exposed().into_iter().find(|e| e.name == service).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || find().state
            != ExposedState::Pending)
        .await,
        "the gateway never answered for {service}"
    );
    find()
}

/// Where the gateway listens for the agent's `push`.
async fn push_address(c: &Client) -> SocketAddr {
    let e = answer(c, "push").await;
    assert_eq!(e.state, ExposedState::Listening, "{e:?}");
    e.address.unwrap()
}

/// A service on the client's side that answers each connection with
/// "NAME got " and everything it read, and reports what it read.
async fn tagged_server(name: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let mut reply = format!("{name} got ").into_bytes();
                    reply.extend_from_slice(&got);
                    let _ = s.write_all(&reply).await;
                    let _ = s.shutdown().await;
                    let _ = tx.send(got);
                }
            });
        }
    });
    (addr, rx)
}

/// Pushes `msg` to `addr`, half-closes, and returns the whole answer.
async fn push(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let run = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(msg).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("push stalled")
}

async fn report(
    rx: &mut mpsc::UnboundedReceiver<std::io::Result<verify::Report>>,
) -> verify::Report {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("no report from the target")
        .unwrap()
        .unwrap()
}

/// (a) A server beside the gateway pushes to the agent's virtual address;
/// the agent's local target gets every byte, and its answer gets back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reaches_the_agents_target_byte_exact_and_back() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(1, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, mut reports) = verify_server().await;
    let c = agent("a", &k, &gw, target, "", &shutdown).await;
    let addr = push_address(&c).await;
    assert_eq!(addr.port(), PORT);
    assert_eq!(Some(addr.ip()), gw.client_address("a"));
    assert!(
        addr.ip().to_string().starts_with("127.77.1."),
        "{addr} is not from the pool"
    );
    // The agent's status document shows it.
    let st = baton_runtime::admin::status(&c).await;
    assert_eq!(st["exposed"][0]["name"], "push");
    assert_eq!(st["exposed"][0]["state"], "listening");
    assert_eq!(st["exposed"][0]["address"], addr.to_string());
    assert_eq!(st["exposed"][0]["target"], target.to_string());

    // Both directions at once, then the server → client direction only
    // after the pusher half-closed.
    for (seed, mode) in [(11, Mode::Concurrent), (12, Mode::AfterClientFin)] {
        let s = TcpStream::connect(addr).await.unwrap();
        let run = verify::exchange(s, seed, 3 * MIB, 2 * MIB, mode);
        let back = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("push stalled")
            .unwrap();
        assert!(back.is_exact(Dir::Down), "{mode:?}: {back:?}");
        let there = report(&mut reports).await;
        assert!(there.is_exact(Dir::Up), "{mode:?}: {there:?}");
    }
    let st = baton_runtime::admin::status(&c).await;
    assert_eq!(st["exposed"][0]["connections"], 2);
    assert!(
        eventually(Duration::from_secs(5), || gw.stream_count() == 0
            && c.stream_count() == 0)
        .await
    );
    shutdown.cancel();
}

/// (b) Two agents with their own keys expose the same port: each has its
/// own address, and each push reaches the agent it was meant for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_the_same_port_each_get_their_own_pushes() {
    let shutdown = CancellationToken::new();
    let (ka, kb) = (key(), key());
    let gw = gateway_with(
        2,
        &[("a", &ka, "\"push\""), ("b", &kb, "\"push\"")],
        &shutdown,
    )
    .await;
    let (ta, mut got_a) = tagged_server("a").await;
    let (tb, mut got_b) = tagged_server("b").await;
    let a = agent("a", &ka, &gw, ta, "", &shutdown).await;
    let b = agent("b", &kb, &gw, tb, "", &shutdown).await;
    let (addr_a, addr_b) = (push_address(&a).await, push_address(&b).await);
    assert_ne!(addr_a.ip(), addr_b.ip());
    assert_eq!((addr_a.port(), addr_b.port()), (PORT, PORT));
    for i in 0..3 {
        let to_a = format!("news {i} for a");
        let to_b = format!("news {i} for b");
        // Interleaved on purpose: the answers must not cross.
        let (ra, rb) = tokio::join!(push(addr_a, to_a.as_bytes()), push(addr_b, to_b.as_bytes()));
        assert_eq!(String::from_utf8(ra).unwrap(), format!("a got {to_a}"));
        assert_eq!(String::from_utf8(rb).unwrap(), format!("b got {to_b}"));
        assert_eq!(got_a.recv().await.unwrap(), to_a.as_bytes());
        assert_eq!(got_b.recv().await.unwrap(), to_b.as_bytes());
    }
    assert!(
        got_a.try_recv().is_err() && got_b.try_recv().is_err(),
        "a push reached an agent twice"
    );
    shutdown.cancel();
}

/// (c) A long push stream lives through planned and sudden switches of the
/// agent, byte-exact both ways; the agent's address does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_push_stream_survives_planned_and_sudden_switches() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(3, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, mut reports) = verify_server().await;
    let c = agent("a", &k, &gw, target, "", &shutdown).await;
    let addr = push_address(&c).await;
    let long = tokio::spawn(async move {
        let s = TcpStream::connect(addr).await.unwrap();
        verify::exchange_paced(s, 42, 16 * MIB, 16 * MIB, Mode::Concurrent, 6 * MIB).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.switch("b").await.unwrap();
    assert_eq!(
        (r[0].kind, r[0].to.as_str(), r[0].streams),
        (SwitchKind::Planned, "b", 1),
        "the push stream moved"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.switch("a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sudden: a goes down, the session finds b by itself.
    c.set_path_up("a", false).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || c.switches().len() >= 3).await,
        "no sudden switch"
    );
    let sw = c.switches()[2].clone();
    assert_eq!(
        (sw.kind, sw.to.as_str(), sw.streams),
        (SwitchKind::Unexpected, "b", 1)
    );
    c.set_path_up("a", true).unwrap();
    let down = tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .unwrap()
        .unwrap()
        .expect("no reset, no error");
    assert!(down.is_exact(Dir::Down), "{down:?}");
    let up = report(&mut reports).await;
    assert!(up.is_exact(Dir::Up), "{up:?}");
    assert_eq!(gw.session_count(), 1, "one session throughout");
    assert_eq!(push_address(&c).await, addr);
    shutdown.cancel();
}

/// A push that arrives while the agent has no network waits for it: the
/// gateway announces the stream again when the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_while_the_agent_is_between_networks_waits_for_it() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(4, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, mut got) = tagged_server("a").await;
    let c = agent("a", &k, &gw, target, "", &shutdown).await;
    let addr = push_address(&c).await;
    c.set_path_up("a", false).unwrap();
    c.set_path_up("b", false).unwrap();
    // The server's bytes wait at the gateway meanwhile.
    let pushed = tokio::spawn(push(addr, b"while away"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(got.try_recv().is_err());
    c.set_path_up("b", true).unwrap();
    assert_eq!(pushed.await.unwrap(), b"a got while away");
    assert_eq!(got.recv().await.unwrap(), b"while away");
    shutdown.cancel();
}

/// (d) The gateway refuses client services its configuration does not give
/// the client, and only listens for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_a_client_may_not_expose_are_refused() {
    let shutdown = CancellationToken::new();
    let (ka, kb) = (key(), key());
    // a may expose push but not camera; b nothing at all.
    let gw = gateway_with(5, &[("a", &ka, "\"push\""), ("b", &kb, "")], &shutdown).await;
    let (target, _got) = tagged_server("x").await;
    let camera = format!("[exposed.camera]\ngateway = \"gw\"\ntarget = \"{target}\"\n");
    let a = agent("a", &ka, &gw, target, &camera, &shutdown).await;
    let b = agent("b", &kb, &gw, target, "", &shutdown).await;
    let addr = push_address(&a).await;
    let cam = answer(&a, "camera").await;
    assert_eq!(cam.state, ExposedState::Refused, "{cam:?}");
    assert!(
        cam.error.as_deref().unwrap().contains("not allowed"),
        "{cam:?}"
    );
    let refused = answer(&b, "push").await;
    assert_eq!(
        (refused.state, refused.address),
        (ExposedState::Refused, None),
        "{refused:?}"
    );
    assert_eq!(gw.client_address("b"), None, "b got no address");
    // Nothing listens for a's camera.
    let e = TcpStream::connect(SocketAddr::new(addr.ip(), PORT + 1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(push(addr, b"ok").await, b"x got ok");
    let st = baton_runtime::admin::status(&b).await;
    assert_eq!(st["exposed"][0]["state"], "refused");
    shutdown.cancel();
}

/// (d) When the agent's session is released, its address refuses
/// connections and open pushes are closed; the agent gets the same address
/// again when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_agents_address_refuses_connections() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(6, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, _got) = tagged_server("a").await;
    let first = CancellationToken::new();
    let a = agent("a", &k, &gw, target, "", &first).await;
    let addr = push_address(&a).await;
    assert_eq!(push(addr, b"1").await, b"a got 1");
    // A push in progress when the session ends.
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"unfinished").await.unwrap();
    // The agent stops: DISCONNECT, and the gateway releases the session.
    first.cancel();
    a.wait().await;
    assert!(eventually(Duration::from_secs(5), || gw.session_count() == 0).await);
    assert_eq!(gw.client_address("a"), None);
    assert!(
        closed_within(&mut open, Duration::from_secs(5)).await,
        "the open push was not closed"
    );
    let refused = async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("the released address still accepts");

    // Back (a new session, same client id): the same address.
    let again = agent("a", &k, &gw, target, "", &shutdown).await;
    assert_eq!(push_address(&again).await, addr);
    assert_eq!(push(addr, b"2").await, b"a got 2");
    shutdown.cancel();
}

/// An agent that cannot reach its target resets the stream; the gateway
/// closes the server's connection and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_closes_the_servers_connection() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(7, &[("a", &k, "\"push\"")], &shutdown).await;
    // A port where nothing listens.
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let a = agent("a", &k, &gw, gone, "", &shutdown).await;
    let addr = push_address(&a).await;
    for _ in 0..3 {
        // The gateway accepts and then resets: so fast on loopback that the
        // reset may already be what connect() reports.
        match TcpStream::connect(addr).await {
            Ok(mut s) => {
                let _ = s.write_all(b"anyone there?").await;
                assert!(
                    closed_within(&mut s, Duration::from_secs(10)).await,
                    "the server's connection stayed open"
                );
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert!(
        eventually(Duration::from_secs(5), || a.exposed()[0].connections == 3).await,
        "every connection reached the agent"
    );
    assert!(
        eventually(Duration::from_secs(5), || gw.stream_count() == 0
            && a.stream_count() == 0)
        .await
    );
    assert_eq!(gw.session_count(), 1);
    shutdown.cancel();
}
