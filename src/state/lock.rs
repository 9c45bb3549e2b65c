//! The apply lock: one apply of a fleet at a time.

use std::path::Path;

use super::journal::{JournalError, now};

/// An exclusive lock on a fleet's apply, held for the life of the value. The OS drops it when the process
/// dies, so a killed apply never leaves a stale lock.
pub struct ApplyLock {
    _file: std::fs::File,
}

impl ApplyLock {
    pub fn acquire(path: &Path) -> Result<ApplyLock, JournalError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| JournalError::Io { path: path.into(), source })?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| JournalError::Io { path: path.into(), source })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                let holder =
                    if holder.trim().is_empty() { "unknown process".to_string() } else { holder.trim().to_string() };
                return Err(JournalError::Locked { holder, lock: path.into() });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(JournalError::Io { path: path.into(), source }),
        }
        use std::io::{Seek, Write};
        let _ = file.set_len(0);
        let _ = file.seek(std::io::SeekFrom::Start(0));
        let _ = write!(file, "pid {} since {}", std::process::id(), now());
        let _ = file.flush();
        Ok(ApplyLock { _file: file })
    }
}
