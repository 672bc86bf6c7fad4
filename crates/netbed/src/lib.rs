//! A network-namespace test bed for baton: real links that can be cut, renumbered, slowed,
//! made lossy and delayed, so tests can prove handovers on the kernel's own TCP stack.
//!
//! ```text
//!   MOBILE                         ROUTER                         SERVER
//!   wlan 10.81.1.2/24 ──veth── rwlan 10.81.1.1/24
//!   lte  10.82.1.2/24 ──veth── rlte  10.82.1.1/24
//!                              rsrv  10.89.1.1/24 ──veth──── srv 10.89.1.2/24
//!                              rsrv2 10.90.1.1/24 ──veth──── srv2 10.90.1.2/24  (add_server_link)
//! ```
//!
//! MOBILE has two default routes (wlan metric 100, lte metric 200), ROUTER forwards, SERVER
//! routes everything to ROUTER. Each [`Bed`] lives in its own three namespaces, so beds can run
//! in parallel with the same addresses. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and the
//! `ip`, `iptables`, `tc` and `ping` programs (`apt-get install -y iproute2 iptables
//! iputils-ping`).
//!
//! Degradations are made in ROUTER, per link and per direction:
//! - rate: `tc tbf` on both ends of the link ([`Bed::set_rate`]);
//! - loss: iptables `statistic` DROP on packets entering and leaving ROUTER by the link
//!   ([`Bed::set_loss`]);
//! - delay: iptables NFQUEUE to an in-process [`delayer`] ([`Bed::set_delay`]); this kernel
//!   has no `netem`.
//!
//! Everything a bed creates (namespaces, veths, rules, delayer threads, processes in its
//! namespaces) is removed when it is dropped, panics included. Beds left behind by a test
//! process that was killed outright are swept by the next [`Bed::new`].

#![forbid(unsafe_code)]

pub mod delayer;
mod nfqueue;
mod process;

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use delayer::{DelayConfig, DelayStats};
pub use process::{run_bounded, ChildGuard};

use delayer::{DelayCounters, Delayer};
use process::{run_ok, Registry};

/// Limit for the bed's own `ip`, `tc` and `iptables` calls and for [`Bed::exec`].
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix of every namespace a bed creates: `nb-<pid>-<n>-<tag>-<role>`.
const NS_PREFIX: &str = "nb-";

/// One of the bed's three hosts, each a network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    /// The device that moves between networks: links `wlan` and `lte`.
    Mobile,
    /// Forwards between the mobile's links and the server; where degradations are applied.
    Router,
    /// The far end, one link `srv`.
    Server,
    /// A second host on MOBILE's LAN (`lan0`, 10.88.1.0/24), for MOBILE as a
    /// connectivity box; exists after [`Bed::add_lan`].
    Lan,
}

/// One of MOBILE's two uplinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// 10.81.1.0/24, default route metric 100 (preferred).
    Wlan,
    /// 10.82.1.0/24, default route metric 200.
    Lte,
}

impl Link {
    /// Both links, in preference order.
    pub const ALL: [Link; 2] = [Link::Wlan, Link::Lte];

    /// Interface name on MOBILE.
    pub fn ifname(self) -> &'static str {
        match self {
            Link::Wlan => "wlan",
            Link::Lte => "lte",
        }
    }

    /// Interface name of the same link on ROUTER.
    pub fn router_ifname(self) -> &'static str {
        match self {
            Link::Wlan => "rwlan",
            Link::Lte => "rlte",
        }
    }

    /// The link's /24 as its first three octets.
    fn net(self) -> [u8; 3] {
        match self {
            Link::Wlan => [10, 81, 1],
            Link::Lte => [10, 82, 1],
        }
    }

    fn metric(self) -> u32 {
        match self {
            Link::Wlan => 100,
            Link::Lte => 200,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// NFQUEUE number of the link's delayer (per namespace, so beds may repeat them).
    fn queue(self) -> u16 {
        self as u16 + 1
    }

    fn chain(self) -> &'static str {
        match self {
            Link::Wlan => "NB-WLAN",
            Link::Lte => "NB-LTE",
        }
    }
}

fn addr_in(net: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], host)
}

