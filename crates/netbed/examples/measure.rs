//! Measures the bed: ping RTT and bulk TCP throughput through the delayer, both directions.
//!
//! `sudo cargo run --release -p baton-netbed --example measure [-- --no-gso]` (root). The
//! README's numbers come from this. `--no-gso` makes every host send MTU-sized packets, so
//! the delayer handles one message per 1500-byte packet instead of per 64 KiB super-packet.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use baton_netbed::{Bed, Host, Link};

const BYTES: usize = 200 << 20;
const LIMIT: Duration = Duration::from_secs(30);

fn main() -> io::Result<()> {
    let bed = Bed::new("measure")?;
    if std::env::args().any(|a| a == "--no-gso") {
        for (host, dev) in [
            (Host::Mobile, "wlan"),
            (Host::Router, "rwlan"),
            (Host::Router, "rsrv"),
            (Host::Server, "srv"),
        ] {
            let out = bed.exec(
                host,
                &["ip", "link", "set", "dev", dev, "gso_max_segs", "1"],
            )?;
            if !out.status.success() {
                return Err(io::Error::other(
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ));
            }
        }
    }
    for delay in [0, 10, 40] {
        bed.set_delay(Link::Wlan, delay)?;
        let pings = bed.ping_via(
            Link::Wlan,
            bed.router_addr(Link::Wlan),
            20,
            Duration::from_millis(50),
        )?;
        let mut rtts: Vec<f64> = pings.rtts.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        rtts.sort_by(f64::total_cmp);
        let up = transfer(&bed, Host::Mobile, Host::Server)?;
        let down = transfer(&bed, Host::Server, Host::Mobile)?;
        let drops = if delay > 0 {
            bed.delay_drops(Link::Wlan)?
        } else {
            0
        };
        println!(
            "one-way delay {delay:>2} ms: ping rtt min {:.2} median {:.2} max {:.2} ms ({} replies); \
             TCP {} MiB up {up:.0} Mbit/s, down {down:.0} Mbit/s; delayer {:?}, kernel drops {drops}",
            rtts.first().copied().unwrap_or(f64::NAN),
            rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN),
            rtts.last().copied().unwrap_or(f64::NAN),
            pings.received,
            BYTES >> 20,
            bed.delay_stats(Link::Wlan),
        );
    }
    Ok(())
}

/// Sends BYTES from `from` to `to` over the wlan path; returns Mbit/s seen by the receiver.
fn transfer(bed: &Bed, from: Host, to: Host) -> io::Result<f64> {
    let addr = if to == Host::Server {
        bed.server_addr()
    } else {
        bed.mobile_addr(Link::Wlan)
    };
    let listener = bed.in_ns(to, || TcpListener::bind((addr, 0)))??;
    let dst = listener.local_addr()?;
    let mut tx = bed.in_ns(from, || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })??;
    let (mut rx, _) = listener.accept()?;
    rx.set_read_timeout(Some(LIMIT))?;
    tx.set_write_timeout(Some(LIMIT))?;
    let start = Instant::now();
    let reader = std::thread::spawn(move || -> io::Result<(usize, Duration)> {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match rx.read(&mut buf)? {
                0 => return Ok((total, start.elapsed())),
                n => total += n,
            }
        }
    });
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..BYTES / chunk.len() {
        tx.write_all(&chunk)?;
    }
    tx.shutdown(Shutdown::Write)?;
    let (n, took) = reader
        .join()
        .map_err(|_| io::Error::other("reader panicked"))??;
    Ok(n as f64 * 8.0 / took.as_secs_f64() / 1e6)
}
