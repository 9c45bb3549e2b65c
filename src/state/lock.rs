//! The apply lock: one apply of a fleet at a time.

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::journal::JournalError;

/// An exclusive lock on a fleet's apply, held for the life of the value. The OS drops it when the process
/// dies, so a killed apply never leaves a stale lock.
///
/// # Guarantees
/// The loser of a race always names the holder (pid, user, host, start time): the winner writes its record
/// right after it takes the lock, and a loser that finds no record of a live holder yet reads again, briefly.
pub struct ApplyLock {
    _file: std::fs::File,
}

/// How long a loser waits for the winner's record to appear.
const HOLDER_WAIT: Duration = Duration::from_secs(3);

/// The holder record: `pid 4242, user alice, host ci-7, since 2026-12-06T20:00:00.000Z`.
fn record() -> String {
    format!(
        "pid {}, user {}, host {}, since {}",
        std::process::id(),
        crate::util::actor(),
        crate::util::hostname().unwrap_or_else(|| "unknown".into()),
        super::journal::now()
    )
}

/// Whether a record names a process that still runs (on this host: /proc says; elsewhere: assumed).
fn names_a_live_holder(rec: &str) -> bool {
    let field = |k: &str| {
        rec.split(", ").find_map(|f| f.strip_prefix(k).map(str::trim)).map(str::to_string).filter(|v| !v.is_empty())
    };
    let (Some(pid), Some(host)) = (field("pid "), field("host ")) else { return false };
    if Some(host) != crate::util::hostname() {
        return true;
    }
    Path::new("/proc").join(pid).exists()
}

/// Adds "(N min ago)" after the record's start time.
fn describe(rec: &str) -> String {
    let since = rec.rsplit_once("since ").map(|(_, t)| t.trim());
    match since.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) {
        Some(t) => format!("{rec} ({})", crate::util::time::ago(&t.to_utc(), &chrono::Utc::now())),
        None => rec.to_string(),
    }
}

impl ApplyLock {
    pub fn acquire(path: &Path) -> Result<ApplyLock, JournalError> {
        Self::acquire_with(path, HOLDER_WAIT)
    }

    /// [`ApplyLock::acquire`], waiting at most `wait` for the holder's record (or for a lock this process is
    /// releasing) before it reports the holder.
    pub fn acquire_with(path: &Path, wait: Duration) -> Result<ApplyLock, JournalError> {
        let io = |source| JournalError::Io { path: path.into(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // The winner may not have written its record yet (or an earlier, dead holder's is still there):
                // read again until it names a live process, briefly.
                let t0 = Instant::now();
                let mut holder = String::new();
                loop {
                    holder.clear();
                    let _ = file.seek(std::io::SeekFrom::Start(0));
                    let _ = file.read_to_string(&mut holder);
                    let rec = holder.trim().to_string();
                    // This process's own record: an earlier session of it is being released (a child forked
                    // at that moment holds the lock until it execs); wait for it like for a missing record.
                    let ours = rec.starts_with(&format!("pid {},", std::process::id()));
                    if (!rec.is_empty() && !ours && names_a_live_holder(&rec)) || t0.elapsed() > wait {
                        break;
                    }
                    // The lock may have been freed meanwhile: take it then.
                    if file.try_lock().is_ok() {
                        return Self::hold(file, path);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let rec = holder.trim();
                let holder = if rec.is_empty() { "a process that wrote no record".to_string() } else { describe(rec) };
                return Err(JournalError::Locked { holder, lock: path.into() });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(io(source)),
        }
        Self::hold(file, path)
    }

    /// Writes this process's record into the lock it holds, in one write after the truncation.
    fn hold(mut file: std::fs::File, path: &Path) -> Result<ApplyLock, JournalError> {
        let io = |source| JournalError::Io { path: path.into(), source };
        let rec = format!("{}\n", record());
        file.set_len(0).map_err(io)?;
        file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        file.write_all(rec.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(ApplyLock { _file: file })
    }
}
