//! `baton gateway` with `workers = N`: this process becomes the supervisor
//! of N worker processes (itself again, told which worker it is by
//! [`WORKER_ENV`]). The workers share the gateway's ports and pass each
//! other what the kernel gave the wrong one (see the runtime's
//! `gateway::workers`); the supervisor holds no session. It serves the
//! admin socket by asking the workers', stops them on SIGTERM or Ctrl-C, and
//! starts a worker that dies again (its sessions are lost: their agents open
//! new ones), unless workers die so often that restarting does not help;
//! then it stops the whole gateway, for its service manager to see.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use baton_runtime::gateway::WorkerSpec;
use baton_runtime::{Gateway, GatewayConfig};
use tokio_util::sync::CancellationToken;

/// Set in a worker's environment: `INDEX/COUNT/GROUP`.
pub(crate) const WORKER_ENV: &str = "BATON_GATEWAY_WORKER";

/// How long workers get to close their sessions after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

fn admin_base(cfg: &GatewayConfig) -> PathBuf {
    cfg.admin
        .clone()
        .unwrap_or_else(|| PathBuf::from(baton_runtime::gateway_admin::DEFAULT_SOCKET))
}

/// A worker that dies is started again after this pause...
const RESTART_PAUSE: Duration = Duration::from_secs(1);
/// ...unless the workers died this often within [`RESTART_WINDOW`]: then
/// something is wrong that a restart does not mend, and the gateway stops.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

struct Launcher<'a> {
    exe: PathBuf,
    config: &'a Path,
    count: usize,
    group: String,
}

impl Launcher<'_> {
    fn spawn(&self, index: usize) -> anyhow::Result<tokio::process::Child> {
        let spec = WorkerSpec {
            index,
            count: self.count,
            group: self.group.clone(),
        };
        tokio::process::Command::new(&self.exe)
            .arg("gateway")
            .arg("-c")
            .arg(self.config)
            .env(WORKER_ENV, spec.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start gateway worker {index}"))
    }
}

enum Event {
    Signal,
    Exited(usize, String),
    AdminEnded(String),
}

/// Runs the supervisor until a signal, or until workers die too often.
pub(crate) fn supervise(config: &Path, cfg: &GatewayConfig) -> anyhow::Result<ExitCode> {
    let launcher = Launcher {
        exe: std::env::current_exe().context("cannot find this program to start workers")?,
        config,
        count: cfg.workers,
        group: std::process::id().to_string(),
    };
    crate::runtime(Some(1))?.block_on(async {
        let mut children = Vec::with_capacity(cfg.workers);
        for index in 0..cfg.workers {
            children.push(launcher.spawn(index)?);
        }
        let workers = std::sync::Arc::new(baton_runtime::gateway_admin::WorkerProcesses::default());
        workers.set_pids(children.iter().map(|c| c.id().unwrap_or(0)).collect());
        tracing::info!(workers = cfg.workers, "gateway supervisor started its workers");
        let shutdown = CancellationToken::new();
        let mut admin = tokio::spawn(baton_runtime::gateway_admin::serve_workers(
            admin_base(cfg),
            workers.clone(),
            shutdown.clone(),
        ));
        let mut admin_alive = true;
        let mut deaths: std::collections::VecDeque<tokio::time::Instant> = Default::default();
        let failed = loop {
            let event = {
                let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
                tokio::select! {
                    _ = crate::wait_for_signal() => Event::Signal,
                    (status, index, _) = futures_util::future::select_all(waits) => {
                        Event::Exited(index, describe(status))
                    }
                    r = &mut admin, if admin_alive => Event::AdminEnded(match r {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(())) => "admin API stopped".into(),
                        Err(e) => e.to_string(),
                    }),
                }
            };
            match event {
                Event::Signal => break false,
                Event::Exited(index, how) => {
                    let now = tokio::time::Instant::now();
                    deaths.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                    deaths.push_back(now);
                    if deaths.len() > MAX_RESTARTS {
                        tracing::error!(
                            "gateway worker {index} exited ({how}), the {}th worker death within {} s: stopping the gateway",
                            deaths.len(),
                            RESTART_WINDOW.as_secs()
                        );
                        break true;
                    }
                    // Its sessions are gone: their agents open new ones.
                    tracing::error!("gateway worker {index} exited ({how}): its sessions are lost; starting it again");
                    tokio::select! {
                        _ = tokio::time::sleep(RESTART_PAUSE) => {}
                        _ = crate::wait_for_signal() => break false,
                    }
                    match launcher.spawn(index) {
                        Ok(c) => {
                            workers.restarted(index, c.id().unwrap_or(0));
                            children[index] = c;
                        }
                        Err(e) => {
                            tracing::error!("{e:#}: stopping the gateway");
                            break true;
                        }
                    }
                }
                Event::AdminEnded(e) => {
                    // A configured socket must work; the default one may be
                    // another gateway's on the same host.
                    if cfg.admin.is_some() {
                        tracing::error!("{e}: stopping the gateway");
                        break true;
                    }
                    tracing::warn!("{e}; running without an admin socket (set `admin` in the configuration)");
                    admin_alive = false;
                }
            }
        };
        shutdown.cancel();
        for c in &children {
            if let Some(pid) = c.id() {
                let _ = baton_os::terminate(pid);
            }
        }
        for (index, c) in children.iter_mut().enumerate() {
            match tokio::time::timeout(STOP_GRACE, c.wait()).await {
                Ok(Ok(s)) if s.success() => {}
                Ok(Ok(s)) if !failed => {
                    tracing::warn!("gateway worker {index} ended with {s}");
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!("gateway worker {index} did not stop in time: killed");
                    let _ = c.kill().await;
                }
            }
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// Runs worker `spec` of a gateway whose supervisor started this process.
pub(crate) fn work(spec: &str, cfg: GatewayConfig) -> anyhow::Result<ExitCode> {
    let spec = WorkerSpec::parse(spec)
        .with_context(|| format!("{WORKER_ENV}={spec:?}: expected INDEX/COUNT/GROUP"))?;
    let supervisor: u32 = spec
        .group
        .parse()
        .with_context(|| format!("{WORKER_ENV}: the group is the supervisor's pid"))?;
    baton_os::die_with_parent(supervisor).context("worker")?;
    let admin = baton_runtime::gateway_admin::worker_socket(&admin_base(&cfg), spec.index);
    crate::runtime(cfg.threads)?.block_on(async {
        let shutdown = CancellationToken::new();
        let gw = Gateway::start_worker(cfg, shutdown.clone(), Some(spec.clone())).await?;
        tracing::info!(worker = spec.index, of = spec.count, "gateway worker up");
        let mut admin_task = tokio::spawn(baton_runtime::gateway_admin::serve(
            gw.clone(),
            admin,
            shutdown.clone(),
        ));
        let code = tokio::select! {
            _ = crate::wait_for_signal() => ExitCode::SUCCESS,
            // The supervisor answers the admin API through this socket.
            r = &mut admin_task => {
                match r {
                    Ok(Err(e)) => tracing::error!("worker {}: {e}", spec.index),
                    _ => tracing::error!("worker {}: admin API stopped", spec.index),
                }
                ExitCode::FAILURE
            }
        };
        shutdown.cancel();
        gw.wait().await;
        Ok(code)
    })
}
