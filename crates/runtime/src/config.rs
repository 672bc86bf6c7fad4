//! Configuration files of the gateway and the client agent (TOML).
//!
//! Every key is documented here and in the README; unknown keys are errors,
//! so that a typo never silently falls back to a default. Errors name the key
//! (`services.postgres.target`) and the problem.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_proto::wire::{valid_name, MAX_EXPOSED};
use baton_proto::PublicKey;
use serde::{de, Deserialize, Deserializer};

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key is unknown, missing, or holds a bad value.
    #[error("{path}: key `{key}`: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The key, as a dotted path.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// `host:port` where host is a name or an IP address, resolved when used
/// (so a gateway can reach services anywhere and DNS changes are followed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or address literal (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let bad =
            || format!("invalid address {s:?}: expected host:port (e.g. \"db.internal:5432\")");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
            });
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum PortOrAddr {
        Port(u16),
        Addr(String),
    }
    match PortOrAddr::deserialize(d)? {
        // A bare port means loopback: a service is private to this host unless
        // the user asks for a LAN address.
        PortOrAddr::Port(p) => Ok(SocketAddr::from(([127, 0, 0, 1], p))),
        PortOrAddr::Addr(s) => s.parse().map_err(|_| {
            de::Error::custom(format!(
                "invalid address {s:?}: expected ip:port (e.g. \"127.0.0.1:5432\")"
            ))
        }),
    }
}

fn compression<'de, D: Deserializer<'de>>(d: D) -> Result<baton_proto::Compression, D::Error> {
    match String::deserialize(d)?.as_str() {
        "none" => Ok(baton_proto::Compression::None),
        "zstd" => Ok(baton_proto::Compression::Zstd),
        other => Err(de::Error::custom(format!(
            "unknown compression {other:?}: expected \"zstd\" or \"none\""
        ))),
    }
}

/// `send_buffers`: true for `"path"`, false for `"kernel"`.
fn send_buffers<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match String::deserialize(d)?.as_str() {
        "path" => Ok(true),
        "kernel" => Ok(false),
        other => Err(de::Error::custom(format!(
            "unknown send_buffers {other:?}: expected \"path\" or \"kernel\""
        ))),
    }
}

fn socket_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| {
            s.parse().map_err(|_| {
                de::Error::custom(format!(
                    "invalid address {s:?}: expected ip:port (e.g. \"0.0.0.0:7700\")"
                ))
            })
        })
        .collect()
}

fn opt_socket_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<SocketAddr>>, D::Error> {
    socket_addrs(d).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let v = humantime::parse_duration(&s).map_err(|e| {
        de::Error::custom(format!(
            "invalid duration {s:?}: {e} (e.g. \"30s\", \"5m\")"
        ))
    })?;
    if v.is_zero() {
        return Err(de::Error::custom("duration must be greater than zero"));
    }
    Ok(v)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(u64),
        Str(String),
    }
    let (n, text) = match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => (Some(n), n.to_string()),
        NumOrStr::Str(s) => {
            let t = s.trim();
            let (digits, mult) = match t.find(|c: char| !c.is_ascii_digit()) {
                None => (t, 1u64),
                Some(i) => {
                    let mult = match t[i..].trim() {
                        "B" => 1,
                        "KiB" | "K" | "k" => 1 << 10,
                        "MiB" | "M" => 1 << 20,
                        "GiB" | "G" => 1 << 30,
                        _ => 0,
                    };
                    (&t[..i], mult)
                }
            };
            (
                digits
                    .parse::<u64>()
                    .ok()
                    .filter(|_| mult > 0)
                    .and_then(|d| d.checked_mul(mult)),
                s,
            )
        }
    };
    match n {
        Some(n) if (4096..=1 << 32).contains(&n) => Ok(n as usize),
        Some(_) => Err(de::Error::custom(format!(
            "size {text} out of range (4 KiB to 4 GiB)"
        ))),
        None => Err(de::Error::custom(format!(
            "invalid size {text:?} (e.g. \"8MiB\", \"512KiB\" or bytes)"
        ))),
    }
}

/// A block of addresses written `ip/prefix` (or a single `ip`), from which the
/// gateway assigns client agents their own address (seed 000's virtual IPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrBlock {
    /// The block's first address (host bits zero).
    pub base: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl AddrBlock {
    /// Most addresses used from one block: more is never needed, and keeps
    /// an IPv6 /64 from being walked.
    pub const MAX_USED: u64 = 1 << 16;

    /// How many addresses of the block are handed out. The network and
    /// broadcast addresses of an IPv4 block (and the subnet-router anycast
    /// address of an IPv6 one) are left out, as a host cannot use them.
    pub fn usable(&self) -> u64 {
        let host_bits = u32::from(self.bits() - self.prefix);
        let size = 1u128 << host_bits.min(64);
        let reserved = match self.base {
            IpAddr::V4(_) if host_bits >= 2 => 2,
            IpAddr::V6(_) if host_bits >= 1 => 1,
            _ => 0,
        };
        (size - reserved).min(u128::from(Self::MAX_USED)) as u64
    }

    /// The `i`-th usable address (`i < self.usable()`).
    pub fn nth(&self, i: u64) -> Option<IpAddr> {
        if i >= self.usable() {
            return None;
        }
        let host_bits = self.bits() - self.prefix;
        // Skip the network (or anycast) address when it is reserved.
        let skip = u128::from(host_bits >= if self.base.is_ipv4() { 2 } else { 1 });
        let offset = u128::from(i) + skip;
        Some(match self.base {
            IpAddr::V4(b) => IpAddr::V4((u32::from(b) + offset as u32).into()),
            IpAddr::V6(b) => IpAddr::V6((u128::from(b) + offset).into()),
        })
    }

    /// Whether `ip` lies in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let host_bits = u32::from(self.bits() - self.prefix);
        match (self.base, ip) {
            (IpAddr::V4(b), IpAddr::V4(x)) => {
                u32::from(b).checked_shr(host_bits).unwrap_or(0)
                    == u32::from(x).checked_shr(host_bits).unwrap_or(0)
            }
            (IpAddr::V6(b), IpAddr::V6(x)) => {
                u128::from(b).checked_shr(host_bits).unwrap_or(0)
                    == u128::from(x).checked_shr(host_bits).unwrap_or(0)
            }
            _ => false,
        }
    }

    fn bits(&self) -> u8 {
        if self.base.is_ipv4() {
            32
        } else {
            128
        }
    }
}

