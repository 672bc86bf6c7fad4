//! Network namespaces for the integration tests.
//!
//! Each test makes its own namespaces (named `baton-os-test-<pid>-<tag>-<n>`),
//! configures them with `ip -n`, and runs its async code on a thread that
//! has entered one with `setns`: sockets, netlink ones included, belong to
//! the namespace of the thread that created them, so the code under test
//! sees only the namespace's interfaces. Namespaces are deleted by a Drop
//! guard, so also when a test fails.

#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

/// Longest a whole test body may run; a hang fails the test instead of CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

const PREFIX: &str = "baton-os-test-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists while this value does. Derefs to [`Ns`],
/// whose copies can go to the threads that do the work while the guard
/// stays with the test's own thread, so it is dropped even on a panic.
#[derive(Debug)]
pub struct Netns {
    ns: Ns,
}

/// A namespace by name: runs commands in it.
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
}

impl std::ops::Deref for Netns {
    type Target = Ns;

    fn deref(&self) -> &Ns {
        &self.ns
    }
}

impl Netns {
    /// Creates a fresh namespace. IPv6 is turned off unless `ipv6`: its
    /// autoconfiguration sends packets (router solicitations, DAD) at
    /// unpredictable times, which would blur packet counts. Reverse-path
    /// filtering is off so that asymmetric test routes are not dropped.
    pub fn new(tag: &str, ipv6: bool) -> Netns {
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{tag}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { ns: Ns { name } };
        let v6 = if ipv6 { "0" } else { "1" };
        ns.sysctl(&format!("net.ipv6.conf.all.disable_ipv6={v6}"));
        ns.sysctl(&format!("net.ipv6.conf.default.disable_ipv6={v6}"));
        ns.sysctl("net.ipv4.conf.all.rp_filter=0");
        ns.sysctl("net.ipv4.conf.default.rp_filter=0");
        ns
    }

    /// A copy of the name, for another thread.
    pub fn handle(&self) -> Ns {
        self.ns.clone()
    }
}

impl Ns {
    /// Runs `ip -n NS ARGS...` and panics unless it succeeds.
    pub fn ip(&self, args: &str) {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        run("ip", &full);
    }

    /// Runs `ip -n NS ARGS...` and returns its standard output.
    pub fn ip_output(&self, args: &str) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        run("ip", &full)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, setting: &str) {
        run(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-qw", setting],
        );
    }

    /// The interface index of `dev` in this namespace.
    pub fn index(&self, dev: &str) -> u32 {
        let out = self.ip_output(&format!("-j link show dev {dev}"));
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j prints JSON");
        let index = v[0]["ifindex"].as_u64().expect("ifindex in ip -j output");
        u32::try_from(index).expect("interface index fits u32")
    }

    /// Packets sent so far by `dev` in this namespace.
    pub fn tx_packets(&self, dev: &str) -> u64 {
        let out = self.ip_output(&format!("-j -s link show dev {dev}"));
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j prints JSON");
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .expect("tx packets in ip -j -s output")
    }

    /// Runs `body` on a new thread inside this namespace, on a
    /// current-thread tokio runtime, bounded by [`TEST_TIMEOUT`]; a panic in
    /// `body` fails the caller.
    pub fn run<F, Fut, T>(&self, body: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            let ns = File::open(&path).expect("namespace file exists");
            // Only this thread changes namespace; the test harness's
            // threads stay where they are.
            setns(ns, CloneFlags::CLONE_NEWNET).expect("setns (needs root)");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                tokio::time::timeout(TEST_TIMEOUT, body())
                    .await
                    .expect("test body finished in time")
            })
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace takes its interfaces (veth peers in other
        // namespaces included) with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns.name])
            .status();
    }
}

/// Runs a command, panicking with its stderr unless it succeeds.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes namespaces left by test processes that no longer exist (killed
/// before their guards ran), so they do not pile up on a CI machine.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}
