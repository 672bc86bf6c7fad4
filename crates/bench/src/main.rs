//! `baton-bench`: small tools for measuring baton on loopback.
//!
//! * `baton-bench echo --listen ADDR` runs a TCP echo server.
//! * `baton-bench rr --connect ADDR` measures request/response round-trip
//!   latency over one TCP connection (TCP_NODELAY) and prints percentiles.
//!   Given several `--connect`, it takes turns among them, `--chunk` round
//!   trips at a time, so that each sees the machine in the same states.
//! * `baton-bench handover` (root) measures the pause in a steady stream when
//!   the network changes, for baton, kernel MPTCP and plain TCP, in a
//!   network-namespace bed (see `handover.rs` and bench/README.md).
//! * `baton-bench scale` measures how many sessions and idle streams one gateway
//!   holds, their memory, how fast they are accepted and how fast a storm of
//!   switching clients is absorbed (see `scale.rs`). It starts its own load-generator
//!   processes (`scale-part`) and targets (`hold`), hidden subcommands.
//! * `baton-bench splice-relay --listen ADDR --to ADDR` is the cheapest relay
//!   there is (`splice(2)` and nothing else), a yardstick for `bench/run.sh`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod handover;
mod scale;
mod splice_relay;

#[derive(Parser, Debug)]
#[command(name = "baton-bench", version, about = "Benchmark helpers for baton")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a TCP echo server (the target for `rr`).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:17000")]
        listen: SocketAddr,
    },
    /// Request/response latency over one TCP connection.
    ///
    /// Sends SIZE bytes, reads SIZE bytes back and records the round trip,
    /// COUNT times after WARMUP unrecorded round trips. With several
    /// `--connect`, each address gets COUNT round trips of its own; they take
    /// turns, CHUNK round trips each, and one line is printed per address.
    Rr {
        /// Echo server (or baton listener in front of one) to connect to; may
        /// be given several times.
        #[arg(long, required = true)]
        connect: Vec<String>,
        /// Bytes per request (and per response).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Number of recorded round trips.
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        /// Number of round trips done first and not recorded (per address).
        #[arg(long, default_value_t = 1_000)]
        warmup: usize,
        /// With several addresses: round trips on one before the next one's
        /// turn. Short turns spread the machine's hiccups (other tenants, the
        /// scheduler's moods) evenly over the addresses being compared.
        #[arg(long, default_value_t = 500)]
        chunk: usize,
        /// Give up if connecting or a single round trip takes longer than
        /// this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Print one JSON line instead of the human-readable summary.
        #[arg(long)]
        json: bool,
    },
    /// Handover gaps of baton, kernel MPTCP and plain TCP in a namespace bed
    /// (root): planned switch, link down, re-addressing.
    Handover(handover::Options),
    /// One gateway with many sessions and idle streams: memory, accept times, and a storm
    /// of clients switching at once.
    Scale(scale::Options),
    /// The cheapest relay: splice(2) both ways, a thread per direction, no
    /// protocol; `bench/run.sh` chains two as a yardstick.
    SpliceRelay {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Where each connection goes.
        #[arg(long)]
        to: SocketAddr,
    },
    /// One of the scale benchmark's load-generator processes (started by `scale`).
    #[command(hide = true)]
    ScalePart(scale::part::PartOptions),
    /// The scale benchmark's targets: accept, hold and echo connections (started by `scale`).
    #[command(hide = true)]
    Hold {
        /// Addresses to listen on.
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Handover(opts) => handover::run(&opts),
        Cmd::Scale(opts) => scale::run(&opts),
        Cmd::ScalePart(opts) => scale::part::run(&opts),
        Cmd::Hold { listen } => scale::hold(&listen),
        Cmd::SpliceRelay { listen, to } => splice_relay::run(listen, to),
        Cmd::Echo { listen } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("building tokio runtime")?;
            rt.block_on(echo(listen))
        }
        Cmd::Rr {
            connect,
            size,
            count,
            warmup,
            chunk,
            timeout,
            json,
        } => {
            ensure!(size > 0, "--size must be at least 1");
            ensure!(count > 0, "--count must be at least 1");
            ensure!(chunk > 0, "--chunk must be at least 1");
            // One thread: the client is strictly sequential, and a
            // single-threaded runtime avoids cross-thread wake-ups that
            // would add noise to the numbers.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building tokio runtime")?;
            let opts = RrOpts {
                size,
                count,
                warmup,
                chunk,
                timeout: Duration::from_secs(timeout.max(1)),
            };
            let all = rt.block_on(rr(&connect, &opts))?;
            for (addr, samples) in connect.iter().zip(all) {
                let stats = Stats::from_samples(samples)?;
                if json {
                    println!("{}", stats.to_json(addr, size));
                } else {
                    println!(
                        "rr {addr} size={size}B count={count}: \
                         p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  \
                         mean {:.1} us  min {:.1} us  max {:.1} us",
                        stats.p50_us,
                        stats.p90_us,
                        stats.p99_us,
                        stats.p999_us,
                        stats.mean_us,
                        stats.min_us,
                        stats.max_us
                    );
                }
            }
            Ok(())
        }
    }
}