const SERVER_NET: [u8; 3] = [10, 89, 1];
/// SERVER's second link, made by [`Bed::add_server_link`].
const SERVER2_NET: [u8; 3] = [10, 90, 1];
/// Routing table SERVER uses for what leaves from its second address.
const SERVER2_TABLE: &str = "90";
/// Where `ip netns exec` finds a namespace's own `/etc` files (`hosts`, ...).
const NETNS_ETC: &str = "/etc/netns";

/// One of SERVER's links: a multihomed server (a gateway with two
/// addresses on two networks, seed 003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerLink {
    /// `srv`, 10.89.1.2 (ROUTER 10.89.1.1 on `rsrv`): always there.
    First,
    /// `srv2`, 10.90.1.2 (ROUTER 10.90.1.1 on `rsrv2`): after [`Bed::add_server_link`].
    Second,
}

impl ServerLink {
    /// Interface name on SERVER.
    pub fn ifname(self) -> &'static str {
        match self {
            ServerLink::First => "srv",
            ServerLink::Second => "srv2",
        }
    }

    /// Interface name of the same link on ROUTER.
    pub fn router_ifname(self) -> &'static str {
        match self {
            ServerLink::First => "rsrv",
            ServerLink::Second => "rsrv2",
        }
    }

    fn net(self) -> [u8; 3] {
        match self {
            ServerLink::First => SERVER_NET,
            ServerLink::Second => SERVER2_NET,
        }
    }
}
/// MOBILE's LAN: MOBILE is .1 on `lan0`, LAN is .2 on `eth0`.
const LAN_NET: [u8; 3] = [10, 88, 1];
const ROUTER_OCTET: u8 = 1;
const HOST_OCTET: u8 = 2;

/// Result of [`Bed::ping`].
#[derive(Debug, Clone, PartialEq)]
pub struct PingReport {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Round-trip time of each reply.
    pub rtts: Vec<Duration>,
}

impl PingReport {
    /// Fraction of requests without a reply, 0.0 to 1.0.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - f64::from(self.received) / f64::from(self.sent)
    }

    /// Median round-trip time, if any reply came.
    pub fn median(&self) -> Option<Duration> {
        let mut v = self.rtts.clone();
        v.sort();
        v.get(v.len() / 2).copied()
    }
}

/// A delayer thread feeding on one queue in ROUTER.
struct DelayerHandle {
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<io::Result<DelayStats>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<DelayCounters>,
}

impl DelayerHandle {
    /// Stops the thread, which accepts every packet it still holds; waits at most 2 s.
    fn stop(mut self) -> io::Result<DelayStats> {
        self.stop.store(true, Ordering::Relaxed);
        let res = match self.done.recv_timeout(Duration::from_secs(2)) {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "delayer thread did not stop",
            )),
        };
        if res.is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        res
    }
}

#[derive(Default)]
struct LinkState {
    octet: u8,
    down: bool,
    loss_percent: f32,
    delay: Option<DelayerHandle>,
}

#[derive(Default)]
struct State {
    links: [LinkState; 2],
    /// SERVER links whose traffic ROUTER drops.
    blocked: Vec<ServerLink>,
}

/// A mobile host, a router and a server in three fresh network namespaces.
///
/// Dropping the bed tears all of it down. All methods take `&self`, so a bed can be shared
/// between the threads of a test.
pub struct Bed {
    /// Mobile, router, server, and the LAN host's name (made by `add_lan`).
    ns: [String; 4],
    state: Mutex<State>,
    children: Registry,
}

