//! `baton-delayer --queue N --delay-ms D`: holds every packet of NFQUEUE queue N for D ms.
//!
//! Runs in the network namespace it is started in (`ip netns exec NS baton-delayer ...`).
//! Bind happens before "ready" is printed; add the iptables rule after that line:
//! `iptables -t mangle -A POSTROUTING -o IF -j NFQUEUE --queue-num N` (no `--queue-bypass`,
//! so packets are dropped rather than passed undelayed if the delayer is gone). Stops on
//! SIGINT or SIGTERM, or when stdin closes with `--until-eof`, releasing what it holds and
//! printing its counters. `baton_netbed::Bed` runs the same code on a thread instead.

use std::io::Read;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_netbed::delayer::{DelayConfig, Delayer};
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str = "usage: baton-delayer --queue N --delay-ms D [--max-len PACKETS] [--until-eof]";

fn main() -> ExitCode {
    let mut queue = None;
    let mut delay_ms = None;
    let mut max_len = None;
    let mut until_eof = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("{name} needs a number\n{USAGE}");
            }
            v
        };
        match a.as_str() {
            "--queue" => queue = value("--queue").and_then(|v| u16::try_from(v).ok()),
            "--delay-ms" => delay_ms = value("--delay-ms"),
            "--max-len" => max_len = value("--max-len").and_then(|v| u32::try_from(v).ok()),
            "--until-eof" => until_eof = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("unknown argument {a}\n{USAGE}");
                return ExitCode::from(64);
            }
        }
    }
    let (Some(queue), Some(delay_ms)) = (queue, delay_ms) else {
        eprintln!("{USAGE}");
        return ExitCode::from(64);
    };
    let mut cfg = DelayConfig::new(queue, Duration::from_millis(delay_ms));
    if let Some(m) = max_len {
        cfg.max_len = m;
    }

    // Signals are blocked in every thread and taken by one waiter thread, which asks the
    // delay loop to stop: no signal handler runs in the middle of the loop.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("baton-delayer: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let _ = signals.wait();
        flag.store(true, Ordering::Relaxed);
    });
    if until_eof {
        let flag = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            flag.store(true, Ordering::Relaxed);
        });
    }

    let delayer = match Delayer::bind(&cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("baton-delayer: cannot bind queue {queue}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ready queue={queue} delay_ms={delay_ms}");
    match delayer.run(&stop) {
        Ok(s) => {
            println!(
                "stopped received={} released={} overruns={} errors={}",
                s.received, s.released, s.overruns, s.errors
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("baton-delayer: {e}");
            ExitCode::FAILURE
        }
    }
}