async fn echo(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("baton-bench echo: listening on {}", listener.local_addr()?);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // e.g. EMFILE: back off a little instead of spinning.
                eprintln!("baton-bench echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = echo_conn(stream).await {
                eprintln!("baton-bench echo: {peer}: {e:#}");
            }
        });
    }
}

async fn echo_conn(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            // Peer finished sending: finish our side too.
            let _ = stream.shutdown().await;
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

struct RrOpts {
    size: usize,
    count: usize,
    warmup: usize,
    /// Round trips on one address before the next one's turn.
    chunk: usize,
    timeout: Duration,
}

/// One connection being measured.
struct RrConn<'a> {
    addr: &'a str,
    stream: TcpStream,
    /// Round trips done on it, warm-up included.
    done: usize,
    samples: Vec<u64>,
}

impl RrConn<'_> {
    /// One round trip; recorded once the warm-up is over.
    async fn round_trip(&mut self, req: &mut [u8], resp: &mut [u8], opts: &RrOpts) -> Result<()> {
        let (i, total, addr) = (self.done, opts.warmup + opts.count, self.addr);
        // Vary the payload so a stale or misrouted reply is detected.
        req.fill((i as u8).wrapping_mul(31).wrapping_add(7));
        let start = Instant::now();
        let stream = &mut self.stream;
        let round = async {
            stream.write_all(req).await?;
            stream.read_exact(resp).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(opts.timeout, round).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(e).with_context(|| format!("round trip {i} of {total} to {addr}"))
            }
            Err(_) => bail!(
                "round trip {i} of {total} to {addr}: no reply within {:?}",
                opts.timeout
            ),
        }
        let elapsed = start.elapsed();
        if resp != req {
            bail!("round trip {i} to {addr}: reply does not match the request");
        }
        if i >= opts.warmup {
            self.samples
                .push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        }
        self.done += 1;
        Ok(())
    }
}

/// Returns, per address, one round-trip time in nanoseconds per recorded
/// round trip. Every connection is warmed up first; then they take turns,
/// `chunk` round trips each, until each has `count`.
async fn rr(addrs: &[String], opts: &RrOpts) -> Result<Vec<Vec<u64>>> {
    let mut conns = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let stream = tokio::time::timeout(opts.timeout, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        conns.push(RrConn {
            addr,
            stream,
            done: 0,
            samples: Vec::with_capacity(opts.count),
        });
    }
    let mut req = vec![0u8; opts.size];
    let mut resp = vec![0u8; opts.size];
    for c in &mut conns {
        for _ in 0..opts.warmup {
            c.round_trip(&mut req, &mut resp, opts).await?;
        }
    }
    while conns.iter().any(|c| c.samples.len() < opts.count) {
        for c in &mut conns {
            let turn = opts.chunk.min(opts.count - c.samples.len());
            for _ in 0..turn {
                c.round_trip(&mut req, &mut resp, opts).await?;
            }
        }
    }
    let mut all = Vec::with_capacity(conns.len());
    for mut c in conns {
        let _ = c.stream.shutdown().await;
        all.push(c.samples);
    }
    Ok(all)
}

