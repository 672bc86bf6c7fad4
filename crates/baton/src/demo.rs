//! `baton demo`: a gateway, a client agent and a verifying server on
//! loopback, in this process; data streamed through baton and checked.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _};
use baton_proto::ClientKey;
use baton_runtime::config::{ClientConfig, GatewayConfig};
use baton_runtime::verify::{self, Dir, Mode};
use baton_runtime::{Client, Gateway};
use ring::rand::SystemRandom;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the demo moves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    pub(crate) streams: usize,
    pub(crate) mib: u64,
}

pub(crate) async fn run(opts: Options) -> anyhow::Result<()> {
    let key = ClientKey::generate(&SystemRandom::new()).context("cannot generate a key")?;
    let server = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = server.local_addr()?;
    let (tx, mut server_reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(verify::serve(server, tx));

    let gw_toml = format!(
        r#"listen = ["127.0.0.1:0"]
           [services.demo]
           target = "{server_addr}"
           [clients.demo-laptop]
           key = "{}"
           services = ["demo"]"#,
        key.public()
    );
    let gw_config = GatewayConfig::from_toml(Path::new("<demo gateway>"), &gw_toml)?;
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(gw_config, shutdown.clone()).await?;
    let gw_addr = gateway.local_addrs()[0];

    let client_toml = format!(
        r#"id = "demo-laptop"
           key_file = "<in memory>"
           [gateways.demo-gw]
           addresses = ["{gw_addr}"]
           [services.demo]
           gateway = "demo-gw"
           listen = "127.0.0.1:0""#
    );
    let client_config = ClientConfig::from_toml(Path::new("<demo client>"), &client_toml)?;
    let client = Client::start(client_config, key, shutdown.clone()).await?;
    let session = client.wait_up("demo-gw").await?;
    let service_addr = client.service_addr("demo").context("demo service not listening")?;

    println!("baton demo: a gateway, a client agent and a server on loopback\n");
    println!("  server        {server_addr}   (checks every byte it receives)");
    println!("  gateway       {gw_addr}   session {:016x} with client \"demo-laptop\" (key proven)", session.id);
    println!("  client agent  {service_addr}   service \"demo\" → gateway → server");
    println!("  traffic       {} concurrent streams, {} MiB each way on each\n", opts.streams, opts.mib);

    let bytes = opts.mib << 20;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..opts.streams {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(service_addr).await?;
            verify::exchange(stream, 1000 + i as u64, bytes, bytes, Mode::Concurrent).await
        }));
    }
    let mut down_ok = 0;
    for t in tasks {
        let report = t.await??;
        if report.is_exact(Dir::Down) {
            down_ok += 1;
        }
    }
    let mut up_ok = 0;
    for _ in 0..opts.streams {
        let report = server_reports.recv().await.context("server stopped")??;
        if report.is_exact(Dir::Up) {
            up_ok += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let total = bytes * opts.streams as u64;
    let gbit = (total as f64 * 8.0) / secs / 1e9;
    println!("  app → server  {:>6} MiB, SHA-256 and every byte verified on {up_ok}/{} streams", total >> 20, opts.streams);
    println!("  server → app  {:>6} MiB, SHA-256 and every byte verified on {down_ok}/{} streams", total >> 20, opts.streams);
    println!("  time          {secs:.2} s ({gbit:.1} Gbit/s each way)");
    shutdown.cancel();
    gateway.wait().await;
    client.wait().await;
    if up_ok != opts.streams || down_ok != opts.streams {
        bail!("verification FAILED: some bytes were lost, duplicated or changed");
    }
    println!("\n  result        OK: every byte arrived, in order, unchanged, in both directions");
    Ok(())
}

