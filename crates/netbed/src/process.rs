//! Running commands with a time limit, and children that die with their guard.

use std::collections::HashSet;
use std::io::{self, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Runs `cmd` to completion with `input` on its stdin, capturing stdout and stderr.
///
/// The command gets its own process group; past `timeout` the whole group is killed and the
/// call fails with [`io::ErrorKind::TimedOut`]. A non-zero exit is not an error here: look at
/// [`Output::status`].
pub fn run_bounded(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<Output> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn().map_err(|e| annotate(e, cmd))?;
    let pid = Pid::from_raw(child.id() as i32);
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        // Inputs are a few hundred bytes of iptables-restore or `ip -batch` lines: they fit
        // in the pipe, so writing before reading cannot deadlock.
        stdin.write_all(data)?;
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out,
        Err(_) => {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not finish within {timeout:?}", describe(cmd)),
            ))
        }
    }
}

/// Like [`run_bounded`], but a non-zero exit becomes an error carrying stderr; returns stdout.
pub(crate) fn run_ok(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<String> {
    let out = run_bounded(cmd, input, timeout)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    format!("`{s}`")
}

fn annotate(e: io::Error, cmd: &Command) -> io::Error {
    io::Error::new(e.kind(), format!("cannot start {}: {e}", describe(cmd)))
}

/// A child process that is killed, with its whole process group, and reaped when dropped.
///
/// Dereferences to [`Child`] for its pipes and `try_wait`.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    registry: Option<Registry>,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group (so that its own children die with it too).
    pub fn spawn(cmd: &mut Command) -> io::Result<ChildGuard> {
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|e| annotate(e, cmd))?;
        Ok(ChildGuard {
            child,
            registry: None,
        })
    }

    /// Spawns `cmd` and records it in `registry` until it is reaped.
    pub(crate) fn spawn_registered(
        cmd: &mut Command,
        registry: &Registry,
    ) -> io::Result<ChildGuard> {
        let mut guard = ChildGuard::spawn(cmd)?;
        registry.insert(guard.child.id());
        guard.registry = Some(registry.clone());
        Ok(guard)
    }

    /// Kills the process group now and waits for the child.
    pub fn kill(&mut self) -> io::Result<()> {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let res = self.child.wait().map(drop);
        if let Some(r) = &self.registry {
            r.remove(self.child.id());
        }
        res
    }
}

/// Process groups started by a bed and not yet reaped. A child that is not reaped keeps its
/// pid, so killing these groups can never hit an unrelated process.
#[derive(Debug, Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<HashSet<u32>>>);

impl Registry {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, pid: u32) {
        self.set().insert(pid);
    }

    fn remove(&self, pid: u32) {
        self.set().remove(&pid);
    }

    /// Kills every registered process group (children stay registered until reaped).
    pub(crate) fn kill_all(&self) {
        for &pid in self.set().iter() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
