//! Small helpers shared by the drivers.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also after a panic elsewhere: the data behind these locks is
/// plain state (maps, counters), never a broken invariant worth dying for.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session id as logs and `baton status` show it.
pub(crate) fn sid(id: u64) -> String {
    format!("{id:016x}")
}
