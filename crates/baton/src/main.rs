//! `baton`: the client agent, the gateway and their tools in one binary.

#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use baton_proto::ClientKey;
use baton_runtime::{Client, ClientConfig, Gateway, GatewayConfig};
use clap::{Parser, Subcommand};
use ring::rand::SystemRandom;
use tokio_util::sync::CancellationToken;

mod demo;
mod status;
mod workers;

/// Exit code for a configuration that cannot be used (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;

/// baton keeps applications' TCP sessions alive while a device changes networks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a gateway: accept sessions from client agents and relay their streams.
    Gateway {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Validate the configuration and exit (64 if it is bad).
        #[arg(long)]
        check: bool,
    },
    /// Run a client agent: serve local applications through a gateway.
    Client {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Validate the configuration (and the key file) and exit (64 if bad).
        #[arg(long)]
        check: bool,
    },
    /// Make a client agent's credentials: a secret key file, and the public
    /// key for the gateway's configuration.
    Keygen {
        /// The client agent's id (as in its `id` and the gateway's `[clients.ID]`).
        id: String,
        /// Where to write the secret key (default: ID.key). Never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show the client agent's interfaces, sessions, streams and switches.
    Status {
        /// The agent's admin socket.
        #[arg(long, default_value = baton_runtime::admin::DEFAULT_SOCKET)]
        admin: PathBuf,
        /// Print the status as JSON (fields documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// Planned switch of every session to an interface (make before break).
    Switch {
        /// Interface name, as shown by `baton status`.
        interface: String,
        /// The agent's admin socket.
        #[arg(long, default_value = baton_runtime::admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Set the decision mode of the client agent: auto, manual or user.
    Mode {
        /// `auto` (switch by the policy), `manual` (propose, wait for
        /// approve/decline; critical conditions still switch) or `user`
        /// (only warn).
        mode: String,
        /// The agent's admin socket.
        #[arg(long, default_value = baton_runtime::admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Approve the switch the agent proposed (manual mode).
    Approve {
        /// The agent's admin socket.
        #[arg(long, default_value = baton_runtime::admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Decline the switch the agent proposed (manual mode).
    Decline {
        /// The agent's admin socket.
        #[arg(long, default_value = baton_runtime::admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Follow the agent's events (proposals, decisions, switches) as JSON lines.
    Events {
        /// The agent's admin socket.
        #[arg(long, default_value = baton_runtime::admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Planned move of the client agent's session to another address of its
    /// gateway (make before break).
    Roam {
        /// The gateway's `ip:port` to move to; without it, the next address.
        to: Option<String>,
        /// The gateway (required with an address when there are several).
        #[arg(long)]
        gateway: Option<String>,
        /// The agent's admin socket.
        #[arg(long, default_value = baton_runtime::admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Show a gateway's addresses (served, advertised) and sessions.
    GatewayStatus {
        /// The gateway's admin socket.
        #[arg(long, default_value = baton_runtime::gateway_admin::DEFAULT_SOCKET)]
        admin: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Direct a client agent to another address of the gateway ("go to").
    Goto {
        /// The client agent's id.
        client: String,
        /// The gateway's `ip:port` to go to; without it, the agent chooses.
        to: Option<String>,
        /// Seconds to wait for the session to arrive.
        #[arg(long, default_value_t = 10)]
        wait: u64,
        /// The gateway's admin socket.
        #[arg(long, default_value = baton_runtime::gateway_admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Serve one more address on a running gateway (`add`), or give one up
    /// after directing its sessions elsewhere (`remove`); the gateway
    /// advertises the new set to its client agents.
    Listen {
        /// `add` or `remove`.
        #[arg(value_parser = ["add", "remove"])]
        action: String,
        /// `ip:port`.
        addr: String,
        /// Seconds `remove` waits for the sessions to move.
        #[arg(long, default_value_t = 10)]
        wait: u64,
        /// The gateway's admin socket.
        #[arg(long, default_value = baton_runtime::gateway_admin::DEFAULT_SOCKET)]
        admin: PathBuf,
    },
    /// Show baton at work on loopback: no root, no configuration.
    Demo {
        /// Concurrent streams.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// MiB sent each way on each stream.
        #[arg(long, default_value_t = 24)]
        mib: u64,
        /// Pace of each stream and direction, in MiB/s (so the streams live
        /// through the switches).
        #[arg(long, default_value_t = 8)]
        pace: u64,
    },
}

/// Lets the daemon use every descriptor the system allows it (see
/// `baton_os::raise_open_files_limit`); says what it has.
fn open_files_limit() {
    match baton_os::raise_open_files_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Demo { .. }));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(demo: bool) {
    let default = if demo { "error" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: log files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A gateway's workers share its log: each line says whose it is.
    match std::env::var(workers::WORKER_ENV)
        .ok()
        .and_then(|w| baton_runtime::gateway::WorkerSpec::parse(&w))
    {
        Some(spec) => builder
            .event_format(Prefixed {
                prefix: format!("worker {}: ", spec.index),
                inner: tracing_subscriber::fmt::format().with_ansi(ansi),
            })
            .init(),
        None => builder.init(),
    }
}

/// A log line format with a fixed prefix.
struct Prefixed<F> {
    prefix: String,
    inner: F,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Prefixed<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        writer.write_str(&self.prefix)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// The async runtime, with `threads` worker threads (`None`: tokio's
/// default, one per core or `TOKIO_WORKER_THREADS`).
pub(crate) fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    b.enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Gateway { config, check } => {
            let cfg = match GatewayConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return Ok(config_error(e)),
            };
            if check {
                println!(
                    "{}: ok ({} services, {} clients{})",
                    config.display(),
                    cfg.services.len(),
                    cfg.clients.len(),
                    if cfg.workers > 1 {
                        format!(", {} workers", cfg.workers)
                    } else {
                        String::new()
                    }
                );
                return Ok(ExitCode::SUCCESS);
            }
            open_files_limit();
            if let Ok(spec) = std::env::var(workers::WORKER_ENV) {
                return workers::work(&spec, cfg);
            }
            if cfg.workers > 1 {
                return workers::supervise(&config, &cfg);
            }
            runtime(cfg.threads)?.block_on(async {
                let shutdown = CancellationToken::new();
                let admin = cfg.admin.clone();
                let gw = Gateway::start(cfg, shutdown.clone()).await?;
                let path = admin.clone().unwrap_or_else(|| PathBuf::from(baton_runtime::gateway_admin::DEFAULT_SOCKET));
                let admin_task = tokio::spawn(baton_runtime::gateway_admin::serve(gw.clone(), path, shutdown.clone()));
                tokio::select! {
                    _ = wait_for_signal() => {}
                    r = admin_task => match r {
                        // A configured socket must work; the default one may be
                        // another gateway's on the same host.
                        Ok(Err(e)) if admin.is_some() => {
                            shutdown.cancel();
                            return Err(e.into());
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("{e}; running without an admin socket (set `admin` in the configuration)");
                            wait_for_signal().await;
                        }
                        _ => wait_for_signal().await,
                    },
                }
                shutdown.cancel();
                gw.wait().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Client { config, check } => {
            let cfg = match ClientConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return Ok(config_error(e)),
            };
            let key = match load_key(&cfg.key_file) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("baton: {}: key `key_file`: {e:#}", config.display());
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            if check {
                println!(
                    "{}: ok ({} gateways, {} services)",
                    config.display(),
                    cfg.gateways.len(),
                    cfg.services.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            open_files_limit();
            runtime(cfg.threads)?.block_on(async {
                let shutdown = CancellationToken::new();
                let admin = cfg.admin.clone();
                let client = Client::start(cfg, key, shutdown.clone()).await?;
                let admin_task = tokio::spawn(baton_runtime::admin::serve(
                    client.clone(),
                    admin,
                    shutdown.clone(),
                ));
                tokio::select! {
                    _ = wait_for_signal() => {}
                    r = admin_task => {
                        if let Ok(Err(e)) = r {
                            shutdown.cancel();
                            return Err(e.into());
                        }
                    }
                }
                shutdown.cancel();
                client.wait().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Keygen { id, out } => keygen(&id, out),
        Command::Status { admin, json } => {
            let reply = runtime(Some(1))?.block_on(baton_runtime::admin::request(
                &admin,
                &baton_runtime::admin::Request::Status,
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", status::render(&reply));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mode { mode, admin } => {
            admin_simple(&admin, baton_runtime::admin::Request::Mode { mode })
        }
        Command::Approve { admin } => admin_simple(&admin, baton_runtime::admin::Request::Approve),
        Command::Decline { admin } => admin_simple(&admin, baton_runtime::admin::Request::Decline),
        Command::Events { admin } => {
            runtime(Some(1))?.block_on(baton_runtime::admin::follow_events(&admin, |v| {
                println!("{v}")
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Switch { interface, admin } => {
            let req = baton_runtime::admin::Request::Switch {
                to: interface.clone(),
            };
            let reply = runtime(Some(1))?.block_on(baton_runtime::admin::request(&admin, &req))?;
            if reply["ok"] != true {
                anyhow::bail!(
                    "switch to {interface} failed: {}",
                    reply["error"].as_str().unwrap_or("unknown error")
                );
            }
            for sw in reply["switches"].as_array().into_iter().flatten() {
                println!(
                    "{}: {} → {} in {} ms ({} streams, longest stall {} ms, {} bytes resent)",
                    sw["gateway"].as_str().unwrap_or("?"),
                    sw["from"].as_str().unwrap_or("?"),
                    sw["to"].as_str().unwrap_or("?"),
                    sw["duration_ms"],
                    sw["streams"],
                    sw["longest_stall_ms"],
                    sw["bytes_resent"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Roam { to, gateway, admin } => {
            let req = baton_runtime::admin::Request::Roam { gateway, to };
            let reply = runtime(Some(1))?.block_on(baton_runtime::admin::request(&admin, &req))?;
            if reply["ok"] != true {
                anyhow::bail!(
                    "roam failed: {}",
                    reply["error"].as_str().unwrap_or("unknown error")
                );
            }
            for sw in reply["switches"].as_array().into_iter().flatten() {
                println!(
                    "{}: {} → {} via {} in {} ms ({} streams, longest stall {} ms)",
                    sw["gateway"].as_str().unwrap_or("?"),
                    sw["gateway_addr_from"].as_str().unwrap_or("?"),
                    sw["gateway_addr_to"].as_str().unwrap_or("?"),
                    sw["to"].as_str().unwrap_or("?"),
                    sw["duration_ms"],
                    sw["streams"],
                    sw["longest_stall_ms"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GatewayStatus { admin, json } => {
            let req = baton_runtime::gateway_admin::Request::Status;
            let reply =
                runtime(Some(1))?.block_on(baton_runtime::gateway_admin::request(&admin, &req))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", status::render_gateway(&reply));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Goto {
            client,
            to,
            wait,
            admin,
        } => {
            let req = baton_runtime::gateway_admin::Request::Goto {
                client,
                to,
                wait_ms: Some(wait * 1000),
            };
            gateway_moves(&admin, &req)
        }
        Command::Listen {
            action,
            addr,
            wait,
            admin,
        } => {
            let req = if action == "add" {
                baton_runtime::gateway_admin::Request::ListenAdd { addr }
            } else {
                baton_runtime::gateway_admin::Request::ListenRemove {
                    addr,
                    wait_ms: Some(wait * 1000),
                }
            };
            gateway_moves(&admin, &req)
        }
        Command::Demo { streams, mib, pace } => {
            anyhow::ensure!(streams > 0, "--streams must be at least 1");
            anyhow::ensure!(pace > 0, "--pace must be at least 1");
            runtime(None)?.block_on(demo::run(demo::Options {
                streams,
                mib,
                pace_mib: pace,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn admin_simple(admin: &Path, req: baton_runtime::admin::Request) -> anyhow::Result<ExitCode> {
    let reply = runtime(Some(1))?.block_on(baton_runtime::admin::request(admin, &req))?;
    if reply["ok"] != true {
        anyhow::bail!("{}", reply["error"].as_str().unwrap_or("unknown error"));
    }
    println!("{}", reply["message"].as_str().unwrap_or("ok"));
    Ok(ExitCode::SUCCESS)
}

/// Sends a go-to or listen request to the gateway and prints where each
/// session went; fails if one did not move.
fn gateway_moves(
    admin: &Path,
    req: &baton_runtime::gateway_admin::Request,
) -> anyhow::Result<ExitCode> {
    let reply = runtime(Some(1))?.block_on(baton_runtime::gateway_admin::request(admin, req))?;
    if reply["ok"] != true {
        anyhow::bail!("{}", reply["error"].as_str().unwrap_or("unknown error"));
    }
    if let Some(a) = reply["addr"].as_str() {
        println!("listening on {a}");
    }
    if let Some(adv) = reply["advertised"].as_array() {
        let list: Vec<String> = adv
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        println!("advertised: {}", list.join(" "));
    }
    let mut stuck = 0;
    for m in reply["moves"].as_array().into_iter().flatten() {
        let (client, session) = (
            m["client"].as_str().unwrap_or("?"),
            m["session_id"].as_str().unwrap_or("?"),
        );
        let (from, to) = (
            m["from"].as_str().unwrap_or("-"),
            m["to"].as_str().unwrap_or("-"),
        );
        if m["moved"] == true {
            println!(
                "{client} (session {session}): {from} → {to} in {} ms",
                m["ms"]
            );
        } else {
            stuck += 1;
            println!(
                "{client} (session {session}): still on {to} after {} ms",
                m["ms"]
            );
        }
    }
    anyhow::ensure!(stuck == 0, "{stuck} session(s) did not move");
    Ok(ExitCode::SUCCESS)
}

fn config_error(e: baton_runtime::ConfigError) -> ExitCode {
    eprintln!("baton: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn load_key(path: &Path) -> anyhow::Result<ClientKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    ClientKey::from_text(&text)
        .with_context(|| format!("{} is not a baton key file", path.display()))
}

fn keygen(id: &str, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        baton_proto::wire::valid_name(id),
        "invalid id {id:?}: ids are 1 to 64 characters of letters, digits, '.', '_' or '-'"
    );
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{id}.key")));
    let key = ClientKey::generate(&SystemRandom::new())?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path).with_context(|| {
        format!(
            "cannot create {} (an existing key is never overwritten)",
            path.display()
        )
    })?;
    writeln!(f, "{}", key.to_text())?;
    println!(
        "wrote the secret key of client {id:?} to {} (keep it on the client: key_file = {:?})",
        path.display(),
        path.display().to_string()
    );
    println!("add this to the gateway's configuration:");
    println!("[clients.{id}]");
    println!("services = []   # the services this client may open");
    println!("key = \"{}\"", key.public());
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
}
