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
    pub(crate) pace_mib: u64,
}

fn show(start: Instant, what: &str, r: Result<Vec<baton_runtime::client::SwitchRecord>, String>) {
    let t = start.elapsed().as_secs_f64();
    match r {
        Ok(records) => {
            for sw in records {
                println!(
                    "  t={t:>5.2}s  {what}: {} → {} in {} ms, {} streams moved, longest stall {} ms, {} bytes resent",
                    sw.from, sw.to, sw.duration_ms, sw.streams, sw.longest_stall_ms, sw.bytes_resent
                );
            }
        }
        Err(e) => println!("  t={t:>5.2}s  {what}: FAILED: {e}"),
    }
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

    // Two loopback addresses stand in for two network interfaces.
    let client_toml = format!(
        r#"id = "demo-laptop"
           key_file = "<in memory>"
           [interfaces.wifi]
           source = "127.0.0.2"
           priority = 10
           [interfaces.lte]
           source = "127.0.0.3"
           priority = 20
           [gateways.demo-gw]
           addresses = ["{gw_addr}"]
           [services.demo]
           gateway = "demo-gw"
           listen = "127.0.0.1:0""#
    );
    let client_config = ClientConfig::from_toml(Path::new("<demo client>"), &client_toml)?;
    let client = Client::start(client_config, key, shutdown.clone()).await?;
    let session = client.wait_up("demo-gw").await?;
    let service_addr = client
        .service_addr("demo")
        .context("demo service not listening")?;

    println!("baton demo: a gateway, a client agent and a server on loopback\n");
    println!("  server        {server_addr}   (checks every byte it receives)");
    println!(
        "  gateway       {gw_addr}   session {:016x} with client \"demo-laptop\" (key proven)",
        session.id
    );
    println!("  client agent  {service_addr}   service \"demo\" → gateway → server");
    println!("  interfaces    wifi = 127.0.0.2, lte = 127.0.0.3 (stand-ins for two networks); session on {}", session.path);
    println!(
        "  traffic       {} concurrent streams, {} MiB each way on each, paced at {} MiB/s per stream and direction\n",
        opts.streams, opts.mib, opts.pace_mib
    );

    let bytes = opts.mib << 20;
    let pace = opts.pace_mib << 20;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..opts.streams {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(service_addr).await?;
            verify::exchange_paced(
                stream,
                1000 + i as u64,
                bytes,
                bytes,
                Mode::Concurrent,
                pace,
            )
            .await
        }));
    }
    // While the streams run: a planned switch to lte, then wifi back, then
    // lte is cut (as if its link went down) and the session must move on its own.
    let t = |s: f64| start + std::time::Duration::from_secs_f64(s);
    let transfer_secs = (opts.mib as f64 / opts.pace_mib.max(1) as f64).max(1.0);
    tokio::time::sleep_until(t(transfer_secs * 0.25).into()).await;
    show(
        start,
        "planned switch (baton switch lte)",
        client.switch("lte").await,
    );
    tokio::time::sleep_until(t(transfer_secs * 0.45).into()).await;
    show(
        start,
        "planned switch (baton switch wifi)",
        client.switch("wifi").await,
    );
    tokio::time::sleep_until(t(transfer_secs * 0.6).into()).await;
    println!(
        "  t={:>5.2}s  wifi cut: every connection on it dies at once",
        start.elapsed().as_secs_f64()
    );
    client
        .set_path_up("wifi", false)
        .map_err(anyhow::Error::msg)?;
    let before = client.switches().len();
    while client.switches().len() == before && start.elapsed().as_secs_f64() < transfer_secs + 30.0
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    if let Some(sw) = client
        .switches()
        .last()
        .filter(|_| client.switches().len() > before)
    {
        show(start, "unexpected switch (wifi lost)", Ok(vec![sw.clone()]));
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
    println!(
        "  app → server  {:>6} MiB, SHA-256 and every byte verified on {up_ok}/{} streams",
        total >> 20,
        opts.streams
    );
    println!(
        "  server → app  {:>6} MiB, SHA-256 and every byte verified on {down_ok}/{} streams",
        total >> 20,
        opts.streams
    );
    println!(
        "  time          {secs:.2} s ({gbit:.2} Gbit/s each way), {} switches survived",
        client.switches().len()
    );
    shutdown.cancel();
    gateway.wait().await;
    client.wait().await;
    if up_ok != opts.streams || down_ok != opts.streams {
        bail!("verification FAILED: some bytes were lost, duplicated or changed");
    }
    println!("\n  result        OK: every byte arrived, in order, unchanged, in both directions, across every switch");
    Ok(())
}