impl fmt::Display for AddrBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl std::str::FromStr for AddrBlock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid address block {s:?}: expected ip/prefix (e.g. \"192.168.102.128/25\") or one ip")
        };
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let base: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        let bits = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(bad)?,
        };
        let block = Self { base, prefix };
        let host_bits = u32::from(bits - prefix);
        let host_part = match base {
            IpAddr::V4(b) => {
                u128::from(u32::from(b) & 1u32.checked_shl(host_bits).map_or(u32::MAX, |m| m - 1))
            }
            IpAddr::V6(b) => {
                u128::from(b) & 1u128.checked_shl(host_bits).map_or(u128::MAX, |m| m - 1)
            }
        };
        if host_part != 0 {
            return Err(format!(
                "{s:?} has host bits set: a block starts at its network address"
            ));
        }
        Ok(block)
    }
}

fn addr_blocks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AddrBlock>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    list.iter()
        .map(|s| s.parse().map_err(de::Error::custom))
        .collect()
}

fn public_key<'de, D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|e| de::Error::custom(format!("{e}")))
}

/// The gateway's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Addresses to accept client agents on.
    #[serde(deserialize_with = "socket_addrs")]
    pub listen: Vec<SocketAddr>,
    /// A session with no frame from its client agent for this long is
    /// released with everything it holds. Default 5m.
    #[serde(default = "defaults::inactivity", deserialize_with = "duration")]
    pub inactivity_timeout: Duration,
    /// Most sessions held at once; more are REFUSED with "capacity full".
    #[serde(default = "defaults::max_sessions")]
    pub max_sessions: usize,
    /// Most live streams per session; more are refused.
    #[serde(default = "defaults::max_streams")]
    pub max_streams_per_session: usize,
    /// How long to wait for a service's target to accept a connection.
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// How long a new connection may take to finish its handshake or preamble.
    #[serde(default = "defaults::handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// How long a session whose control connection is gone waits for its
    /// client agent to come back (the seed's switch timeout Z) before it is
    /// released with its streams. Default 10m.
    #[serde(default = "defaults::switch_timeout", deserialize_with = "duration")]
    pub switch_timeout: Duration,
    /// Unconfirmed bytes held per stream and direction for resuming after a
    /// switch; when full, reading from the server pauses. Default 8MiB.
    #[serde(default = "defaults::replay_buffer", deserialize_with = "size")]
    pub replay_buffer: usize,
    /// Who sizes the send buffers of busy relayed connections: `"path"`
    /// (default) sets them to four bandwidth-delay products of their path
    /// where the path is short (µs round trips: loopback, one host, one
    /// rack), `"kernel"` leaves Linux's autotuning everywhere.
    #[serde(default = "defaults::send_buffers", deserialize_with = "send_buffers")]
    pub send_buffers: bool,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, GatewayService>,
    /// Client services (server → client) by name: where the gateway listens
    /// for servers that push to client agents.
    #[serde(default)]
    pub exposed: BTreeMap<String, GatewayExposed>,
    /// Addresses assigned to client agents that expose client services, one
    /// per agent, so that many agents can expose the same port. They must be
    /// addresses of this host (any 127.x address on Linux loopback).
    #[serde(default, deserialize_with = "addr_blocks")]
    pub virtual_pool: Vec<AddrBlock>,
    /// How UDP services' flows are held and expired.
    #[serde(default)]
    pub udp: UdpConfig,
    /// Authorised client agents by id.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientEntry>,
    /// The addresses announced to client agents (seed 003's dynamic
    /// addresses), when they differ from the listen addresses (NAT, port
    /// forwarding). Without it the gateway announces its listen addresses,
    /// wildcards left out, following `baton listen add|remove`.
    #[serde(default, deserialize_with = "opt_socket_addrs")]
    pub advertise: Option<Vec<SocketAddr>>,
    /// Follow the host's addresses in the kernel's interface table
    /// (rtnetlink). With a wildcard `listen` and no `advertise`, the
    /// gateway advertises the host's usable addresses and re-advertises
    /// when they change; and whatever it listens on, a session whose
    /// control connection is on an address that goes away, becomes
    /// deprecated or whose interface goes down gets a go-to. Default true.
    #[serde(default = "defaults::yes")]
    pub watch_addresses: bool,
    /// The gateway's admin socket (`baton goto`, `baton listen`, `baton
    /// gateway-status`). Without it the default path is used if free.
    pub admin: Option<PathBuf>,
    /// Worker processes sharing the gateway's ports (1 to 64; default 1).
    /// Each has its own open-files limit, and every session, leg and
    /// connection to a target takes a descriptor: a gateway that must hold
    /// more than one process's limit allows runs several. Each client id
    /// belongs to one worker; `virtual_pool` is shared out evenly, and
    /// `max_sessions` with a margin for clients hashing unevenly. Needs fixed ports in `listen`.
    #[serde(default = "defaults::workers")]
    pub workers: usize,
    /// Session threads of each gateway process (1 to 256). Default: one
    /// per core. Every connection of a session is served on the thread its
    /// client id hashes to, so that a session's tasks never wake each other
    /// across threads; more threads serve more clients at once. The process
    /// also runs as many runtime threads (or `TOKIO_WORKER_THREADS`) that
    /// accept connections and read their first frame.
    pub threads: Option<usize>,
}