impl Bed {
    /// Builds the topology in three new namespaces named `nb-<pid>-<n>-<tag>-{mobile,router,server}`.
    ///
    /// `tag` (letters, digits, `_`; other characters are replaced) helps telling beds apart
    /// in `ip netns list`. Also removes beds left by test processes that no longer exist.
    pub fn new(tag: &str) -> io::Result<Bed> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        check_tools()?;
        sweep_stale();
        let tag: String = tag
            .chars()
            .take(24)
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("{NS_PREFIX}{}-{n}-{tag}", std::process::id());
        let bed = Bed {
            ns: [
                format!("{base}-mobile"),
                format!("{base}-router"),
                format!("{base}-server"),
                format!("{base}-lan"),
            ],
            state: Mutex::new(State::default()),
            children: Registry::default(),
        };
        // From here on, dropping `bed` on an error removes whatever was made.
        bed.setup()?;
        Ok(bed)
    }

    fn setup(&self) -> io::Result<()> {
        for ns in &self.ns[..3] {
            run_ok(
                Command::new("ip").args(["netns", "add", ns]),
                None,
                CMD_TIMEOUT,
            )?;
        }
        for host in [Host::Mobile, Host::Router, Host::Server] {
            let mut settings = vec![
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
                // IPv4 only: no router solicitations or DAD chatter on the links.
                ("ipv6/conf/all/disable_ipv6", "1"),
                ("ipv6/conf/default/disable_ipv6", "1"),
            ];
            match host {
                Host::Router => settings.push(("ipv4/ip_forward", "1")),
                // Renumbering adds the new address before removing the old: the new one must
                // be promoted, not deleted along with the old primary.
                Host::Mobile => {
                    settings.push(("ipv4/conf/all/promote_secondaries", "1"));
                    settings.push(("ipv4/conf/default/promote_secondaries", "1"));
                }
                // As baton's gateway hosts are told to: data in SYNs accepted
                // (TCP Fast Open), which only clients that ask for it use.
                Host::Server => settings.push(("ipv4/tcp_fastopen", "3")),
                Host::Lan => {}
            }
            self.in_ns(host, || -> io::Result<()> {
                for (key, value) in settings {
                    std::fs::write(format!("/proc/sys/net/{key}"), value)
                        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}: {e}")))?;
                }
                Ok(())
            })??;
        }
        let [_, r, s, _] = &self.ns;
        let mut mobile = String::new();
        for link in Link::ALL {
            let (dev, peer) = (link.ifname(), link.router_ifname());
            mobile += &format!(
                "link add {dev} type veth peer name {peer} netns {r}\n\
                 addr add {}/24 dev {dev}\n\
                 link set {dev} up\n",
                addr_in(link.net(), HOST_OCTET)
            );
        }
        mobile += "link set lo up\n";
        self.ip_batch(Host::Mobile, &mobile)?;
        let mut router = format!(
            "link add rsrv type veth peer name srv netns {s}\n\
             addr add {}/24 dev rsrv\n\
             link set rsrv up\n\
             link set lo up\n",
            addr_in(SERVER_NET, ROUTER_OCTET)
        );
        for link in Link::ALL {
            router += &format!(
                "addr add {}/24 dev {dev}\nlink set {dev} up\n",
                addr_in(link.net(), ROUTER_OCTET),
                dev = link.router_ifname()
            );
        }
        self.ip_batch(Host::Router, &router)?;
        self.ip_batch(
            Host::Server,
            &format!(
                "addr add {}/24 dev srv\nlink set srv up\nlink set lo up\n\
                 route add default via {} dev srv\n",
                addr_in(SERVER_NET, HOST_OCTET),
                addr_in(SERVER_NET, ROUTER_OCTET)
            ),
        )?;
        let mut routes = String::new();
        for link in Link::ALL {
            routes += &format!(
                "route add default via {} dev {} metric {}\n",
                addr_in(link.net(), ROUTER_OCTET),
                link.ifname(),
                link.metric()
            );
        }
        self.ip_batch(Host::Mobile, &routes)?;
        // One chain per link, entered by every packet that comes into ROUTER from the link or
        // leaves ROUTER to it (forwarded or its own): loss and delay rules go there.
        let mut rules = String::from("*mangle\n");
        for link in Link::ALL {
            rules += &format!(":{} - [0:0]\n", link.chain());
        }
        for link in Link::ALL {
            rules += &format!(
                "-A PREROUTING -i {dev} -j {c}\n-A POSTROUTING -o {dev} -j {c}\n",
                dev = link.router_ifname(),
                c = link.chain()
            );
        }
        rules += "COMMIT\n";
        self.iptables_restore(&rules)?;
        let mut st = self.lock();
        for link in Link::ALL {
            st.links[link.index()].octet = HOST_OCTET;
        }
        Ok(())
    }

    /// Adds the LAN host: a namespace with `eth0` (10.88.1.2/24) wired to
    /// MOBILE's `lan0` (10.88.1.1/24), so that MOBILE serves the LAN as a
    /// connectivity box. MOBILE has no route from the LAN to its uplinks:
    /// LAN hosts reach the outside only through what MOBILE relays.
    pub fn add_lan(&self) -> io::Result<()> {
        let lan = self.ns(Host::Lan);
        run_ok(
            Command::new("ip").args(["netns", "add", lan]),
            None,
            CMD_TIMEOUT,
        )?;
        self.in_ns(Host::Lan, || -> io::Result<()> {
            for key in [
                "ipv6/conf/all/disable_ipv6",
                "ipv6/conf/default/disable_ipv6",
            ] {
                std::fs::write(format!("/proc/sys/net/{key}"), "1")
                    .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}: {e}")))?;
            }
            Ok(())
        })??;
        self.ip_batch(
            Host::Mobile,
            &format!(
                "link add lan0 type veth peer name eth0 netns {lan}
addr add {}/24 dev lan0
link set lan0 up
",
                addr_in(LAN_NET, ROUTER_OCTET)
            ),
        )?;
        self.ip_batch(
            Host::Lan,
            &format!(
                "addr add {}/24 dev eth0
link set eth0 up
link set lo up
",
                addr_in(LAN_NET, HOST_OCTET)
            ),
        )?;
        Ok(())
    }

    /// Gives SERVER a second link, `srv2` (10.90.1.2/24), to ROUTER's `rsrv2`
    /// (10.90.1.1/24): SERVER becomes multihomed. What SERVER sends from
    /// 10.90.1.2 leaves by `srv2` (a source rule), so each address works
    /// while the other link is blocked. May be called while traffic flows:
    /// it is how an address appears at run time.
    pub fn add_server_link(&self) -> io::Result<()> {
        let s = self.ns(Host::Server);
        let (second, router) = (
            addr_in(SERVER2_NET, HOST_OCTET),
            addr_in(SERVER2_NET, ROUTER_OCTET),
        );
        self.ip_batch(
            Host::Router,
            &format!(
                "link add rsrv2 type veth peer name srv2 netns {s}\n\
                 addr add {}/24 dev rsrv2\n\
                 link set rsrv2 up\n",
                addr_in(SERVER2_NET, ROUTER_OCTET)
            ),
        )?;
        self.ip_batch(
            Host::Server,
            &format!(
                "addr add {second}/24 dev srv2\n\
                 link set srv2 up\n\
                 route add default via {router} dev srv2 table {SERVER2_TABLE}\n\
                 rule add from {second} lookup {SERVER2_TABLE}\n"
            ),
        )?;
        Ok(())
    }

    /// SERVER's address on `link`: 10.89.1.2 or 10.90.1.2.
    pub fn server_addr_on(&self, link: ServerLink) -> Ipv4Addr {
        addr_in(link.net(), HOST_OCTET)
    }

    /// Makes ROUTER drop everything it would forward to or from SERVER's
    /// `link` (`blocked`), or forward it again: the path to that address of
    /// SERVER is cut for every MOBILE link at once, while SERVER itself,
    /// its addresses and its other link stay as they are.
    pub fn block_server_link(&self, link: ServerLink, blocked: bool) -> io::Result<()> {
        let mut st = self.lock();
        if st.blocked.contains(&link) == blocked {
            return Ok(());
        }
        let op = if blocked { "-I" } else { "-D" };
        let dev = link.router_ifname();
        for dir in ["-i", "-o"] {
            run_ok(
                self.command(Host::Router, "iptables")
                    .args(["-w", "5", op, "FORWARD", dir, dev, "-j", "DROP"]),
                None,
                CMD_TIMEOUT,
            )?;
        }
        if blocked {
            st.blocked.push(link);
        } else {
            st.blocked.retain(|l| *l != link);
        }
        Ok(())
    }

    /// Gives `host` its own `/etc/hosts` (`ip netns exec` mounts
    /// `/etc/netns/<ns>/hosts` over it for the programs it starts, such as
    /// the daemons of [`command`](Self::command)); removed with the bed.
    pub fn set_hosts(&self, host: Host, text: &str) -> io::Result<()> {
        let dir = Path::new(NETNS_ETC).join(self.ns(host));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), text)
    }

    /// MOBILE's address on its LAN (10.88.1.1), once [`add_lan`](Self::add_lan) ran.
    pub fn box_lan_addr(&self) -> Ipv4Addr {
        addr_in(LAN_NET, ROUTER_OCTET)
    }

    /// The LAN host's address (10.88.1.2), once [`add_lan`](Self::add_lan) ran.
    pub fn lan_host_addr(&self) -> Ipv4Addr {
        addr_in(LAN_NET, HOST_OCTET)
    }

    /// Name of the host's network namespace (for `ip netns exec NAME ...`).
    pub fn ns(&self, host: Host) -> &str {
        &self.ns[host as usize]
    }

    /// MOBILE's current address on `link` (10.81.1.2 or 10.82.1.2 until [`readdress`](Self::readdress)).
    pub fn mobile_addr(&self, link: Link) -> Ipv4Addr {
        addr_in(link.net(), self.lock().links[link.index()].octet)
    }

    /// ROUTER's address on `link`, MOBILE's gateway there (10.81.1.1 or 10.82.1.1).
    pub fn router_addr(&self, link: Link) -> Ipv4Addr {
        addr_in(link.net(), ROUTER_OCTET)
    }

    /// SERVER's address, 10.89.1.2 (ROUTER is 10.89.1.1 on that link).
    pub fn server_addr(&self) -> Ipv4Addr {
        addr_in(SERVER_NET, HOST_OCTET)
    }

    /// A command that runs `program` inside the host's namespace (`ip netns exec`).
    ///
    /// Add arguments and stdio, then start it with [`ChildGuard::spawn`] or [`run_bounded`].
    pub fn command(&self, host: Host, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(host), program]);
        cmd
    }

    /// A counter of the kernel's TCP statistics in `host`'s namespace
    /// (`TcpExt` of `/proc/net/netstat`), e.g. `TCPFastOpenPassive`.
    pub fn tcp_ext_counter(&self, host: Host, name: &str) -> io::Result<u64> {
        let out = self.exec(host, &["cat", "/proc/net/netstat"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            return Err(io::Error::other("no TcpExt lines in /proc/net/netstat"));
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no counter TcpExt {name}")))
    }

    /// Runs `args` in the host's namespace and waits (at most 30 s) for its output.
    ///
    /// A non-zero exit status is returned in the [`Output`], not as an error.
    pub fn exec(&self, host: Host, args: &[&str]) -> io::Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let mut cmd = self.command(host, program);
        cmd.args(rest);
        run_bounded(&mut cmd, None, CMD_TIMEOUT)
    }

    /// Spawns `cmd` (from [`Bed::command`]); the child (its process group) is killed and
    /// reaped when the guard drops; the bed kills it too when the bed drops first.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<ChildGuard> {
        ChildGuard::spawn_registered(cmd, &self.children)
    }

    /// Runs `f` on a thread inside the host's namespace and returns its result.
    ///
    /// Sockets keep the namespace they were made in, so a listener or a connected stream
    /// created here can be used from any thread afterwards. A panic in `f` is resumed here.
    pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(&self, host: Host, f: F) -> io::Result<T> {
        let file = self.ns_file(host)?;
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            });
            match t.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a named thread inside the host's namespace; threads it spawns stay there too
    /// (a tokio runtime built on it, for example).
    ///
    /// The caller must make the thread end: the bed cannot stop it.
    pub fn spawn_thread<T, F>(&self, host: Host, name: &str, f: F) -> io::Result<JoinHandle<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.ns_file(host)?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    let _ = tx.send(Err(e));
                    // The caller already has the error and drops this handle; f must not run
                    // outside the namespace.
                    panic!("cannot enter network namespace: {e}");
                }
                let _ = tx.send(Ok(()));
                f()
            })?;
        rx.recv()
            .map_err(|_| io::Error::other("namespace thread died"))??;
        Ok(handle)
    }

    /// Takes MOBILE's side of `link` down: its routes go, traffic moves to the other link.
    pub fn link_down(&self, link: Link) -> io::Result<()> {
        self.ip(Host::Mobile, &["link", "set", link.ifname(), "down"])?;
        self.lock().links[link.index()].down = true;
        Ok(())
    }

    /// Brings MOBILE's side of `link` back up and restores its default route and metric.
    pub fn link_up(&self, link: Link) -> io::Result<()> {
        self.ip(Host::Mobile, &["link", "set", link.ifname(), "up"])?;
        self.restore_default_route(link)?;
        self.lock().links[link.index()].down = false;
        Ok(())
    }

    /// Renumbers MOBILE on `link` to `<subnet>.new_host_octet`, as a DHCP server might: the
    /// new address is added, the old one removed (sockets bound to it break), the default
    /// route kept.
    pub fn readdress(&self, link: Link, new_host_octet: u8) -> io::Result<()> {
        if matches!(new_host_octet, 0 | ROUTER_OCTET | 255) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("host octet {new_host_octet} is the network, the router or broadcast"),
            ));
        }
        let (old, down) = {
            let st = self.lock();
            let l = &st.links[link.index()];
            (l.octet, l.down)
        };
        if old == new_host_octet {
            return Ok(());
        }
        let new = format!("{}/24", addr_in(link.net(), new_host_octet));
        let old = format!("{}/24", addr_in(link.net(), old));
        self.ip(Host::Mobile, &["addr", "add", &new, "dev", link.ifname()])?;
        self.ip(Host::Mobile, &["addr", "del", &old, "dev", link.ifname()])?;
        self.lock().links[link.index()].octet = new_host_octet;
        if !down {
            self.restore_default_route(link)?;
        }
        Ok(())
    }

    /// Limits `link` to `kbit` kbit/s in each direction with `tbf` on both of its ends
    /// (100 ms of queue); 0 removes the limit.
    pub fn set_rate(&self, link: Link, kbit: u32) -> io::Result<()> {
        for (host, dev) in [
            (Host::Mobile, link.ifname()),
            (Host::Router, link.router_ifname()),
        ] {
            if kbit == 0 {
                // Fails when there is no qdisc to remove, which is what we want anyway.
                let _ = run_bounded(
                    Command::new("tc").args([
                        "-n",
                        self.ns(host),
                        "qdisc",
                        "del",
                        "dev",
                        dev,
                        "root",
                    ]),
                    None,
                    CMD_TIMEOUT,
                );
                continue;
            }
            let bytes_per_s = u64::from(kbit) * 125;
            // 10 ms worth of tokens, but at least a few full-size frames.
            let burst = (bytes_per_s / 100).max(4 * 1514);
            run_ok(
                Command::new("tc").args([
                    "-n",
                    self.ns(host),
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{kbit}kbit"),
                    "burst",
                    &burst.to_string(),
                    "latency",
                    "100ms",
                ]),
                None,
                CMD_TIMEOUT,
            )?;
        }
        Ok(())
    }

    /// Drops `percent` % of the packets of `link`, independently in each direction (a round
    /// trip is lost with probability 1 - (1 - p)²); 0 removes the loss.
    pub fn set_loss(&self, link: Link, percent: f32) -> io::Result<()> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("loss {percent}% is not within 0..=100"),
            ));
        }
        let mut st = self.lock();
        st.links[link.index()].loss_percent = percent;
        self.write_chain(link, &st)
    }

    /// Delays every packet of `link` by `one_way_ms` in each direction (round trip + 2x);
    /// 0 removes the delay. Packets held when the delay changes are released at once.
    pub fn set_delay(&self, link: Link, one_way_ms: u32) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(old) = st.links[link.index()].delay.take() {
            // Rule first, so nothing new is queued for a queue about to lose its reader.
            self.write_chain(link, &st)?;
            old.stop()?;
        }
        if one_way_ms == 0 {
            return Ok(());
        }
        let cfg = DelayConfig::new(link.queue(), Duration::from_millis(one_way_ms.into()));
        st.links[link.index()].delay = Some(self.start_delayer(cfg)?);
        self.write_chain(link, &st)
    }

    /// The delayer's counters for `link`, `None` when the link has no delay.
    pub fn delay_stats(&self, link: Link) -> Option<DelayStats> {
        let st = self.lock();
        st.links[link.index()]
            .delay
            .as_ref()
            .map(|d| d.counters.snapshot())
    }

    /// Packets the kernel dropped on the way to `link`'s delayer since the bed was made:
    /// queue full plus socket buffer full (`/proc/net/netfilter/nfnetlink_queue`). 0 when
    /// the queue is not bound.
    pub fn delay_drops(&self, link: Link) -> io::Result<u64> {
        let text = self.in_ns(Host::Router, || {
            std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")
        })??;
        Ok(queue_drops(&text, link.queue()))
    }

    /// Median of 5 pings from MOBILE to ROUTER over `link`.
    pub fn ping_rtt(&self, link: Link) -> io::Result<Duration> {
        let report = self.ping_via(link, self.router_addr(link), 5, Duration::from_millis(100))?;
        report.median().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no ping reply over {}", link.ifname()),
            )
        })
    }

    /// Sends `count` pings from `from` to `to`, one every `interval` (at least 2 ms), and
    /// waits at most 1 s past the last one.
    pub fn ping(
        &self,
        from: Host,
        to: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> io::Result<PingReport> {
        self.ping_args(from, to, count, interval, &[])
    }

    /// Like [`ping`](Self::ping) from MOBILE, bound to the interface of `link`.
    pub fn ping_via(
        &self,
        link: Link,
        to: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> io::Result<PingReport> {
        self.ping_args(Host::Mobile, to, count, interval, &["-I", link.ifname()])
    }

    fn ping_args(
        &self,
        from: Host,
        to: Ipv4Addr,
        count: u32,
        interval: Duration,
        extra: &[&str],
    ) -> io::Result<PingReport> {
        let interval = interval.max(Duration::from_millis(2));
        // Not `-w`: with a deadline ping sends until `count` replies came, not `count` requests.
        let limit = interval * count + Duration::from_secs(5);
        let mut cmd = self.command(from, "ping");
        cmd.args(["-n", "-c", &count.to_string()])
            .args(["-i", &format!("{:.3}", interval.as_secs_f64())])
            .args(["-W", "1"])
            .args(extra)
            .arg(to.to_string());
        let out = run_bounded(&mut cmd, None, limit)?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_ping(&text).ok_or_else(|| {
            io::Error::other(format!(
                "cannot read ping output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every field is written
        // after its command succeeded), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ns_file(&self, host: Host) -> io::Result<File> {
        File::open(Path::new("/run/netns").join(self.ns(host)))
    }

    fn ip(&self, host: Host, args: &[&str]) -> io::Result<String> {
        run_ok(
            Command::new("ip").args(["-n", self.ns(host)]).args(args),
            None,
            CMD_TIMEOUT,
        )
    }

    fn ip_batch(&self, host: Host, lines: &str) -> io::Result<String> {
        run_ok(
            Command::new("ip").args(["-n", self.ns(host), "-batch", "-"]),
            Some(lines.as_bytes()),
            CMD_TIMEOUT,
        )
    }

    fn iptables_restore(&self, rules: &str) -> io::Result<String> {
        run_ok(
            self.command(Host::Router, "iptables-restore")
                .args(["-w", "5", "--noflush"]),
            Some(rules.as_bytes()),
            CMD_TIMEOUT,
        )
    }

    fn restore_default_route(&self, link: Link) -> io::Result<()> {
        let gw = self.router_addr(link).to_string();
        let metric = link.metric().to_string();
        self.ip(
            Host::Mobile,
            &[
                "route",
                "replace",
                "default",
                "via",
                &gw,
                "dev",
                link.ifname(),
                "metric",
                &metric,
            ],
        )
        .map(drop)
    }

    /// Replaces the link's chain in one iptables-restore transaction: loss, then delay.
    fn write_chain(&self, link: Link, st: &State) -> io::Result<()> {
        let l = &st.links[link.index()];
        let c = link.chain();
        let mut rules = format!("*mangle\n-F {c}\n");
        if l.loss_percent > 0.0 {
            rules += &format!(
                "-A {c} -m statistic --mode random --probability {:.6} -j DROP\n",
                f64::from(l.loss_percent) / 100.0
            );
        }
        if l.delay.is_some() {
            // No --queue-bypass: if the delayer is gone, packets are dropped, never passed
            // undelayed.
            rules += &format!("-A {c} -j NFQUEUE --queue-num {}\n", link.queue());
        }
        rules += "COMMIT\n";
        self.iptables_restore(&rules).map(drop)
    }

    fn start_delayer(&self, cfg: DelayConfig) -> io::Result<DelayerHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let flag = stop.clone();
        let name = format!("delayer-q{}", cfg.queue);
        let thread = self.spawn_thread(Host::Router, &name, move || {
            let delayer = match Delayer::bind(&cfg) {
                Ok(d) => d,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(delayer.counters()));
            let res = delayer.run(&flag);
            if let Err(e) = &res {
                // The queue is unbound now: its packets are dropped until set_delay again.
                eprintln!("baton-netbed: delayer on queue {} failed: {e}", cfg.queue);
            }
            let _ = done_tx.send(res);
        })?;
        let counters = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| io::Error::other("delayer did not start"))??;
        Ok(DelayerHandle {
            stop,
            done: done_rx,
            thread: Some(thread),
            counters,
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let mut st = self.lock();
        for l in &mut st.links {
            if let Some(d) = l.delay.take() {
                let _ = d.stop();
            }
        }
        drop(st);
        // Our own children first: one still inside `ip netns exec`, before its setns, is not
        // yet listed by `ip netns pids` but would enter the namespace and keep it alive.
        self.children.kill_all();
        for ns in &self.ns {
            remove_ns(ns);
            let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(ns));
        }
    }
}

/// Kills every process in the namespace (never this one) and deletes it; errors are ignored
/// because this runs in `Drop`.
fn remove_ns(ns: &str) {
    if let Ok(pids) = run_ok(
        Command::new("ip").args(["netns", "pids", ns]),
        None,
        CMD_TIMEOUT,
    ) {
        let me = std::process::id();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            if pid != me {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
    let _ = run_bounded(
        Command::new("ip").args(["netns", "delete", ns]),
        None,
        CMD_TIMEOUT,
    );
}

/// Removes namespaces of beds whose test process has died without dropping them.
fn sweep_stale() {
    let Ok(list) = run_ok(
        Command::new("ip").args(["netns", "list"]),
        None,
        CMD_TIMEOUT,
    ) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_ns(name);
        }
    }
    // `/etc` files of beds whose namespaces are already gone.
    for entry in std::fs::read_dir(NETNS_ETC).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn check_tools() -> io::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "baton-netbed needs root (network namespaces, veth, iptables, tc)",
        ));
    }
    for tool in ["ip", "iptables-restore", "tc", "ping"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "baton-netbed needs `{tool}`: apt-get install -y iproute2 iptables iputils-ping"
                ),
            ));
        }
    }
    Ok(())
}

