//! One client agent with sessions to two gateways (the seed's multi-site
//! configuration): each service goes to its own gateway, a switch moves
//! every session and completes when each gateway has completed, and a
//! subscriber learns of each session's new path with its measurements.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use baton_runtime::client::SwitchKind;
use baton_runtime::config::ClientConfig;
use baton_runtime::verify::{self, Dir, Mode};
use baton_runtime::Client;
use common::*;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn two_gateways_move_together_and_report_the_new_path() {
    let shutdown = CancellationToken::new();
    let k = key();
    let (server1, mut reports1) = verify_server().await;
    let (server2, mut reports2) = verify_server().await;
    let gw = |name: &str, target| {
        format!(
            "listen = [\"127.0.0.1:0\"]\n[services.{name}]\ntarget = \"{target}\"\n[clients.m]\nkey = \"{}\"\nservices = [\"{name}\"]\n",
            k.public()
        )
    };
    let gw1 = gateway(&gw("mail", server1), &shutdown).await;
    let gw2 = gateway(&gw("files", server2), &shutdown).await;
    let toml = format!(
        "id = \"m\"\nkey_file = \"unused\"\n\
         [interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n[interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n\
         [gateways.site1]\naddresses = [\"{}\"]\n[gateways.site2]\naddresses = [\"{}\"]\n\
         [services.mail]\ngateway = \"site1\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files]\ngateway = \"site2\"\nlisten = \"127.0.0.1:0\"\n",
        gw1.local_addrs()[0],
        gw2.local_addrs()[0]
    );
    let client = Client::start(
        ClientConfig::from_toml(std::path::Path::new("m.toml"), &toml).unwrap(),
        k.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert_eq!(client.wait_up("site1").await.unwrap().path, "a");
    assert_eq!(client.wait_up("site2").await.unwrap().path, "a");
    let mut events = client.subscribe_events();

    // One stream per site, 4 MiB/s each way, long enough to outlast the switches.
    let mut tasks = Vec::new();
    for (svc, seed) in [("mail", 11u64), ("files", 12)] {
        let addr = client.service_addr(svc).unwrap();
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            verify::exchange_paced(s, seed, 24 * MIB, 24 * MIB, Mode::Concurrent, 4 * MIB).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        (gw1.stream_count(), gw2.stream_count()),
        (1, 1),
        "each service reaches its own gateway"
    );

    // A planned switch completes when both sessions have moved.
    let records = client.switch("b").await.unwrap();
    let mut sites: Vec<_> = records
        .iter()
        .map(|r| (r.gateway.as_str(), r.kind, r.to.as_str()))
        .collect();
    sites.sort_by_key(|s| s.0);
    assert_eq!(
        sites,
        [
            ("site1", SwitchKind::Planned, "b"),
            ("site2", SwitchKind::Planned, "b")
        ]
    );
    assert_eq!(client.wait_up("site1").await.unwrap().path, "b");
    assert_eq!(client.wait_up("site2").await.unwrap().path, "b");

    // Each session's new path is reported with its measurements.
    let mut reported = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while reported.len() < 2 {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no path_changed events")
            .unwrap();
        if e.kind != "path_changed" {
            continue;
        }
        let p = e
            .path
            .clone()
            .expect("path_changed carries the measurements");
        assert_eq!(
            (
                e.interface.as_deref(),
                p.from.as_str(),
                p.to.as_str(),
                p.switch
            ),
            (Some("b"), "a", "b", SwitchKind::Planned)
        );
        assert!(p.rtt_ms > 0.0 && p.rtt_ms < 1000.0, "{p:?}");
        // The streams run at 4 MiB/s each way: the path carried a good part of that.
        assert!(
            p.down_bytes_per_s > MIB && p.down_bytes_per_s < 16 * MIB,
            "{p:?}"
        );
        assert!(
            p.up_bytes_per_s > MIB && p.up_bytes_per_s < 16 * MIB,
            "{p:?}"
        );
        assert!(p.window_ms >= 900, "{p:?}");
        reported.push(p.gateway);
    }
    reported.sort();
    assert_eq!(reported, ["site1", "site2"]);

    // Interface a is back, the agent switches to it, then a goes down: both
    // sessions move to b by themselves.
    client.switch("a").await.unwrap();
    let before = client.switches().len();
    client.set_path_up("a", false).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || client.switches().len()
            >= before + 2)
        .await,
        "both sessions must move"
    );
    let sudden: Vec<_> = client.switches()[before..]
        .iter()
        .map(|r| (r.kind, r.to.clone()))
        .collect();
    assert!(
        sudden
            .iter()
            .all(|(k, to)| *k == SwitchKind::Unexpected && to == "b"),
        "{sudden:?}"
    );

    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap()
            .expect("stream failed");
        assert!(r.is_exact(Dir::Down), "{r:?}");
    }
    assert!(reports1.recv().await.unwrap().unwrap().is_exact(Dir::Up));
    assert!(reports2.recv().await.unwrap().unwrap().is_exact(Dir::Up));
    assert_eq!(
        (gw1.session_count(), gw2.session_count()),
        (1, 1),
        "one session per gateway throughout"
    );
    shutdown.cancel();
}
