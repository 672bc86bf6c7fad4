//! A service with `compress = "zstd"`: byte-exact across planned and sudden
//! switches (each leg is its own compressed stream starting at an exact
//! offset), with the ratio reported in the stream status.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use baton_runtime::config::ClientConfig;
use baton_runtime::Client;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Log-like text: compresses well, and every line is different.
fn text(total: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(total + 100);
    let mut i = 0u64;
    while v.len() < total {
        v.extend_from_slice(
            format!(
                "{i:010} INFO relay: stream moved to lte at offset {} without loss\n",
                i * 77
            )
            .as_bytes(),
        );
        i += 1;
    }
    v.truncate(total);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_compressed_service_is_exact_across_switches_and_reports_its_ratio() {
    let shutdown = CancellationToken::new();
    // An echo server behind the gateway.
    let target = echo_server().await;
    let k = key();
    let gw = gateway(
        &format!("listen = [\"127.0.0.1:0\"]\n[services.logs]\ntarget = \"{target}\"\n[clients.m]\nkey = \"{}\"\nservices = [\"logs\"]\n", k.public()),
        &shutdown,
    )
    .await;
    let toml = format!(
        "id = \"m\"\nkey_file = \"unused\"\n[interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n[interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n\
         [gateways.gw]\naddresses = [\"{}\"]\n[services.logs]\ngateway = \"gw\"\nlisten = \"127.0.0.1:0\"\ncompress = \"zstd\"\n",
        gw.local_addrs()[0]
    );
    let client = Client::start(
        ClientConfig::from_toml(std::path::Path::new("c.toml"), &toml).unwrap(),
        k,
        shutdown.clone(),
    )
    .await
    .unwrap();
    client.wait_up("gw").await.unwrap();

    const TOTAL: usize = 24 << 20;
    let data = text(TOTAL);
    let app = TcpStream::connect(client.service_addr("logs").unwrap())
        .await
        .unwrap();
    let (mut r, mut w) = app.into_split();
    let sent = data.clone();
    // 8 MiB/s, so the transfer outlasts the switches.
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(64 * 1024) {
            w.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
        w.shutdown().await.unwrap();
    });
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(TOTAL);
        r.read_to_end(&mut got).await.unwrap();
        got
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    client.switch("b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.set_path_up("b", false).unwrap();
    assert!(eventually(Duration::from_secs(10), || client.switches().len() >= 2).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.set_path_up("b", true).unwrap();
    client.switch("b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let st = client
        .streams()
        .into_iter()
        .next()
        .expect("the stream is still running");
    println!(
        "compress {} ratio {:.2} over {} wire bytes, {} legs",
        st.compress, st.compression_ratio, st.wire_bytes, st.legs
    );
    assert_eq!(st.compress, "zstd");
    assert!(st.compression_ratio > 4.0, "log text should shrink: {st:?}");
    assert!(st.legs >= 4, "the stream moved across its legs: {st:?}");

    writer.await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    assert_eq!(client.switches().len(), 3);
    shutdown.cancel();
}
