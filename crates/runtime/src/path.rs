//! Paths: the interfaces the client agent can send from, and connecting
//! out of a chosen one.
//!
//! A path is an interface name, optionally bound with `SO_BINDTODEVICE` (a
//! source address alone does not choose the egress interface on Linux) and a
//! source address. Paths come from the `[interfaces]` table of the client
//! configuration; without one the agent uses the host's routing as is,
//! through a single path called `default`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ClientConfig;

/// One way out of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Path {
    /// Interface name (as the user and `baton switch` name it).
    pub name: String,
    /// Device to bind to (`SO_BINDTODEVICE`), if any.
    pub device: Option<String>,
    /// Source address to bind to, if any.
    pub source: Option<IpAddr>,
}

/// A path and whether it is usable now.
#[derive(Debug, Clone, Serialize)]
pub struct PathStatus {
    /// The path.
    #[serde(flatten)]
    pub path: Path,
    /// Up (usable) or down.
    pub up: bool,
    /// Preference: lower first.
    pub priority: u32,
}

#[derive(Debug)]
struct Entry {
    path: Path,
    up: bool,
    priority: u32,
    /// Fires when the path goes down: every connection on it is cut.
    cut: CancellationToken,
}

/// The client agent's paths, in order of preference.
#[derive(Debug)]
pub(crate) struct Paths {
    entries: Mutex<Vec<Entry>>,
    changed: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Paths {
    pub(crate) fn from_config(config: &ClientConfig) -> Self {
        let mut entries: Vec<Entry> = config
            .interfaces
            .iter()
            .map(|(name, i)| Entry {
                path: Path { name: name.clone(), device: i.device.clone(), source: i.source },
                up: true,
                priority: i.priority,
                cut: CancellationToken::new(),
            })
            .collect();
        if entries.is_empty() {
            entries.push(Entry {
                path: Path { name: "default".into(), device: None, source: None },
                up: true,
                priority: 0,
                cut: CancellationToken::new(),
            });
        }
        entries.sort_by(|a, b| a.priority.cmp(&b.priority).then_with(|| a.path.name.cmp(&b.path.name)));
        Self { entries: Mutex::new(entries), changed: watch::channel(0).0 }
    }

    /// Usable paths, preferred first.
    pub(crate) fn usable(&self) -> Vec<Path> {
        lock(&self.entries).iter().filter(|e| e.up).map(|e| e.path.clone()).collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Path> {
        lock(&self.entries).iter().find(|e| e.up && e.path.name == name).map(|e| e.path.clone())
    }

    pub(crate) fn is_usable(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The token that fires when `name` goes down.
    pub(crate) fn cut_token(&self, name: &str) -> CancellationToken {
        lock(&self.entries).iter().find(|e| e.path.name == name).map_or_else(CancellationToken::new, |e| e.cut.clone())
    }

    pub(crate) fn status(&self) -> Vec<PathStatus> {
        lock(&self.entries)
            .iter()
            .map(|e| PathStatus { path: e.path.clone(), up: e.up, priority: e.priority })
            .collect()
    }

    /// Marks a path up or down. Down cuts every connection on it at once.
    pub(crate) fn set_up(&self, name: &str, up: bool) -> Result<(), String> {
        let mut entries = lock(&self.entries);
        let e = entries.iter_mut().find(|e| e.path.name == name).ok_or_else(|| format!("no interface {name:?}"))?;
        if e.up != up {
            e.up = up;
            if !up {
                e.cut.cancel();
                e.cut = CancellationToken::new();
            }
            drop(entries);
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Resolves when the set of paths changes.
    pub(crate) async fn changed(&self) {
        let mut rx = self.changed.subscribe();
        let _ = rx.changed().await;
    }
}

/// Connects to `target` out of `path`, within `timeout`.
pub(crate) async fn connect_via(target: SocketAddr, path: &Path, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    if let Some(dev) = &path.device {
        socket.bind_device(Some(dev.as_bytes())).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot bind to device {dev} (needs CAP_NET_RAW): {e}"))
        })?;
    }
    if let Some(src) = path.source {
        socket.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    }
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    tokio::time::timeout(timeout, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}