/// Most runtime threads of one process.
pub const MAX_THREADS: usize = 256;

/// Most worker processes of one gateway.
pub const MAX_WORKERS: usize = 64;

/// A client service as the gateway knows it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayExposed {
    /// The port servers connect to, on the address assigned to each client
    /// agent that exposes the service.
    pub port: u16,
    /// `"tcp"` (default): servers connect, and each connection is a stream;
    /// `"udp"`: servers send datagrams, and each server address is a flow.
    /// A TCP and a UDP client service may share a port.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A service the gateway relays to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayService {
    /// Where the real server listens: any host the gateway reaches.
    pub target: HostPort,
    /// `"tcp"` (default) or `"udp"`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A client agent the gateway accepts.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// The client's public key, as printed by `baton keygen`.
    #[serde(deserialize_with = "public_key")]
    pub key: PublicKey,
    /// The services this client may open; all others are refused.
    #[serde(default)]
    pub services: Vec<String>,
    /// The client services (keys of `[exposed]`) this client may expose;
    /// all others are refused.
    #[serde(default)]
    pub exposes: Vec<String>,
}

impl fmt::Debug for ClientEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientEntry")
            .field("key", &self.key)
            .field("services", &self.services)
            .field("exposes", &self.exposes)
            .finish()
    }
}

/// The client agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// This client agent's id, as listed in the gateways' `[clients]`.
    pub id: String,
    /// File holding the secret key from `baton keygen`; relative paths are
    /// relative to the configuration file's folder.
    pub key_file: PathBuf,
    /// Interval between keep-alives on each control connection (the gateway
    /// may ask for a shorter one). Default 1s.
    #[serde(default = "defaults::keepalive", deserialize_with = "duration")]
    pub keepalive: Duration,
    /// How long to wait for a gateway to accept a TCP connection.
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// A control connection with no answer from the gateway for this long
    /// is taken as a lost path: the agent switches. Default 4s.
    #[serde(default = "defaults::dead_after", deserialize_with = "duration")]
    pub dead_after: Duration,
    /// How long to keep trying to resume a session when no path works (the
    /// seed's switch timeout Z); then its streams are closed. Default 10m.
    #[serde(default = "defaults::switch_timeout", deserialize_with = "duration")]
    pub switch_timeout: Duration,
    /// Unconfirmed bytes held per stream and direction for resuming after a
    /// switch; when full, reading from the application pauses. Default 8MiB.
    #[serde(default = "defaults::replay_buffer", deserialize_with = "size")]
    pub replay_buffer: usize,
    /// Who sizes the send buffers of busy relayed connections: `"path"`
    /// (default) sets them to four bandwidth-delay products of their path
    /// where the path is short (µs round trips: loopback, one host, one
    /// rack), `"kernel"` leaves Linux's autotuning everywhere.
    #[serde(default = "defaults::send_buffers", deserialize_with = "send_buffers")]
    pub send_buffers: bool,
    /// The admin socket (`baton status`, `baton switch`).
    #[serde(default = "defaults::admin")]
    pub admin: PathBuf,
    /// Runtime threads (1 to 256). Default: one per core (or
    /// `TOKIO_WORKER_THREADS`). They accept applications' connections and
    /// open legs; each gateway's session and its streams run on a session
    /// thread of their own (one per gateway, at most `threads`).
    pub threads: Option<usize>,
    /// Interfaces to use, by name. Without this table the agent follows the
    /// kernel's interface table.
    #[serde(default)]
    pub interfaces: BTreeMap<String, InterfaceConfig>,
    /// Decision mode: `"auto"` (default), `"manual"` or `"user"`; overrides
    /// `policy.mode`. Changed at run time with `baton mode`.
    pub mode: Option<baton_policy::Mode>,
    /// The decision engine's thresholds, intervals, weights and per-interface
    /// attributes (see the README).
    #[serde(default)]
    pub policy: baton_policy::PolicyConfig,
    /// Gateways by name.
    pub gateways: BTreeMap<String, GatewaySpec>,
    /// Services to offer to local applications, by name.
    #[serde(default)]
    pub services: BTreeMap<String, ClientService>,
    /// Client services, by the name the gateway knows them by: services on
    /// this side (this host or its LAN) that servers behind a gateway reach
    /// through it (push, publish/subscribe).
    #[serde(default)]
    pub exposed: BTreeMap<String, ExposedService>,
    /// How UDP services' flows are held and expired.
    #[serde(default)]
    pub udp: UdpConfig,
}

/// A client service: a server on the client's side that the gateway's side
/// connects to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposedService {
    /// The gateway (a key of `[gateways]`) that listens for it.
    pub gateway: String,
    /// Where the service really listens: this host or its LAN.
    pub target: HostPort,
    /// `"tcp"` (default) or `"udp"`: must match the gateway's
    /// `exposed.NAME.protocol`; the agent refuses connections or flows of
    /// the other protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// An interface the client agent may send from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Network device to bind to (`SO_BINDTODEVICE`, needs CAP_NET_RAW).
    pub device: Option<String>,
    /// Source address to send from.
    pub source: Option<IpAddr>,
    /// Preference, lower first. Default 100.
    #[serde(default = "defaults::priority")]
    pub priority: u32,
}

/// How to reach a gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    /// The gateway's static addresses, tried in order: IP literals or host
    /// names, of which every resolved address is tried. The addresses the
    /// gateway advertises once connected are tried after these.
    pub addresses: Vec<HostPort>,
    /// Connection attempts per address before the next one is tried (seed
    /// 003's retry count). Default 1.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// Pause between two attempts at the same address. Default 500ms.
    #[serde(default = "defaults::retry_delay", deserialize_with = "duration")]
    pub retry_delay: Duration,
}

