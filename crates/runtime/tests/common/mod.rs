//! Shared set-up for the loopback integration tests: a gateway, client
//! agents and verifying servers, all in this process on 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use baton_proto::wire::{FRAME_HEADER_LEN, TAG_LEN};
use baton_proto::{ClientHandshake, ClientKey, ControlCipher, Message, Role, SessionKeys};
use baton_runtime::config::{ClientConfig, GatewayConfig};
use baton_runtime::verify::{self, Report};
use baton_runtime::{Client, Gateway};
use ring::rand::SystemRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Logs to the test's output when `BATON_LOG` is set (e.g. `BATON_LOG=debug`).
pub fn logs() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

pub fn key() -> ClientKey {
    logs();
    ClientKey::generate(&SystemRandom::new()).unwrap()
}

/// An echo server on loopback: every connection gets back what it sends,
/// read in pieces of up to 1 MiB, and a half-close after its own.
pub async fn echo_server() -> SocketAddr {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A verifying server on loopback; reports of what it received.
pub async fn verify_server() -> (SocketAddr, mpsc::UnboundedReceiver<std::io::Result<Report>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(verify::serve(l, tx));
    (addr, rx)
}

pub async fn gateway(toml: &str, shutdown: &CancellationToken) -> Gateway {
    let cfg = GatewayConfig::from_toml(Path::new("test-gateway.toml"), toml).unwrap();
    Gateway::start(cfg, shutdown.clone()).await.unwrap()
}

/// A client agent with one gateway `gw` and the given `[services.*]` tables.
pub async fn client(
    id: &str,
    key: &ClientKey,
    gw: SocketAddr,
    services: &str,
    shutdown: &CancellationToken,
) -> Client {
    let toml = format!(
        "id = \"{id}\"\nkey_file = \"unused\"\n[gateways.gw]\naddresses = [\"{gw}\"]\n{services}"
    );
    let cfg = ClientConfig::from_toml(Path::new("test-client.toml"), &toml).unwrap();
    Client::start(cfg, key.clone(), shutdown.clone())
        .await
        .unwrap()
}

pub fn service(name: &str) -> String {
    format!("[services.{name}]\ngateway = \"gw\"\nlisten = \"127.0.0.1:0\"\n")
}

/// A control connection driven by hand, for tests that misbehave on purpose.
pub struct RawSession {
    pub stream: TcpStream,
    pub session_id: u64,
    pub keys: SessionKeys,
    pub cipher: ControlCipher,
}

/// Reads one frame: header, payload and, if `tagged`, the tag.
pub async fn read_frame(s: &mut TcpStream, tagged: bool) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    s.read_exact(&mut h).await?;
    let len = u16::from_be_bytes([h[1], h[2]]) as usize;
    let mut frame = h.to_vec();
    frame.resize(FRAME_HEADER_LEN + len, 0);
    s.read_exact(&mut frame[FRAME_HEADER_LEN..]).await?;
    let mut tag = vec![0u8; if tagged { TAG_LEN } else { 0 }];
    s.read_exact(&mut tag).await?;
    Ok((frame, tag))
}

/// Runs the handshake by hand. Err carries the gateway's refusal.
pub async fn raw_session(gw: SocketAddr, id: &str, key: &ClientKey) -> Result<RawSession, Message> {
    let mut s = TcpStream::connect(gw).await.unwrap();
    let (hs, first) = ClientHandshake::start(id, key, 0, &SystemRandom::new()).unwrap();
    s.write_all(&first).await.unwrap();
    let (challenge, _) = read_frame(&mut s, false).await.unwrap();
    let m = Message::decode(challenge[0], &challenge[3..]).unwrap();
    if !matches!(m, Message::Challenge { .. }) {
        return Err(m);
    }
    let (session_id, keys, auth) = hs.on_challenge(&challenge).unwrap();
    s.write_all(&auth).await.unwrap();
    let mut hdr = [0u8; 3];
    s.read_exact(&mut hdr).await.unwrap();
    let len = u16::from_be_bytes([hdr[1], hdr[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    if hdr[0] != 0x04 {
        return Err(Message::decode(hdr[0], &payload).unwrap());
    }
    let mut tag = [0u8; TAG_LEN];
    s.read_exact(&mut tag).await.unwrap();
    let mut cipher = ControlCipher::new(&keys, Role::Client);
    let m = cipher.open(&hdr, &payload, &tag).unwrap();
    assert!(matches!(m, Message::Accepted { .. }), "{m:?}");
    Ok(RawSession {
        stream: s,
        session_id,
        keys,
        cipher,
    })
}

/// Waits until `f` holds, polling, for at most `limit`.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// True if the peer closed `s` (EOF or reset) within `limit`.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// `[clients.*]` tables: each client with its key and the given services
/// (a TOML list body, e.g. `"\"data\""`).
pub fn clients_section(keys: &[(String, ClientKey)], services: &str) -> String {
    keys.iter()
        .map(|(id, k)| {
            format!(
                "[clients.{id}]\nkey = \"{}\"\nservices = [{services}]\n",
                k.public()
            )
        })
        .collect()
}

/// A client agent with interfaces `a` (127.0.0.2, preferred) and `b`
/// (127.0.0.3) and the given services, its session up on `a`.
pub async fn two_path_agent(
    id: &str,
    key: &ClientKey,
    gw: SocketAddr,
    services: &str,
    shutdown: &CancellationToken,
) -> Client {
    let more = format!(
        "[interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n[interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n{services}"
    );
    let c = client(id, key, gw, &more, shutdown).await;
    assert_eq!(c.wait_up("gw").await.unwrap().path, "a");
    c
}

/// Runs `streams` exchanges of `bytes` each way per agent through service
/// `data` while every agent makes a planned switch to `b` and then a sudden
/// one back to `a`; asserts that every byte arrived, both ways (`reports`
/// is the verifying server's).
pub async fn exchanges_across_two_switches(
    agents: &[Client],
    reports: &mut mpsc::UnboundedReceiver<std::io::Result<Report>>,
    streams: u64,
    bytes: u64,
) {
    use baton_runtime::verify::{Dir, Mode};
    let mut exchanges = Vec::new();
    for (i, c) in agents.iter().enumerate() {
        for s in 0..streams {
            let addr = c.service_addr("data").unwrap();
            let seed = (i as u64) * 100 + s;
            exchanges.push(tokio::spawn(async move {
                let conn = TcpStream::connect(addr).await.unwrap();
                verify::exchange_paced(conn, seed, bytes, bytes, Mode::Concurrent, 2 << 20).await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in agents {
        c.switch("b").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for c in agents {
        c.set_path_up("b", false).unwrap();
    }
    for c in agents {
        assert!(eventually(Duration::from_secs(10), || c.switches().len() >= 2).await);
        assert_eq!(c.wait_up("gw").await.unwrap().path, "a");
    }
    for e in exchanges {
        let down = e.await.unwrap().expect("no reset, no error");
        assert!(down.is_exact(Dir::Down), "{down:?}");
    }
    for _ in 0..agents.len() as u64 * streams {
        let up = reports.recv().await.unwrap().unwrap();
        assert!(up.is_exact(Dir::Up), "{up:?}");
    }
}
