//! A baton rig in a network-namespace bed: the real `baton` binary as gateway in SERVER and
//! client agent in MOBILE (kernel mode: no `[interfaces]` table, so wlan with metric 100 is
//! preferred over lte with metric 200), a verifying server in SERVER, applications in MOBILE
//! and, for the decision engine's tests, `baton events` following the agent's events.
//!
//! The handover (`netns.rs`), multihomed gateway (`netns_multihome.rs`) and decision engine
//! (`netns_decide.rs`) tests share it; what differs between them is in [`Options`].
//!
//! The verifying server and the applications run on the test's own tokio runtime: their
//! sockets are made inside the namespaces (`Bed::in_ns`) and keep them.
#![allow(dead_code, unreachable_pub)]

use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use baton_netbed::{run_bounded, Bed, ChildGuard, Host};
use baton_runtime::verify::{self, Mode, Report};
use serde_json::Value;
use tokio::sync::mpsc;

pub use baton_netbed::Link;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// The gateway's port on SERVER (TCP for sessions, UDP for path probes).
pub const GATEWAY_PORT: u16 = 7700;
/// The agent's service listener on MOBILE's loopback (each bed has its own loopback).
pub const SERVICE_PORT: u16 = 15000;

/// What to add to the daemons' configuration files.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Top-level keys for the client agent's file (e.g. `mode = "manual"`).
    pub client: &'static str,
    /// Tables for the client agent's file (its `[policy]`), written after all the others:
    /// no top-level keys here.
    pub client_tables: String,
    /// Top-level keys for the gateway's file.
    pub gateway: &'static str,
    /// One-way delays of wlan and lte in ms (none by default).
    pub delays: Option<(u32, u32)>,
    /// MOBILE as a connectivity box: the service listens on MOBILE's LAN
    /// address and the application runs on the LAN host.
    pub lan: bool,
    /// SERVER is multihomed from the start: its second link (10.90.1.2 on
    /// `srv2`) is made before the daemons start.
    pub server_link2: bool,
    /// The gateway's `listen` addresses (TOML list items); default
    /// `"10.89.1.2:7700"`.
    pub listen: Option<String>,
    /// The agent's `gateways.gw.addresses` (TOML list items); default
    /// `"10.89.1.2:7700"`.
    pub addresses: Option<String>,
    /// More keys of the agent's `[gateways.gw]` table (`retries`, ...).
    pub gateway_spec: &'static str,
    /// MOBILE's `/etc/hosts` as the daemons see it.
    pub mobile_hosts: Option<String>,
    /// Follow the agent's events with `baton events` from the start ([`Rig::events`]); they
    /// are printed when a test fails.
    pub events: bool,
}

/// Wall-clock milliseconds, as in the events' `at_unix_ms`.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A bed with a gateway, a verifying server and a client agent whose session is up, and
/// `baton events` running if asked for.
///
/// Fields drop in order: the event follower, the daemons and the server task go before the
/// bed.
pub struct Rig {
    pub name: String,
    pub dir: PathBuf,
    pub admin: PathBuf,
    /// The gateway's admin socket.
    pub gw_admin: PathBuf,
    events: Option<Events>,
    gateway: ChildGuard,
    client: ChildGuard,
    server: tokio::task::JoinHandle<()>,
    reports: mpsc::UnboundedReceiver<io::Result<Report>>,
    pub started: Instant,
    /// Where applications connect from, and to.
    pub app_host: Host,
    pub app_addr: SocketAddr,
    pub bed: Bed,
}

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// The log filter for the daemons: `BATON_LOG` if set, else debug for baton's own crates.
fn log_filter() -> String {
    std::env::var("BATON_LOG").unwrap_or_else(|_| "info,baton_runtime=debug".into())
}