/// A service offered to local applications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientService {
    /// The gateway (a key of `[gateways]`) that relays this service.
    pub gateway: String,
    /// `"tcp"` (default) or `"udp"`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where applications connect: `ip:port`, or a bare port for loopback.
    /// A LAN address makes this host a connectivity box for its LAN.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// The service's name on the gateway, if different from this table's key.
    pub remote: Option<String>,
    /// `"zstd"` compresses the service's bytes on the way to the gateway
    /// and back; `"none"` (default) sends them as they are.
    #[serde(default, deserialize_with = "compression")]
    pub compress: baton_proto::Compression,
}

/// The transport of a service.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Connections, relayed as byte-exact streams.
    #[default]
    Tcp,
    /// Datagrams, relayed one for one; may be dropped during a switch.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// `[udp]`: how the flows of UDP services are held and expired (both the
/// client agent and the gateway have one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UdpConfig {
    /// Datagrams held per flow while it cannot be sent (switch, no path,
    /// flow not yet accepted); beyond it the oldest are dropped and
    /// counted. Default 256.
    pub hold: usize,
    /// Bytes held per flow, the same way. Default 1MiB.
    #[serde(deserialize_with = "size")]
    pub hold_bytes: usize,
    /// A flow with no datagram either way for this long is removed.
    /// Default 60s.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Most flows per session; datagrams of further flows are dropped
    /// (client agent) or their flows refused (gateway). Default 1024.
    pub max_flows: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            hold: 256,
            hold_bytes: 1 << 20,
            idle_timeout: Duration::from_secs(60),
            max_flows: 1024,
        }
    }
}

impl UdpConfig {
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if !(1..=MAX_UDP_HOLD).contains(&self.hold) {
            return Err(key_error(
                path,
                "udp.hold",
                format!("must be 1 to {MAX_UDP_HOLD} datagrams"),
            ));
        }
        if !(1..=MAX_UDP_FLOWS).contains(&self.max_flows) {
            return Err(key_error(
                path,
                "udp.max_flows",
                format!("must be 1 to {MAX_UDP_FLOWS}"),
            ));
        }
        Ok(())
    }
}

/// Bounds of `[udp]` values: beyond them a typo would hold gigabytes.
const MAX_UDP_HOLD: usize = 65_536;
const MAX_UDP_FLOWS: usize = 1 << 20;

impl ClientService {
    /// The name the gateway knows this service by.
    pub fn remote_name<'a>(&'a self, key: &'a str) -> &'a str {
        self.remote.as_deref().unwrap_or(key)
    }
}

mod defaults {
    use std::time::Duration;
    pub(super) fn yes() -> bool {
        true
    }

    pub(super) fn inactivity() -> Duration {
        Duration::from_secs(300)
    }
    pub(super) fn workers() -> usize {
        1
    }
    pub(super) fn max_sessions() -> usize {
        10_000
    }
    pub(super) fn max_streams() -> usize {
        10_000
    }
    pub(super) fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn keepalive() -> Duration {
        Duration::from_secs(1)
    }
    pub(super) fn dead_after() -> Duration {
        Duration::from_secs(4)
    }
    pub(super) fn switch_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub(super) fn replay_buffer() -> usize {
        8 << 20
    }
    pub(super) fn send_buffers() -> bool {
        true
    }
    pub(super) fn priority() -> u32 {
        100
    }
    pub(super) fn retries() -> u32 {
        1
    }
    pub(super) fn retry_delay() -> Duration {
        Duration::from_millis(500)
    }
    pub(super) fn admin() -> std::path::PathBuf {
        std::path::PathBuf::from(crate::admin::DEFAULT_SOCKET)
    }
}

fn parse<T: de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        let message = inner.lines().next().unwrap_or_default().trim().to_owned();
        // For an unknown field serde names the table; add the field itself.
        let key = match unknown_field(&message) {
            Some(field) if key == "." => field.to_owned(),
            Some(field) if key != field && !key.ends_with(&format!(".{field}")) => {
                format!("{key}.{field}")
            }
            _ => key,
        };
        ConfigError::Key {
            path: path.to_owned(),
            key,
            message,
        }
    })
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn key_error(path: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        path: path.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })
}

fn check_threads(path: &Path, threads: Option<usize>) -> Result<(), ConfigError> {
    match threads {
        Some(n) if !(1..=MAX_THREADS).contains(&n) => Err(key_error(
            path,
            "threads",
            format!("must be 1 to {MAX_THREADS}"),
        )),
        _ => Ok(()),
    }
}