/// Parses `ping -n` output: per-reply `time=` values and the summary's counts.
fn parse_ping(text: &str) -> Option<PingReport> {
    let mut rtts = Vec::new();
    let mut counts = None;
    for line in text.lines() {
        if let Some(rest) = line.split("time=").nth(1) {
            let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
            rtts.push(Duration::from_secs_f64(ms / 1000.0));
        }
        if line.contains("packets transmitted") {
            let mut nums = line
                .split(',')
                .filter_map(|part| part.split_whitespace().next()?.parse::<u32>().ok());
            counts = Some((nums.next()?, nums.next()?));
        }
    }
    let (sent, received) = counts?;
    Some(PingReport {
        sent,
        received,
        rtts,
    })
}

/// Sums `queue_dropped` and `user_dropped` for `queue` in nfnetlink_queue's proc file:
/// `queue portid waiting copy_mode copy_range queue_dropped user_dropped id_seq 1`.
fn queue_drops(text: &str, queue: u16) -> u64 {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 7 && f[0].parse() == Ok(queue))
        .map(|f| f[5].parse::<u64>().unwrap_or(0) + f[6].parse::<u64>().unwrap_or(0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_output() {
        let text = "PING 10.81.1.1 (10.81.1.1) 56(84) bytes of data.\n\
            64 bytes from 10.81.1.1: icmp_seq=1 ttl=64 time=20.4 ms\n\
            64 bytes from 10.81.1.1: icmp_seq=3 ttl=64 time=21.0 ms\n\
            \n--- 10.81.1.1 ping statistics ---\n\
            3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms\n\
            rtt min/avg/max/mdev = 20.4/20.7/21.0/0.3 ms\n";
        let r = parse_ping(text).unwrap();
        assert_eq!((r.sent, r.received), (3, 2));
        assert_eq!(r.median(), Some(Duration::from_micros(21_000)));
        assert!((r.loss() - 1.0 / 3.0).abs() < 1e-9);
        let none = "2 packets transmitted, 0 received, +2 errors, 100% packet loss, time 1s\n";
        assert_eq!(parse_ping(none).unwrap().median(), None);
    }

    #[test]
    fn sums_queue_drops() {
        let text = "    1  12345     0 1     0     3     4   900  1\n    2  0 0 1 0 7 0 5 1\n";
        assert_eq!(queue_drops(text, 1), 7);
        assert_eq!(queue_drops(text, 2), 7);
        assert_eq!(queue_drops(text, 3), 0);
    }
}