/// `baton events` as a child process; its JSON lines are collected by a thread.
struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Rig {
    /// Builds the bed and starts everything; returns once the session is up on wlan (and
    /// `baton events` is following, if asked for). Must be called from within a tokio
    /// runtime (the verifying server runs on it).
    pub async fn start(name: &str, opts: Options) -> Rig {
        let started = Instant::now();
        let bed = Bed::new(name).expect("bed (needs root, ip, iptables, tc, ping)");
        if let Some((wlan, lte)) = opts.delays {
            bed.set_delay(Link::Wlan, wlan).expect("wlan delay");
            bed.set_delay(Link::Lte, lte).expect("lte delay");
        }
        if opts.server_link2 {
            bed.add_server_link().expect("SERVER's second link");
        }
        if let Some(hosts) = &opts.mobile_hosts {
            bed.set_hosts(Host::Mobile, hosts)
                .expect("MOBILE's /etc/hosts");
        }
        let (app_host, app_addr) = if opts.lan {
            bed.add_lan().expect("LAN host");
            (
                Host::Lan,
                SocketAddr::from((bed.box_lan_addr(), SERVICE_PORT)),
            )
        } else {
            (
                Host::Mobile,
                SocketAddr::from((Ipv4Addr::LOCALHOST, SERVICE_PORT)),
            )
        };
        let dir = std::env::temp_dir().join(format!("baton-netns-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");

        // The verifying server, on SERVER's address.
        let server_ip = bed.server_addr();
        let std_listener = bed
            .in_ns(Host::Server, || std::net::TcpListener::bind((server_ip, 0)))
            .expect("enter SERVER")
            .expect("bind the verifying server");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let target = std_listener.local_addr().expect("server address");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        let (tx, reports) = mpsc::unbounded_channel();
        let server = tokio::spawn(verify::serve(listener, tx));

        // Credentials.
        let key_file = dir.join("m.key");
        let out = Command::new(baton_bin())
            .args(["keygen", "m", "--out"])
            .arg(&key_file)
            .output()
            .expect("run baton keygen");
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let public = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("key = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("keygen's last line is key = \"...\"")
            .to_owned();

        let gw_file = dir.join("gateway.toml");
        let gw_admin = dir.join("gw.sock");
        let first = format!("\"{server_ip}:{GATEWAY_PORT}\"");
        std::fs::write(
            &gw_file,
            format!(
                "listen = [{}]\nadmin = \"{}\"\n{}\n\
                 [services.data]\ntarget = \"{target}\"\n\
                 [clients.m]\nkey = \"{public}\"\nservices = [\"data\"]\n",
                opts.listen.as_deref().unwrap_or(&first),
                gw_admin.display(),
                opts.gateway
            ),
        )
        .expect("write gateway.toml");
        let admin = dir.join("admin.sock");
        let client_file = dir.join("client.toml");
        std::fs::write(
            &client_file,
            format!(
                "id = \"m\"\nkey_file = \"m.key\"\nadmin = \"{}\"\n{}\n\
                 [gateways.gw]\naddresses = [{}]\n{}\n\
                 [services.data]\ngateway = \"gw\"\nlisten = \"{app_addr}\"\n{}\n",
                admin.display(),
                opts.client,
                opts.addresses.as_deref().unwrap_or(&first),
                opts.gateway_spec,
                opts.client_tables
            ),
        )
        .expect("write client.toml");

        let mut gateway = spawn_daemon(&bed, Host::Server, "gateway", &gw_file, &dir);
        // The agent must find the gateway listening: if its first attempt (over wlan) is
        // refused, it tries lte at once and the session starts there.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(dir.join("gateway.log"))
            .unwrap_or_default()
            .contains("gateway listening")
        {
            assert!(
                Instant::now() < deadline,
                "{name}: the gateway did not listen within 10 s"
            );
            if let Ok(Some(status)) = gateway.try_wait() {
                panic!("{name}: the gateway exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = spawn_daemon(&bed, Host::Mobile, "client", &client_file, &dir);
        let mut rig = Rig {
            name: name.to_owned(),
            dir,
            admin,
            gw_admin,
            events: None,
            gateway,
            client,
            server,
            reports,
            started,
            app_host,
            app_addr,
            bed,
        };
        let st = rig
            .wait_status(Duration::from_secs(20), "the session up on wlan", |st| {
                st["sessions"][0]["state"] == "up" && st["sessions"][0]["interface"] == "wlan"
            })
            .await;
        // Kernel mode: both links are known, wlan preferred (lower default-route metric).
        let names: Vec<&str> = st["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["name"].as_str())
            .collect();
        assert!(
            names.starts_with(&["wlan", "lte"]),
            "interfaces in order of preference: {names:?}"
        );
        rig.check_alive();
        if opts.events {
            rig.follow_events();
        }
        rig
    }

    /// Starts `baton events`; returns once it is subscribed (a `mode` event it asked for
    /// came through). The mode set is the one in force, so nothing changes.
    fn follow_events(&mut self) {
        let mut child = Command::new(baton_bin())
            .args(["events", "--admin"])
            .arg(&self.admin)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start baton events");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => sink.lock().unwrap_or_else(|e| e.into_inner()).push(v),
                    Err(e) => {
                        eprintln!("baton events printed a line that is not JSON ({e}): {line}")
                    }
                }
            }
        });
        self.events = Some(Events { child, lines });
        // The subscription is made when the agent reads the request; poll the admin socket
        // with a harmless command until its event shows up.
        let mode = self.status().expect("status")["engine"]["mode"]
            .as_str()
            .expect("engine.mode")
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.baton(&["mode", &mode]).expect("baton mode");
            std::thread::sleep(Duration::from_millis(100));
            if self.events().iter().any(|e| e["kind"] == "mode") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: baton events printed nothing within 10 s",
                self.name
            );
        }
    }

    /// The events `baton events` printed so far, oldest first (none unless
    /// [`Options::events`]).
    pub fn events(&self) -> Vec<Value> {
        match &self.events {
            Some(e) => e.lines.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            None => Vec::new(),
        }
    }

    /// The events printed so far of one kind.
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Waits for an event of `kind` matching `pred` among those printed after the first
    /// `skip`; panics after `limit` with the events seen.
    pub async fn wait_event(
        &mut self,
        limit: Duration,
        kind: &str,
        skip: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .skip(skip)
                .find(|e| e["kind"] == kind && pred(e))
            {
                return e;
            }
            if Instant::now() > deadline {
                let engine = self
                    .status()
                    .map(|s| s["engine"].clone())
                    .unwrap_or_default();
                panic!(
                    "{}: no {kind} event within {limit:?}; events:\n{}\nengine: {engine:#}",
                    self.name,
                    describe_events(&self.events())
                );
            }
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `baton status --json` of the agent.
    pub fn status(&self) -> io::Result<Value> {
        let mut cmd = Command::new(baton_bin());
        cmd.args(["status", "--json", "--admin"]).arg(&self.admin);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(10))?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(io::Error::other)
    }

    /// Polls the status until `pred` holds; panics after `limit`.
    pub async fn wait_status(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = Value::Null;
        loop {
            if let Ok(st) = self.status() {
                if pred(&st) {
                    return st;
                }
                last = st;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: not within {limit:?}: {what}; last status: {last:#}",
                    self.name
                );
            }
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the agent has delivered at least `bytes` of the first stream to its
    /// application, so that what follows happens mid-stream.
    pub async fn wait_received(&mut self, bytes: u64) {
        self.wait_status(
            Duration::from_secs(20),
            &format!("{bytes} bytes received on the stream"),
            |st| {
                st["streams"][0]["received"]
                    .as_u64()
                    .is_some_and(|r| r >= bytes)
            },
        )
        .await;
    }

    /// Waits until the engine has judged interface `name` (enough probes in the window)
    /// with health `health`.
    pub async fn wait_health(&mut self, limit: Duration, name: &str, health: &str) -> Value {
        self.wait_status(limit, &format!("{name} judged {health}"), |st| {
            iface(st, name).is_some_and(|i| i["health"] == health)
        })
        .await
    }

    /// Panics (with the logs) if a daemon has exited.
    pub fn check_alive(&mut self) {
        for (what, child) in [
            ("gateway", &mut self.gateway),
            ("client agent", &mut self.client),
        ] {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{}: the {what} exited: {status}", self.name);
            }
        }
    }

    /// `baton switch IFACE`: its output line(s).
    pub fn switch(&self, iface: &str) -> String {
        self.baton(&["switch", iface])
            .unwrap_or_else(|e| panic!("{}: baton switch {iface}: {e}", self.name))
    }

    /// Runs `baton ARGS --admin SOCK` (the gateway's socket for gateway commands, the
    /// agent's otherwise); its stdout, or as the error what it printed, stdout before
    /// stderr (a refused command prints only its stderr line, which tests compare).
    pub fn baton(&self, args: &[&str]) -> Result<String, String> {
        let gateway_cmd = matches!(args.first(), Some(&("goto" | "listen" | "gateway-status")));
        let mut cmd = Command::new(baton_bin());
        cmd.args(args).arg("--admin").arg(if gateway_cmd {
            &self.gw_admin
        } else {
            &self.admin
        });
        let out = run_bounded(&mut cmd, None, Duration::from_secs(30))
            .map_err(|e| format!("run baton {args:?}: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(
                format!("{text}\n{}", String::from_utf8_lossy(&out.stderr).trim())
                    .trim()
                    .to_owned(),
            )
        }
    }

    /// `baton gateway-status --json`.
    pub fn gateway_status(&self) -> Value {
        let text = self
            .baton(&["gateway-status", "--json"])
            .unwrap_or_else(|e| panic!("{}: gateway-status: {e}", self.name));
        serde_json::from_str(&text).expect("gateway status is JSON")
    }

    /// The log of `which` daemon (`client` or `gateway`) so far.
    pub fn daemon_log(&self, which: &str) -> String {
        self.log(which)
    }

    /// Opens an application connection to the agent's service, from MOBILE
    /// (or from the LAN host when MOBILE is a connectivity box).
    pub fn app_connect(&self) -> tokio::net::TcpStream {
        connect_in(&self.bed, self.app_host, self.app_addr)
    }

    /// Starts a paced, bidirectional, verified exchange through baton: `bytes` each way at
    /// `pace` bytes/s each way. The task returns what the application received.
    pub fn start_exchange(
        &self,
        seed: u64,
        bytes: u64,
        pace: u64,
    ) -> tokio::task::JoinHandle<io::Result<Report>> {
        let app = self.app_connect();
        tokio::spawn(verify::exchange_paced(
            app,
            seed,
            bytes,
            bytes,
            Mode::Concurrent,
            pace,
        ))
    }

    /// Like [`start_exchange`](Self::start_exchange), also noting when each read of the
    /// server→mobile direction returned data.
    pub fn start_timed_exchange(
        &self,
        seed: u64,
        bytes: u64,
        pace: u64,
    ) -> (tokio::task::JoinHandle<io::Result<Report>>, Arrivals) {
        let app = self.app_connect();
        let arrivals = Arrivals::default();
        (
            tokio::spawn(timed_exchange(app, seed, bytes, pace, arrivals.clone())),
            arrivals,
        )
    }

    /// Waits for the exchange and for the server's report; asserts both directions arrived
    /// exact and that neither application saw an error (a reset is an error).
    pub async fn finish_exchange(
        &mut self,
        app: tokio::task::JoinHandle<io::Result<Report>>,
        limit: Duration,
    ) {
        let down = tokio::time::timeout(limit, app)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: the exchange did not finish within {limit:?}",
                    self.name
                )
            })
            .expect("exchange task")
            .unwrap_or_else(|e| panic!("{}: the application saw an error: {e}", self.name));
        // The server's report may come well after the mobile's end: after a
        // lossy spell the upstream leg's TCP can sit in retransmission
        // back-off (6.4 s, 12.8 s) with the last bytes, while the
        // downstream ones already arrived. The same limit applies.
        let up = tokio::time::timeout(limit, self.reports.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no report from the server", self.name))
            .expect("server running")
            .unwrap_or_else(|e| panic!("{}: the server application saw an error: {e}", self.name));
        assert!(
            up.is_exact(verify::Dir::Up),
            "{}: mobile→server not exact: {} of {} bytes, first mismatch {:?}",
            self.name,
            up.received,
            up.expected,
            up.first_mismatch
        );
        assert!(
            down.is_exact(verify::Dir::Down),
            "{}: server→mobile not exact: {} of {} bytes, first mismatch {:?}",
            self.name,
            down.received,
            down.expected,
            down.first_mismatch
        );
        println!(
            "{}: {} bytes each way arrived exact, no reset on either side",
            self.name, up.received
        );
    }

    /// The switch records so far.
    pub fn switches(&self) -> Vec<Value> {
        self.status().expect("status")["switches"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs a command in a namespace; panics unless it succeeds.
    pub fn sh(&self, host: Host, args: &[&str]) -> String {
        let out = self
            .bed
            .exec(host, args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self, which: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{which}.log"))).unwrap_or_default()
    }
}

/// When each read of the application returned data.
#[derive(Debug, Clone, Default)]
pub struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Arrivals {
    /// The longest pause between two reads that returned data, counted from the last read
    /// before `from` up to `until` (an open pause at `until` counts too).
    pub fn longest_gap(&self, from: Instant, until: Instant) -> Duration {
        let times = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let start = times
            .iter()
            .rev()
            .find(|t| **t <= from)
            .copied()
            .unwrap_or(from);
        let (mut prev, mut longest) = (start, Duration::ZERO);
        for &t in times.iter().filter(|t| **t > start && **t <= until) {
            longest = longest.max(t - prev);
            prev = t;
        }
        longest.max(until.saturating_duration_since(prev))
    }
}

/// The client side of [`verify::exchange_paced`] (mode Concurrent), noting when data arrives.
/// Its header: seed, bytes up, bytes down, mode, pace (see `baton_runtime::verify`).
async fn timed_exchange(
    mut s: tokio::net::TcpStream,
    seed: u64,
    bytes: u64,
    pace: u64,
    arrivals: Arrivals,
) -> io::Result<Report> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut header = [0u8; 33];
    header[..8].copy_from_slice(&seed.to_be_bytes());
    header[8..16].copy_from_slice(&bytes.to_be_bytes());
    header[16..24].copy_from_slice(&bytes.to_be_bytes());
    header[24] = 0; // Mode::Concurrent
    header[25..33].copy_from_slice(&pace.to_be_bytes());
    s.write_all(&header).await?;
    let (mut r, mut w) = s.into_split();
    let send = async move {
        let mut p = verify::Pattern::new(seed, verify::Dir::Up);
        let mut buf = vec![0u8; (pace / 100).clamp(1024, 256 * 1024) as usize];
        let (start, mut sent) = (tokio::time::Instant::now(), 0u64);
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            p.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            sent += n as u64;
            tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / pace as f64))
                .await;
        }
        w.shutdown().await
    };
    let receive = async move {
        let mut c = verify::Checker::new(seed, verify::Dir::Down);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            arrivals
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Instant::now());
            c.check(&buf[..n]);
        }
        let (received, first_mismatch) = (c.received, c.first_mismatch);
        Ok::<_, io::Error>(Report {
            seed,
            received,
            expected: bytes,
            first_mismatch,
            digest: c.digest(),
        })
    };
    let ((), report) = tokio::try_join!(send, receive)?;
    Ok(report)
}