impl GatewayConfig {
    /// Reads and validates a gateway configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(path, &read(path)?)
    }

    /// Parses and validates gateway configuration text; `path` names it in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let c: Self = parse(path, text)?;
        c.validate(path)?;
        Ok(c)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(key_error(path, "listen", "at least one address is needed"));
        }
        if self.max_sessions == 0 {
            return Err(key_error(path, "max_sessions", "must be at least 1"));
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(key_error(
                path,
                "workers",
                format!("must be 1 to {MAX_WORKERS}"),
            ));
        }
        check_threads(path, self.threads)?;
        if self.workers > 1 && self.listen.iter().any(|a| a.port() == 0) {
            return Err(key_error(
                path,
                "listen",
                "port 0 cannot be shared by several workers: give a port",
            ));
        }
        if self.max_streams_per_session == 0 {
            return Err(key_error(
                path,
                "max_streams_per_session",
                "must be at least 1",
            ));
        }
        if let Some(adv) = &self.advertise {
            if adv.len() > baton_proto::wire::MAX_ADDRESSES {
                return Err(key_error(
                    path,
                    "advertise",
                    format!("at most {} addresses", baton_proto::wire::MAX_ADDRESSES),
                ));
            }
            if let Some(a) = adv
                .iter()
                .find(|a| a.ip().is_unspecified() || a.port() == 0)
            {
                return Err(key_error(
                    path,
                    "advertise",
                    format!("{a} cannot be reached: give the address clients dial"),
                ));
            }
        }
        for name in self.services.keys() {
            if !valid_name(name) {
                return Err(key_error(path, format!("services.{name}"), NAME_RULE));
            }
        }
        self.udp.validate(path)?;
        for (id, client) in &self.clients {
            if !valid_name(id) {
                return Err(key_error(path, format!("clients.{id}"), NAME_RULE));
            }
            for (i, s) in client.services.iter().enumerate() {
                if !self.services.contains_key(s) {
                    return Err(key_error(
                        path,
                        format!("clients.{id}.services[{i}]"),
                        format!("no service {s:?} in [services]"),
                    ));
                }
            }
            for (i, s) in client.exposes.iter().enumerate() {
                if !self.exposed.contains_key(s) {
                    return Err(key_error(
                        path,
                        format!("clients.{id}.exposes[{i}]"),
                        format!("no client service {s:?} in [exposed]"),
                    ));
                }
            }
            if !client.exposes.is_empty() && self.virtual_pool.is_empty() {
                return Err(key_error(
                    path,
                    "virtual_pool",
                    format!("needed: clients.{id} exposes client services, and each client agent gets its own address from the pool"),
                ));
            }
        }
        let mut ports = BTreeMap::new();
        for (name, e) in &self.exposed {
            let key = format!("exposed.{name}.port");
            if !valid_name(name) {
                return Err(key_error(path, format!("exposed.{name}"), NAME_RULE));
            }
            if e.port == 0 {
                return Err(key_error(path, key, "ports are 1 to 65535"));
            }
            // A TCP and a UDP client service may share a port: different sockets.
            if let Some(other) = ports.insert((e.protocol, e.port), name) {
                return Err(key_error(
                    path,
                    key,
                    format!(
                        "{} port {} is already used by exposed.{other}",
                        e.protocol, e.port
                    ),
                ));
            }
            // A client agent's address must be free on the service's port.
            let clash = self.listen.iter().find(|l| {
                l.port() == e.port
                    && (l.ip().is_unspecified()
                        || self.virtual_pool.iter().any(|b| b.contains(l.ip())))
            });
            if let Some(l) = clash {
                return Err(key_error(
                    path,
                    key,
                    format!("port {} clashes with listen address {l}", e.port),
                ));
            }
        }
        Ok(())
    }
}

const NAME_RULE: &str = "names are 1 to 64 characters of letters, digits, '.', '_' or '-'";