#[derive(Debug, PartialEq)]
struct Stats {
    count: usize,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    mean_us: f64,
    min_us: f64,
    max_us: f64,
}

impl Stats {
    fn from_samples(mut ns: Vec<u64>) -> Result<Stats> {
        ensure!(!ns.is_empty(), "no samples");
        ns.sort_unstable();
        let us = |v: u64| v as f64 / 1000.0;
        let sum: u128 = ns.iter().map(|&v| u128::from(v)).sum();
        Ok(Stats {
            count: ns.len(),
            p50_us: us(percentile(&ns, 50.0)),
            p90_us: us(percentile(&ns, 90.0)),
            p99_us: us(percentile(&ns, 99.0)),
            p999_us: us(percentile(&ns, 99.9)),
            mean_us: sum as f64 / ns.len() as f64 / 1000.0,
            min_us: us(ns[0]),
            max_us: us(ns[ns.len() - 1]),
        })
    }

    fn to_json(&self, addr: &str, size: usize) -> String {
        format!(
            "{{\"connect\":{},\"size\":{size},\"count\":{},\"p50_us\":{:.3},\"p90_us\":{:.3},\
             \"p99_us\":{:.3},\"p999_us\":{:.3},\"mean_us\":{:.3},\"min_us\":{:.3},\"max_us\":{:.3}}}",
            json_string(addr),
            self.count,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.mean_us,
            self.min_us,
            self.max_us
        )
    }
}

/// Nearest-rank percentile of sorted, non-empty data.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 99.9), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn stats_in_microseconds() -> Result<()> {
        let s = Stats::from_samples(vec![3000, 1000, 2000])?;
        assert_eq!(s.count, 3);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.p50_us, 2.0);
        assert_eq!(s.max_us, 3.0);
        assert_eq!(s.mean_us, 2.0);
        Ok(())
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn echo_round_trips() -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    tokio::spawn(echo_conn(s));
                }
            });
            let opts = RrOpts {
                size: 100,
                count: 50,
                warmup: 5,
                chunk: 500,
                timeout: Duration::from_secs(5),
            };
            let samples = rr(&[addr.to_string()], &opts).await?;
            assert_eq!(samples.len(), 1);
            assert_eq!(samples[0].len(), 50);
            Ok(())
        })
    }

    /// Several addresses take turns, `chunk` round trips at a time, and each
    /// gets its own warm-up and `count` recorded round trips.
    #[test]
    fn addresses_take_turns() -> Result<()> {
        use std::sync::{Arc, Mutex};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            // Which server each request reached, in order.
            let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
            let mut addrs = Vec::new();
            for server in 0..2 {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                addrs.push(listener.local_addr()?.to_string());
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok((mut s, _)) = listener.accept().await else {
                        return;
                    };
                    let mut req = [0u8; 10];
                    while s.read_exact(&mut req).await.is_ok() {
                        seen.lock().expect("not poisoned").push(server);
                        if s.write_all(&req).await.is_err() {
                            return;
                        }
                    }
                });
            }
            let opts = RrOpts {
                size: 10,
                count: 20,
                warmup: 3,
                chunk: 7,
                timeout: Duration::from_secs(5),
            };
            let samples = rr(&addrs, &opts).await?;
            assert_eq!(samples.iter().map(Vec::len).collect::<Vec<_>>(), [20, 20]);
            // Warm-ups of 3, then turns of 7, 7 and the last 6.
            let mut turns: Vec<(usize, usize)> = Vec::new();
            for &server in seen.lock().expect("not poisoned").iter() {
                match turns.last_mut() {
                    Some((s, n)) if *s == server => *n += 1,
                    _ => turns.push((server, 1)),
                }
            }
            assert_eq!(
                turns,
                [
                    (0, 3),
                    (1, 3),
                    (0, 7),
                    (1, 7),
                    (0, 7),
                    (1, 7),
                    (0, 6),
                    (1, 6)
                ]
            );
            Ok(())
        })
    }
}