/// The engine's row for interface `name` in a status document.
pub fn iface<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["engine"]["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

/// A connected tokio stream made inside `host`'s namespace.
pub fn connect_in(bed: &Bed, host: Host, addr: SocketAddr) -> tokio::net::TcpStream {
    let s = bed
        .in_ns(host, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .expect("enter namespace")
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpStream::from_std(s).expect("tokio stream")
}

/// A tokio listener made inside `host`'s namespace.
pub fn listen_in(bed: &Bed, host: Host, addr: SocketAddr) -> tokio::net::TcpListener {
    let l = bed
        .in_ns(host, || std::net::TcpListener::bind(addr))
        .expect("enter namespace")
        .expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpListener::from_std(l).expect("tokio listener")
}

fn spawn_daemon(bed: &Bed, host: Host, role: &str, config: &Path, dir: &Path) -> ChildGuard {
    let log = std::fs::File::create(dir.join(format!("{role}.log"))).expect("log file");
    let mut cmd = bed.command(host, baton_bin());
    cmd.args([role, "-c"])
        .arg(config)
        .env("BATON_LOG", log_filter())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    bed.spawn(&mut cmd)
        .unwrap_or_else(|e| panic!("start baton {role}: {e}"))
}

/// The lines of a switch record that matter.
pub fn describe(sw: &Value) -> String {
    format!(
        "{} {} → {}: pause {} ms, longest stall {} ms, {} bytes resent, {} streams ({})",
        sw["kind"].as_str().unwrap_or("?"),
        sw["from"].as_str().unwrap_or("?"),
        sw["to"].as_str().unwrap_or("?"),
        sw["duration_ms"],
        sw["longest_stall_ms"],
        sw["bytes_resent"],
        sw["streams"],
        sw["reason"].as_str().unwrap_or("")
    )
}

/// Events, one a line, with times relative to the first.
pub fn describe_events(events: &[Value]) -> String {
    let t0 = events
        .first()
        .and_then(|e| e["at_unix_ms"].as_u64())
        .unwrap_or(0);
    events
        .iter()
        .map(|e| {
            format!(
                "  +{:>6} ms {:<18} {:<5} urgent={:<5} {}",
                e["at_unix_ms"].as_u64().unwrap_or(0).saturating_sub(t0),
                e["kind"].as_str().unwrap_or("?"),
                e["interface"].as_str().unwrap_or("-"),
                e["urgent"],
                e["reason"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line per interface of the engine's view: health, measurements, score.
pub fn describe_engine(st: &Value) -> String {
    let mut out = format!(
        "mode {} proposal {} switching {}",
        st["engine"]["mode"], st["engine"]["proposal"], st["engine"]["switching"]
    );
    for i in st["engine"]["interfaces"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  {} metric={} current={} health={} rtt={} ms loss={} samples={} score={}",
            i["name"].as_str().unwrap_or("?"),
            i["route_metric"],
            i["current"],
            i["health"],
            i["stats"]["rtt_ms"],
            i["stats"]["loss"],
            i["stats"]["samples"],
            i["score"]
        ));
    }
    out
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.server.abort();
        if std::thread::panicking() {
            if self.events.is_some() {
                eprintln!(
                    "---- {}: events ----\n{}",
                    self.name,
                    describe_events(&self.events())
                );
            }
            for which in ["client", "gateway"] {
                let log = self.log(which);
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(150)..];
                eprintln!(
                    "---- {}: last {} lines of the {which} log ----\n{}",
                    self.name,
                    tail.len(),
                    tail.join("\n")
                );
            }
            eprintln!(
                "---- {}: logs kept in {} ----",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        println!(
            "{}: {:.1} s in all",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}