impl ClientConfig {
    /// Reads and validates a client configuration file. `key_file` is made
    /// absolute relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c = Self::from_toml(path, &read(path)?)?;
        if c.key_file.is_relative() {
            let dir = path.parent().unwrap_or_else(|| Path::new("."));
            c.key_file = dir.join(&c.key_file);
        }
        Ok(c)
    }

    /// Parses and validates client configuration text; `path` names it in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut c: Self = parse(path, text)?;
        c.validate(path)?;
        if let Some(m) = c.mode {
            c.policy.mode = m;
        }
        Ok(c)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if !valid_name(&self.id) {
            return Err(key_error(path, "id", NAME_RULE));
        }
        if self.gateways.is_empty() {
            return Err(key_error(
                path,
                "gateways",
                "at least one gateway is needed",
            ));
        }
        if let Err(e) = self.policy.validate() {
            return Err(key_error(path, "policy", e.to_string()));
        }
        check_threads(path, self.threads)?;
        if self.dead_after <= self.keepalive {
            return Err(key_error(
                path,
                "dead_after",
                "must be longer than `keepalive`",
            ));
        }
        self.udp.validate(path)?;
        for (name, i) in &self.interfaces {
            if !valid_name(name) {
                return Err(key_error(path, format!("interfaces.{name}"), NAME_RULE));
            }
            if i.device
                .as_ref()
                .is_some_and(|d| d.is_empty() || d.len() > 15)
            {
                return Err(key_error(
                    path,
                    format!("interfaces.{name}.device"),
                    "device names are 1 to 15 characters",
                ));
            }
        }
        for (name, g) in &self.gateways {
            if g.addresses.is_empty() {
                return Err(key_error(
                    path,
                    format!("gateways.{name}.addresses"),
                    "at least one address is needed",
                ));
            }
            if !(1..=100).contains(&g.retries) {
                return Err(key_error(
                    path,
                    format!("gateways.{name}.retries"),
                    "must be 1 to 100",
                ));
            }
        }
        let mut listens = BTreeMap::new();
        let mut per_gateway = BTreeMap::new();
        for (name, e) in &self.exposed {
            if !valid_name(name) {
                return Err(key_error(path, format!("exposed.{name}"), NAME_RULE));
            }
            if !self.gateways.contains_key(&e.gateway) {
                return Err(key_error(
                    path,
                    format!("exposed.{name}.gateway"),
                    format!("no gateway {:?} in [gateways]", e.gateway),
                ));
            }
            let n = per_gateway.entry(&e.gateway).or_insert(0usize);
            *n += 1;
            if *n > MAX_EXPOSED {
                return Err(key_error(
                    path,
                    format!("exposed.{name}"),
                    format!("at most {MAX_EXPOSED} client services per gateway"),
                ));
            }
        }
        for (name, s) in &self.services {
            if !valid_name(name) {
                return Err(key_error(path, format!("services.{name}"), NAME_RULE));
            }
            if !valid_name(s.remote_name(name)) {
                return Err(key_error(
                    path,
                    format!("services.{name}.remote"),
                    NAME_RULE,
                ));
            }
            if !self.gateways.contains_key(&s.gateway) {
                return Err(key_error(
                    path,
                    format!("services.{name}.gateway"),
                    format!("no gateway {:?} in [gateways]", s.gateway),
                ));
            }
            // Port 0 asks the OS for a free port: never a clash.
            if s.listen.port() == 0 {
                continue;
            }
            // A TCP and a UDP service may share an address: they are different sockets.
            if let Some(other) = listens.insert((s.protocol, s.listen), name) {
                return Err(key_error(
                    path,
                    format!("services.{name}.listen"),
                    format!("{} is already used by service {other:?}", s.listen),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn gw(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::from_toml(Path::new("gateway.toml"), text)
    }

    /// A minimal client configuration with `top` among its top-level keys.
    fn client(top: &str) -> Result<ClientConfig, ConfigError> {
        ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("id = \"m\"\nkey_file = \"m.key\"\n{top}\n[gateways.gw]\naddresses = [\"gw.example.net:7700\"]\n"),
        )
    }

    fn key_of(e: ConfigError) -> String {
        match e {
            ConfigError::Key { key, .. } => key,
            other => panic!("expected a key error, got {other}"),
        }
    }

    #[test]
    fn full_gateway_config_parses_with_defaults() {
        let c = gw(&format!(
            r#"listen = ["0.0.0.0:7700"]
               [services.postgres]
               target = "db.internal:5432"
               [clients.laptop-7]
               key = "{KEY}"
               services = ["postgres"]"#
        ))
        .unwrap();
        assert_eq!(c.inactivity_timeout, Duration::from_secs(300));
        assert_eq!(c.max_sessions, 10_000);
        assert_eq!(
            c.services["postgres"].target,
            HostPort {
                host: "db.internal".into(),
                port: 5432
            }
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = gw(r#"listen = ["0.0.0.0:7700"]
                      lisen = 3"#)
        .unwrap_err();
        assert_eq!(key_of(e), "lisen");
        let e = gw(r#"listen = ["0.0.0.0"]"#).unwrap_err();
        let msg = e.to_string();
        assert_eq!(key_of(e), "listen", "{msg}");
        let e = gw(r#"listen = ["0.0.0.0:1"]
                      [services.a]
                      target = "no port""#)
        .unwrap_err();
        assert_eq!(key_of(e), "services.a.target");
        let e = gw(r#"listen = ["0.0.0.0:1"]
                      [services.a]
                      target = "h:1"
                      tagret = "x""#)
        .unwrap_err();
        assert_eq!(key_of(e), "services.a.tagret");
        let e = gw(&format!(
            r#"listen = ["0.0.0.0:1"]
               [clients.c]
               key = "{KEY}"
               services = ["nope"]"#
        ))
        .unwrap_err();
        assert_eq!(key_of(e), "clients.c.services[0]");
        let e = gw(r#"listen = ["0.0.0.0:1"]
                      inactivity_timeout = "soon""#)
        .unwrap_err();
        assert_eq!(key_of(e), "inactivity_timeout");
        let e = gw(r#"listen = ["0.0.0.0:1"]
                      [clients.c]
                      key = "short"
                      services = []"#)
        .unwrap_err();
        assert_eq!(key_of(e), "clients.c.key");
    }

    #[test]
    fn workers_are_bounded_and_need_fixed_ports() {
        assert_eq!(gw(r#"listen = ["0.0.0.0:7700"]"#).unwrap().workers, 1);
        let c = gw(r#"listen = ["0.0.0.0:7700"]
                      workers = 12"#)
        .unwrap();
        assert_eq!(c.workers, 12);
        for bad in ["0", "65"] {
            let e = gw(&format!("listen = [\"0.0.0.0:7700\"]\nworkers = {bad}")).unwrap_err();
            assert!(e.to_string().contains("must be 1 to 64"), "{e}");
            assert_eq!(key_of(e), "workers");
        }
        let e = gw(r#"listen = ["127.0.0.1:0"]
                      workers = 2"#)
        .unwrap_err();
        assert!(e.to_string().contains("port 0"), "{e}");
        assert_eq!(key_of(e), "listen");
    }

    #[test]
    fn client_config_checks_references_and_listen_forms() {
        let base = r#"id = "laptop-7"
                      key_file = "laptop-7.key"
                      [gateways.office]
                      addresses = ["gw.example.net:7700", "[::1]:7700"]
                   "#;
        let c = ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("{base}[services.pg]\ngateway = \"office\"\nlisten = 5432\n"),
        )
        .unwrap();
        assert_eq!(c.services["pg"].listen, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(c.gateways["office"].addresses[1].to_string(), "[::1]:7700");
        let e = ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("{base}[services.pg]\ngateway = \"home\"\nlisten = 5432\n"),
        )
        .unwrap_err();
        assert_eq!(key_of(e), "services.pg.gateway");
        let e = ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("{base}[services.pg]\ngateway = \"office\"\nlisten = \"localhost\"\n"),
        )
        .unwrap_err();
        assert_eq!(key_of(e), "services.pg.listen");
    }

    #[test]
    fn runtime_threads_default_and_are_bounded() {
        assert_eq!(client("").unwrap().threads, None);
        assert_eq!(client("threads = 4").unwrap().threads, Some(4));
        assert_eq!(gw(r#"listen = ["0.0.0.0:7700"]"#).unwrap().threads, None);
        assert_eq!(
            gw("listen = [\"0.0.0.0:7700\"]\nthreads = 2")
                .unwrap()
                .threads,
            Some(2)
        );
        for bad in ["0", "257"] {
            let e = client(&format!("threads = {bad}")).unwrap_err();
            assert!(e.to_string().contains("must be 1 to 256"), "{e}");
            assert_eq!(key_of(e), "threads");
            let e = gw(&format!("listen = [\"0.0.0.0:7700\"]\nthreads = {bad}")).unwrap_err();
            assert!(e.to_string().contains("must be 1 to 256"), "{e}");
            assert_eq!(key_of(e), "threads");
        }
    }

    #[test]
    fn send_buffers_default_to_path_and_name_bad_values() {
        let gateway = |top: &str| gw(&format!("listen = [\"0.0.0.0:7700\"]\n{top}"));
        assert!(client("").unwrap().send_buffers);
        assert!(gateway("").unwrap().send_buffers);
        assert!(client("send_buffers = \"path\"").unwrap().send_buffers);
        assert!(!client("send_buffers = \"kernel\"").unwrap().send_buffers);
        assert!(!gateway("send_buffers = \"kernel\"").unwrap().send_buffers);
        let e = client("send_buffers = \"small\"").unwrap_err();
        assert!(
            e.to_string().contains("expected \"path\" or \"kernel\""),
            "{e}"
        );
        assert_eq!(key_of(e), "send_buffers");
        let e = gateway("send_buffers = true").unwrap_err();
        assert_eq!(key_of(e), "send_buffers");
    }

    #[test]
    fn multihome_keys_parse_and_are_checked() {
        let base = "id = \"m\"\nkey_file = \"m.key\"\n[gateways.gw]\naddresses = [\"gw.example.net:7700\"]\n";
        let c = ClientConfig::from_toml(Path::new("c.toml"), base).unwrap();
        assert_eq!(
            (c.gateways["gw"].retries, c.gateways["gw"].retry_delay),
            (1, Duration::from_millis(500))
        );
        let c = ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("{base}retries = 3\nretry_delay = \"200ms\"\n"),
        )
        .unwrap();
        assert_eq!(
            (c.gateways["gw"].retries, c.gateways["gw"].retry_delay),
            (3, Duration::from_millis(200))
        );
        let e = ClientConfig::from_toml(Path::new("c.toml"), &format!("{base}retries = 0\n"))
            .unwrap_err();
        assert_eq!(key_of(e), "gateways.gw.retries");
        let g = gw(r#"listen = ["0.0.0.0:7700"]
                      advertise = ["192.0.2.1:7700", "[2001:db8::1]:7700"]
                      admin = "/run/baton-gw.sock""#)
        .unwrap();
        assert_eq!(g.advertise.unwrap().len(), 2);
        let g = gw(r#"listen = ["0.0.0.0:7700"]"#).unwrap();
        assert!(
            g.advertise.is_none() && g.watch_addresses,
            "the host's addresses are followed by default"
        );
        assert!(
            !gw("listen = [\"0.0.0.0:7700\"]\nwatch_addresses = false")
                .unwrap()
                .watch_addresses
        );
        let e = gw("listen = [\"0.0.0.0:7700\"]\nwatch_addresses = \"yes\"").unwrap_err();
        assert_eq!(key_of(e), "watch_addresses");
        let e = gw(r#"listen = ["0.0.0.0:7700"]
                      advertise = ["0.0.0.0:7700"]"#)
        .unwrap_err();
        assert_eq!(key_of(e), "advertise");
    }

    #[test]
    fn client_services_are_checked_with_the_key_named() {
        let base = format!(
            r#"listen = ["127.0.0.1:7700"]
               [exposed.push]
               port = 7000
               [clients.a]
               key = "{KEY}"
            "#
        );
        let c = gw(&format!(
            "virtual_pool = \"127.0.10.0/24\"\n{base}exposes = [\"push\"]\n"
        ))
        .unwrap();
        assert_eq!(c.virtual_pool[0].usable(), 254);
        assert!(
            c.clients["a"].services.is_empty(),
            "services may be left out"
        );
        // A list of blocks, and single addresses.
        let c = gw(&format!(
            "virtual_pool = [\"10.1.0.8/30\", \"10.2.0.9\"]\n{base}exposes = [\"push\"]\n"
        ))
        .unwrap();
        assert_eq!(c.virtual_pool.len(), 2);
        assert_eq!(
            key_of(gw(&format!("{base}exposes = [\"push\"]\n")).unwrap_err()),
            "virtual_pool"
        );
        let e = gw(&format!(
            "virtual_pool = \"127.0.10.0/24\"\n{base}exposes = [\"pull\"]\n"
        ))
        .unwrap_err();
        assert_eq!(key_of(e), "clients.a.exposes[0]");
        let e = gw(&format!("virtual_pool = \"127.0.10.0/33\"\n{base}")).unwrap_err();
        assert_eq!(key_of(e), "virtual_pool");
        let e = gw(&format!("virtual_pool = \"127.0.10.1/24\"\n{base}")).unwrap_err();
        assert!(e.to_string().contains("host bits"), "{e}");
        let e = gw(&format!("{base}[exposed.pull]\nport = 7000\n")).unwrap_err();
        // Two client services on one port would clash on every agent's address.
        assert!(
            e.to_string().contains("already used by exposed.pull"),
            "{e}"
        );
        assert_eq!(key_of(e), "exposed.push.port");
        let e = gw(r#"listen = ["0.0.0.0:7000"]
                      [exposed.push]
                      port = 7000"#)
        .unwrap_err();
        assert_eq!(key_of(e), "exposed.push.port");
        let e = gw(r#"listen = ["127.0.0.1:7700"]
                      [exposed.push]
                      prot = 7000"#)
        .unwrap_err();
        assert_eq!(key_of(e), "exposed.push.prot");
        // A TCP and a UDP client service may share a port; two UDP ones may not.
        let c = gw(&format!(
            "{base}[exposed.push-udp]\nport = 7000\nprotocol = \"udp\"\n"
        ))
        .unwrap();
        assert_eq!(
            (c.exposed["push"].protocol, c.exposed["push-udp"].protocol),
            (Protocol::Tcp, Protocol::Udp)
        );
        let two_udp = "[exposed.a-udp]\nport = 7000\nprotocol = \"udp\"\n[exposed.b-udp]\nport = 7000\nprotocol = \"udp\"\n";
        let e = gw(&format!("{base}{two_udp}")).unwrap_err();
        assert!(
            e.to_string()
                .contains("udp port 7000 is already used by exposed.a-udp"),
            "{e}"
        );
        assert_eq!(key_of(e), "exposed.b-udp.port");
        let e = gw(&format!(
            "{base}[exposed.push-udp]\nport = 7001\nprotocol = \"sctp\"\n"
        ))
        .unwrap_err();
        assert_eq!(key_of(e), "exposed.push-udp.protocol");
        // The gateway's listen port is taken for UDP too (path probes, datagrams).
        let e = gw(r#"listen = ["0.0.0.0:7000"]
                      [exposed.push]
                      port = 7000
                      protocol = "udp""#)
        .unwrap_err();
        assert_eq!(key_of(e), "exposed.push.port");

        let client = |extra: &str| {
            ClientConfig::from_toml(
                Path::new("c.toml"),
                &format!("id = \"a\"\nkey_file = \"k\"\n[gateways.gw]\naddresses = [\"127.0.0.1:7700\"]\n{extra}"),
            )
        };
        let c = client("[exposed.push]\ngateway = \"gw\"\ntarget = \"127.0.0.1:8080\"\n").unwrap();
        assert_eq!(c.exposed["push"].target.port, 8080);
        let e = client("[exposed.push]\ngateway = \"other\"\ntarget = \"127.0.0.1:8080\"\n")
            .unwrap_err();
        assert_eq!(key_of(e), "exposed.push.gateway");
        let e = client("[exposed.push]\ngateway = \"gw\"\ntarget = \"8080\"\n").unwrap_err();
        assert_eq!(key_of(e), "exposed.push.target");
        assert_eq!(c.exposed["push"].protocol, Protocol::Tcp);
        let c = client(
            "[exposed.push]\ngateway = \"gw\"\ntarget = \"127.0.0.1:8080\"\nprotocol = \"udp\"\n",
        )
        .unwrap();
        assert_eq!(c.exposed["push"].protocol, Protocol::Udp);
        let e = client(
            "[exposed.push]\ngateway = \"gw\"\ntarget = \"127.0.0.1:8080\"\nprotocol = \"quic\"\n",
        )
        .unwrap_err();
        assert_eq!(key_of(e), "exposed.push.protocol");
    }

    #[test]
    fn address_blocks_leave_out_what_hosts_cannot_use() {
        let b: AddrBlock = "192.168.102.0/24".parse().unwrap();
        assert_eq!(
            (b.usable(), b.nth(0), b.nth(253), b.nth(254)),
            (
                254,
                Some("192.168.102.1".parse().unwrap()),
                Some("192.168.102.254".parse().unwrap()),
                None
            )
        );
        assert!(
            b.contains("192.168.102.77".parse().unwrap())
                && !b.contains("192.168.103.1".parse().unwrap())
        );
        let one: AddrBlock = "10.0.0.5".parse().unwrap();
        assert_eq!(
            (one.usable(), one.nth(0)),
            (1, Some("10.0.0.5".parse().unwrap()))
        );
        let pair: AddrBlock = "10.0.0.6/31".parse().unwrap();
        assert_eq!(pair.usable(), 2);
        let v6: AddrBlock = "fd00::/64".parse().unwrap();
        assert_eq!(
            (v6.usable(), v6.nth(0)),
            (AddrBlock::MAX_USED, Some("fd00::1".parse().unwrap()))
        );
        let all: AddrBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("fd00::1/64".parse::<AddrBlock>().is_err());
        assert!("10.0.0.0/33".parse::<AddrBlock>().is_err());
    }

    #[test]
    fn udp_services_and_settings() {
        let g = gw(r#"listen = ["0.0.0.0:1"]
                      [udp]
                      hold = 16
                      idle_timeout = "2s"
                      [services.dns]
                      target = "10.0.0.53:53"
                      protocol = "udp"
                      [services.pg]
                      target = "db:5432""#)
        .unwrap();
        assert_eq!(g.services["dns"].protocol, Protocol::Udp);
        assert_eq!(g.services["pg"].protocol, Protocol::Tcp);
        assert_eq!(
            (
                g.udp.hold,
                g.udp.idle_timeout,
                g.udp.hold_bytes,
                g.udp.max_flows
            ),
            (16, Duration::from_secs(2), 1 << 20, 1024)
        );
        for (text, key) in [
            (
                "[services.a]\ntarget = \"h:1\"\nprotocol = \"sctp\"",
                "services.a.protocol",
            ),
            ("[udp]\nhold = 0", "udp.hold"),
            ("[udp]\nmax_flows = 0", "udp.max_flows"),
            ("[udp]\nidle_timeout = \"0s\"", "udp.idle_timeout"),
            ("[udp]\nhold_bytes = \"lots\"", "udp.hold_bytes"),
            ("[udp]\nhodl = 3", "udp.hodl"),
        ] {
            let e = gw(&format!("listen = [\"0.0.0.0:1\"]\n{text}")).unwrap_err();
            let msg = e.to_string();
            assert_eq!(key_of(e), key, "{msg}");
        }
        let base = "id = \"c\"\nkey_file = \"k\"\n[gateways.g]\naddresses = [\"h:1\"]\n";
        let svc = |name: &str, proto: &str| {
            format!("[services.{name}]\ngateway = \"g\"\nlisten = 5353\nprotocol = \"{proto}\"\n")
        };
        // TCP and UDP on one port are two sockets; two UDP services are a clash.
        let c = ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("{base}{}{}", svc("a", "tcp"), svc("b", "udp")),
        )
        .unwrap();
        assert_eq!(c.services["b"].protocol, Protocol::Udp);
        let e = ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("{base}{}{}", svc("a", "udp"), svc("b", "udp")),
        )
        .unwrap_err();
        assert_eq!(key_of(e), "services.b.listen");
        let e = ClientConfig::from_toml(
            Path::new("c.toml"),
            &format!("{base}[udp]\nhold = 100000\n"),
        )
        .unwrap_err();
        assert_eq!(key_of(e), "udp.hold");
    }

    #[test]
    fn host_port_forms() {
        assert!("db:0".parse::<HostPort>().is_err());
        assert!(":80".parse::<HostPort>().is_err());
        assert!("bad host:80".parse::<HostPort>().is_err());
        assert_eq!("10.0.0.1:80".parse::<HostPort>().unwrap().host, "10.0.0.1");
    }
}
