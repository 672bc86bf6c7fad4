//! `baton gateway` with `workers = N`: this process becomes the supervisor
//! of N worker processes (itself again, told which worker it is by
//! [`WORKER_ENV`]). The workers share the gateway's ports and pass each
//! other what the kernel gave the wrong one (see the runtime's
//! `gateway::workers`); the supervisor holds no session. It serves the
//! admin socket by asking the workers', stops them on SIGTERM or Ctrl-C, and
//! stops the whole gateway if one of them dies: the sessions of that worker
//! are gone, and a gateway silently missing a share of its clients would be
//! worse than one that exits and is restarted by its service manager.

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

/// Runs the supervisor until a signal or a worker's death.
pub(crate) fn supervise(config: &Path, cfg: &GatewayConfig) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this program to start workers")?;
    let group = std::process::id().to_string();
    crate::runtime()?.block_on(async {
        let mut children = Vec::with_capacity(cfg.workers);
        for index in 0..cfg.workers {
            let spec = WorkerSpec {
                index,
                count: cfg.workers,
                group: group.clone(),
            };
            let child = tokio::process::Command::new(&exe)
                .arg("gateway")
                .arg("-c")
                .arg(config)
                .env(WORKER_ENV, spec.to_string())
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start worker {index}"))?;
            children.push(child);
        }
        tracing::info!(workers = cfg.workers, "gateway supervisor started its workers");
        let shutdown = CancellationToken::new();
        let base = admin_base(cfg);
        let mut admin = tokio::spawn(baton_runtime::gateway_admin::serve_workers(
            base,
            cfg.workers,
            shutdown.clone(),
        ));
        let mut admin_alive = true;
        let failed = loop {
            let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
            tokio::select! {
                _ = crate::wait_for_signal() => break false,
                (status, index, _) = futures_util::future::select_all(waits) => {
                    tracing::error!("gateway worker {index} exited ({}): stopping the gateway", describe(status));
                    break true;
                }
                r = &mut admin, if admin_alive => {
                    let e = match r {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(())) => "admin API stopped".into(),
                        Err(e) => e.to_string(),
                    };
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
    crate::runtime()?.block_on(async {
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
