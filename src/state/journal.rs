//! The operator-side journal: a SQLite database (`.nimbus/journal.db` beside
//! the fleet file) that records every run and action and an audit/event log.
//! It is how an interrupted apply is understood afterwards: actions left
//! EXECUTING by a killed run become ORPHANED when the next run opens it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

pub use super::lock::ApplyLock;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
  id          INTEGER PRIMARY KEY,
  started_at  TEXT NOT NULL,
  finished_at TEXT,
  status      TEXT NOT NULL CHECK (status IN ('RUNNING', 'SUCCESS', 'ERROR', 'INTERRUPTED')),
  command     TEXT NOT NULL,
  tenant      TEXT NOT NULL,
  fleet_path  TEXT NOT NULL,
  summary     TEXT,
  actor       TEXT
);
CREATE TABLE IF NOT EXISTS actions (
  id          INTEGER PRIMARY KEY,
  run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  action_id   INTEGER NOT NULL,
  address     TEXT NOT NULL,
  kind        TEXT NOT NULL,
  status      TEXT NOT NULL CHECK (status IN ('PENDING', 'EXECUTING', 'SUCCESS', 'ERROR', 'SKIPPED', 'TIMEOUT', 'ORPHANED')),
  created_at  TEXT NOT NULL,
  started_at  TEXT,
  finished_at TEXT,
  exit_code   INTEGER,
  error       TEXT,
  log_path    TEXT,
  details     TEXT,
  UNIQUE (run_id, action_id)
);
CREATE INDEX IF NOT EXISTS actions_status ON actions(status);
CREATE TABLE IF NOT EXISTS event_log (
  id       INTEGER PRIMARY KEY,
  ts       TEXT NOT NULL,
  run_id   INTEGER,
  category TEXT NOT NULL CHECK (category IN ('audit', 'system', 'error')),
  level    TEXT NOT NULL CHECK (level IN ('debug', 'info', 'success', 'warn', 'error')),
  actor    TEXT NOT NULL,
  message  TEXT NOT NULL,
  details  TEXT
);
CREATE INDEX IF NOT EXISTS event_log_ts ON event_log(ts);
CREATE TABLE IF NOT EXISTS idempotency_keys (
  scope       TEXT PRIMARY KEY,
  key         TEXT NOT NULL,
  created_at  TEXT NOT NULL,
  run_id      INTEGER,
  made_id     TEXT,
  made_at     TEXT
);
CREATE TABLE IF NOT EXISTS step_scripts (
  hash        TEXT PRIMARY KEY,
  step        TEXT NOT NULL,
  script      TEXT NOT NULL,
  recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS observations (
  kind  TEXT NOT NULL,
  name  TEXT NOT NULL,
  since TEXT NOT NULL,
  PRIMARY KEY (kind, name)
);
";

/// A resource a call made, not seen by discovery yet: (scope, run, id, made at).
pub type MadeUnseenRow = (String, Option<i64>, String, String);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal `{path}`: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("journal `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another apply of this fleet is running ({holder})")]
    Locked { holder: String, lock: PathBuf },
    /// The file is not a usable SQLite database (or fails its integrity check).
    #[error("journal `{path}` is damaged: {message}")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Audit,
    System,
    Error,
}

impl Category {
    fn as_str(self) -> &'static str {
        match self {
            Category::Audit => "audit",
            Category::System => "system",
            Category::Error => "error",
        }
    }
}

/// How long rows are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub actions: Duration,
    pub events: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { actions: Duration::from_secs(30 * 86400), events: Duration::from_secs(7 * 86400) }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Success,
    Error,
    /// Stopped by a signal (or found RUNNING after a crash).
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Success => "SUCCESS",
            RunStatus::Error => "ERROR",
            RunStatus::Interrupted => "INTERRUPTED",
        }
    }
}

pub struct Journal {
    conn: Connection,
    path: PathBuf,
}

pub(crate) fn now() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A row of `runs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub status: String,
    pub command: String,
    pub tenant: String,
    pub summary: Option<String>,
    /// Who made the run: `cli`, `api`, `reconcile` (`None`: written by an earlier nimbus).
    pub actor: Option<String>,
}

/// A row of `actions`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActionRow {
    pub run_id: i64,
    pub action_id: i64,
    pub address: String,
    pub kind: String,
    pub status: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub log_path: Option<String>,
}

/// A row of `event_log`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRow {
    pub ts: String,
    pub run_id: Option<i64>,
    pub category: String,
    pub level: String,
    pub actor: String,
    pub message: String,
    pub details: Option<String>,
}

impl Journal {
    /// Opens (creating) the journal, and turns actions a killed run left EXECUTING into ORPHANED.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| JournalError::Io { path: path.into(), source })?;
        }
        let conn = Connection::open(path).map_err(|source| JournalError::Sqlite { path: path.into(), source })?;
        let j = Journal { conn, path: path.to_path_buf() };
        let corrupt = |e: JournalError| match e {
            JournalError::Sqlite { source, .. }
                if matches!(
                    source.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
                ) =>
            {
                JournalError::Corrupt { path: path.into(), message: source.to_string() }
            }
            other => other,
        };
        j.exec_batch("PRAGMA busy_timeout = 5000;").map_err(corrupt)?;
        // Checked before anything else reads it (discovery, the confirmation), so a damaged journal is one clear
        // error up front, never a surprise halfway through an apply.
        let check: String = j.conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(|e| corrupt(j.err(e)))?;
        if check != "ok" {
            return Err(JournalError::Corrupt { path: path.into(), message: check });
        }
        j.exec_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(corrupt)?;
        j.exec_batch(SCHEMA).map_err(corrupt)?;
        j.migrate().map_err(corrupt)?;
        Ok(j)
    }

    /// Brings a journal written by an earlier nimbus to this schema, in place: `runs.actor`, the made
    /// resources of idempotency keys, and the seed's `success` level in `event_log` (a CHECK constraint, so
    /// that table is rebuilt in one transaction, keeping every row).
    fn migrate(&self) -> Result<(), JournalError> {
        let has = |table: &str, column: &str| -> Result<bool, JournalError> {
            let mut st = self.conn.prepare(&format!("PRAGMA table_info({table})")).map_err(|e| self.err(e))?;
            let cols: Vec<String> = st
                .query_map([], |r| r.get::<_, String>(1))
                .map_err(|e| self.err(e))?
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e))?;
            Ok(cols.iter().any(|c| c == column))
        };
        if !has("runs", "actor")? {
            self.exec_batch("ALTER TABLE runs ADD COLUMN actor TEXT;")?;
        }
        for col in ["run_id INTEGER", "made_id TEXT", "made_at TEXT"] {
            if !has("idempotency_keys", col.split(' ').next().expect("a name"))? {
                self.exec_batch(&format!("ALTER TABLE idempotency_keys ADD COLUMN {col};"))?;
            }
        }
        let sql: String = self
            .conn
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'event_log'", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if !sql.contains("'success'") {
            self.exec_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE event_log_new (
                   id       INTEGER PRIMARY KEY,
                   ts       TEXT NOT NULL,
                   run_id   INTEGER,
                   category TEXT NOT NULL CHECK (category IN ('audit', 'system', 'error')),
                   level    TEXT NOT NULL CHECK (level IN ('debug', 'info', 'success', 'warn', 'error')),
                   actor    TEXT NOT NULL,
                   message  TEXT NOT NULL,
                   details  TEXT
                 );
                 INSERT INTO event_log_new (id, ts, run_id, category, level, actor, message, details)
                   SELECT id, ts, run_id, category, level, actor, message, details FROM event_log;
                 DROP TABLE event_log;
                 ALTER TABLE event_log_new RENAME TO event_log;
                 CREATE INDEX IF NOT EXISTS event_log_ts ON event_log(ts);
                 COMMIT;",
            )?;
        }
        Ok(())
    }

    /// `NIMBUS_FAILPOINT=fail:journal-write:N` (a test facility) fails the N-th record of an action.
    fn failpoint(&self) -> Result<(), JournalError> {
        if crate::util::failpoint::fail("journal-write") {
            return Err(JournalError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("failpoint journal-write"),
            });
        }
        Ok(())
    }

    fn err(&self, source: rusqlite::Error) -> JournalError {
        JournalError::Sqlite { path: self.path.clone(), source }
    }

    fn exec_batch(&self, sql: &str) -> Result<(), JournalError> {
        self.conn.execute_batch(sql).map_err(|e| self.err(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole database as one consistent image (what every connection committed, WAL included): what a
    /// remote backend uploads.
    pub fn snapshot(&self) -> Result<Vec<u8>, JournalError> {
        let data = self.conn.serialize("main").map_err(|e| self.err(e))?;
        Ok(data.to_vec())
    }

    /// Puts a downloaded image at `path` (replacing the file and its WAL), to be opened.
    pub fn restore(path: &Path, image: &[u8]) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: path.into(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        for suffix in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            match std::fs::remove_file(std::path::PathBuf::from(p)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
        let tmp = path.with_extension("download");
        std::fs::write(&tmp, image).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Marks what a killed run left behind. Returns the number of orphaned actions.
    pub fn recover(&self) -> Result<usize, JournalError> {
        let orphaned: Vec<(i64, i64, String)> = {
            let mut st = self
                .conn
                .prepare("SELECT run_id, action_id, address FROM actions WHERE status = 'EXECUTING'")
                .map_err(|e| self.err(e))?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| self.err(e))?
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e))?
        };
        let ts = now();
        self.conn
            .execute("UPDATE actions SET status = 'ORPHANED', finished_at = ?1 WHERE status = 'EXECUTING'", params![ts])
            .map_err(|e| self.err(e))?;
        let interrupted = self
            .conn
            .execute("UPDATE runs SET status = 'INTERRUPTED', finished_at = ?1 WHERE status = 'RUNNING'", params![ts])
            .map_err(|e| self.err(e))?;
        for (run, action, address) in &orphaned {
            self.event(
                Some(*run),
                Category::System,
                "warn",
                "nimbus",
                &format!("action {action} ({address}) was executing when run {run} stopped; marked ORPHANED"),
                Some(serde_json::json!({ "run_id": run, "action_id": action, "address": address })),
            )?;
        }
        if interrupted > 0 {
            self.event(
                None,
                Category::System,
                "warn",
                "nimbus",
                &format!("{interrupted} run(s) had been interrupted"),
                None,
            )?;
        }
        Ok(orphaned.len())
    }

    /// Deletes actions (with their runs) and events older than the retention.
    pub fn prune(&self, r: Retention) -> Result<(usize, usize), JournalError> {
        let cut = |d: Duration| {
            (Utc::now() - chrono::Duration::from_std(d).unwrap_or_default())
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let runs = self
            .conn
            .execute("DELETE FROM runs WHERE status != 'RUNNING' AND started_at < ?1", params![cut(r.actions)])
            .map_err(|e| self.err(e))?;
        let events = self
            .conn
            .execute("DELETE FROM event_log WHERE ts < ?1", params![cut(r.events)])
            .map_err(|e| self.err(e))?;
        Ok((runs, events))
    }

    pub fn start_run(&self, command: &str, tenant: &str, fleet_path: &str) -> Result<i64, JournalError> {
        self.start_run_by(command, "cli", tenant, fleet_path)
    }

    /// Starts a run made by `actor`: `cli` (a person's command), `api` (the library facade), `reconcile`.
    pub fn start_run_by(
        &self,
        command: &str,
        actor: &str,
        tenant: &str,
        fleet_path: &str,
    ) -> Result<i64, JournalError> {
        self.conn
            .execute(
                "INSERT INTO runs (started_at, status, command, tenant, fleet_path, actor) VALUES (?1, 'RUNNING', ?2, ?3, ?4, ?5)",
                params![now(), command, tenant, fleet_path, actor],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// A run's status and start time (`None`: no such run here: never recorded, or pruned).
    pub fn run_status(&self, run: i64) -> Result<Option<(String, String)>, JournalError> {
        self.conn
            .query_row("SELECT status, started_at FROM runs WHERE id = ?1", params![run], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn finish_run(&self, run: i64, success: bool, summary: &Value) -> Result<(), JournalError> {
        self.finish_run_as(run, if success { RunStatus::Success } else { RunStatus::Error }, summary)
    }

    /// Records how a run ended.
    pub fn finish_run_as(&self, run: i64, status: RunStatus, summary: &Value) -> Result<(), JournalError> {
        self.conn
            .execute(
                "UPDATE runs SET status = ?1, finished_at = ?2, summary = ?3 WHERE id = ?4",
                params![status.as_str(), now(), summary.to_string(), run],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records every action of a run as PENDING, in one transaction.
    pub fn add_actions(&mut self, run: i64, actions: &[(usize, String, String, Value)]) -> Result<(), JournalError> {
        let ts = now();
        let tx = self.conn.transaction().map_err(|source| JournalError::Sqlite { path: self.path.clone(), source })?;
        for (id, address, kind, details) in actions {
            tx.execute(
                "INSERT INTO actions (run_id, action_id, address, kind, status, created_at, details) VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, ?6)",
                params![run, *id as i64, address, kind, ts, details.to_string()],
            )
            .map_err(|source| JournalError::Sqlite { path: self.path.clone(), source })?;
        }
        tx.commit().map_err(|source| JournalError::Sqlite { path: self.path.clone(), source })
    }

    pub fn action_started(&self, run: i64, id: usize, log_path: Option<&Path>) -> Result<(), JournalError> {
        self.failpoint()?;
        self.conn
            .execute(
                "UPDATE actions SET status = 'EXECUTING', started_at = ?1, log_path = ?2 WHERE run_id = ?3 AND action_id = ?4",
                params![now(), log_path.map(|p| p.display().to_string()), run, id as i64],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn action_finished(
        &self,
        run: i64,
        id: usize,
        status: &str,
        exit_code: Option<i32>,
        error: Option<&str>,
    ) -> Result<(), JournalError> {
        self.failpoint()?;
        self.conn
            .execute(
                "UPDATE actions SET status = ?1, finished_at = ?2, exit_code = ?3, error = ?4 WHERE run_id = ?5 AND action_id = ?6",
                params![status, now(), exit_code, error, run, id as i64],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn event(
        &self,
        run: Option<i64>,
        category: Category,
        level: &str,
        actor: &str,
        message: &str,
        details: Option<Value>,
    ) -> Result<(), JournalError> {
        self.conn
            .execute(
                "INSERT INTO event_log (ts, run_id, category, level, actor, message, details) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![now(), run, category.as_str(), level, actor, message, details.map(|d| d.to_string())],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn runs(&self, limit: usize) -> Result<Vec<RunRow>, JournalError> {
        let mut st = self
            .conn
            .prepare("SELECT id, started_at, finished_at, status, command, tenant, summary, actor FROM runs ORDER BY id DESC LIMIT ?1")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![limit as i64], |r| {
                Ok(RunRow {
                    id: r.get(0)?,
                    started_at: r.get(1)?,
                    finished_at: r.get(2)?,
                    status: r.get(3)?,
                    command: r.get(4)?,
                    tenant: r.get(5)?,
                    summary: r.get(6)?,
                    actor: r.get(7)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn actions(&self, run: i64) -> Result<Vec<ActionRow>, JournalError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT run_id, action_id, address, kind, status, started_at, finished_at, exit_code, error, log_path FROM actions WHERE run_id = ?1 ORDER BY action_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![run], |r| {
                Ok(ActionRow {
                    run_id: r.get(0)?,
                    action_id: r.get(1)?,
                    address: r.get(2)?,
                    kind: r.get(3)?,
                    status: r.get(4)?,
                    started_at: r.get(5)?,
                    finished_at: r.get(6)?,
                    exit_code: r.get(7)?,
                    error: r.get(8)?,
                    log_path: r.get(9)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn events(&self, limit: usize) -> Result<Vec<EventRow>, JournalError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT ts, run_id, category, level, actor, message, details FROM event_log ORDER BY id DESC LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![limit as i64], |r| {
                Ok(EventRow {
                    ts: r.get(0)?,
                    run_id: r.get(1)?,
                    category: r.get(2)?,
                    level: r.get(3)?,
                    actor: r.get(4)?,
                    message: r.get(5)?,
                    details: r.get(6)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Records which `names` are in a condition (`kind`: a runner offline, a machine unreachable) as of
    /// `now`, and returns since when each has been in it without a break. Names no longer in it are forgotten.
    pub fn observe(
        &self,
        kind: &str,
        names: &[String],
        now: chrono::DateTime<Utc>,
    ) -> Result<std::collections::HashMap<String, chrono::DateTime<Utc>>, JournalError> {
        let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        let mut known: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        {
            let mut st = tx.prepare("SELECT name, since FROM observations WHERE kind = ?1").map_err(|e| self.err(e))?;
            let rows = st
                .query_map(params![kind], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| self.err(e))?;
            for r in rows {
                let (n, s) = r.map_err(|e| self.err(e))?;
                known.insert(n, s);
            }
        }
        for n in known.keys().filter(|n| !names.contains(n)) {
            tx.execute("DELETE FROM observations WHERE kind = ?1 AND name = ?2", params![kind, n])
                .map_err(|e| self.err(e))?;
        }
        let mut out = std::collections::HashMap::new();
        for n in names {
            let since = match known.get(n) {
                Some(s) => s.clone(),
                None => {
                    tx.execute(
                        "INSERT INTO observations (kind, name, since) VALUES (?1, ?2, ?3)",
                        params![kind, n, ts],
                    )
                    .map_err(|e| self.err(e))?;
                    ts.clone()
                }
            };
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&since) {
                out.insert(n.clone(), t.with_timezone(&Utc));
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// The idempotency key of one mutating provider action (`scope`: provider, operation, machine), written
    /// before the call: an action interrupted or failed before [`Journal::forget_key`] gets the same key on its
    /// rerun, so the provider returns what the first call made instead of making a second one.
    pub fn idempotency_key(&self, scope: &str) -> Result<String, JournalError> {
        self.failpoint()?;
        let now = Utc::now();
        let fresh = crate::core::model::sha256_hex(
            format!(
                "{scope}|{}|{}|{}",
                now.timestamp_nanos_opt().unwrap_or_default(),
                std::process::id(),
                self.path.display()
            )
            .as_bytes(),
        );
        self.conn
            .execute(
                "INSERT OR IGNORE INTO idempotency_keys (scope, key, created_at) VALUES (?1, ?2, ?3)",
                params![scope, &fresh[..32], crate::util::time::ts(&now)],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .query_row("SELECT key FROM idempotency_keys WHERE scope = ?1", params![scope], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Records what the call under `scope` made (its resource id), in run `run`: until discovery sees it, the
    /// plan knows it exists (EC2's reads lag behind its writes) and does not make it again.
    pub fn key_made(&self, scope: &str, run: Option<i64>, id: &str) -> Result<(), JournalError> {
        self.conn
            .execute(
                "UPDATE idempotency_keys SET run_id = ?1, made_id = ?2, made_at = ?3 WHERE scope = ?4",
                params![run, id, now(), scope],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// What an earlier call under `scope` made, if it recorded it.
    pub fn made(&self, scope: &str) -> Result<Option<String>, JournalError> {
        self.conn
            .query_row("SELECT made_id FROM idempotency_keys WHERE scope = ?1", params![scope], |r| r.get(0))
            .optional()
            .map(Option::flatten)
            .map_err(|e| self.err(e))
    }

    /// Every resource a call made that discovery has not seen yet: (scope, run, id, made at).
    pub fn made_unseen(&self) -> Result<Vec<MadeUnseenRow>, JournalError> {
        let mut st = self
            .conn
            .prepare("SELECT scope, run_id, made_id, made_at FROM idempotency_keys WHERE made_id IS NOT NULL")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, Option<String>>(3)?.unwrap_or_default()))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Records the text of setup-step scripts by their hash (the fleet file's, not secrets: `{env:}` values are
    /// never resolved into a script), so a later plan can show how a step changed.
    pub fn record_scripts<'s>(
        &self,
        steps: impl IntoIterator<Item = (&'s str, &'s str, &'s str)>,
    ) -> Result<(), JournalError> {
        let now = crate::util::time::ts(&chrono::Utc::now());
        for (step, hash, script) in steps {
            self.conn
                .execute(
                    "INSERT OR IGNORE INTO step_scripts (hash, step, script, recorded_at) VALUES (?1, ?2, ?3, ?4)",
                    params![hash, step, script, now],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The text of the script with this hash, if a run recorded it.
    pub fn script(&self, hash: &str) -> Result<Option<String>, JournalError> {
        self.conn
            .query_row("SELECT script FROM step_scripts WHERE hash = ?1", params![hash], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The action under `scope` is done: a later one (a machine created again) gets a new key.
    pub fn forget_key(&self, scope: &str) -> Result<(), JournalError> {
        self.conn.execute("DELETE FROM idempotency_keys WHERE scope = ?1", params![scope]).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// What is recorded for `kind`, without changing it.
    /// The pools this journal's runs acted on (from machine addresses `pool[i]` and runner addresses): whose
    /// leftover runners this fleet may remove.
    pub fn pools_seen(&self) -> Result<std::collections::BTreeSet<String>, JournalError> {
        let mut st = self.conn.prepare("SELECT DISTINCT address FROM actions").map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(|e| self.err(e))?;
        let mut out = std::collections::BTreeSet::new();
        for a in rows {
            let a = a.map_err(|e| self.err(e))?;
            let pool = match a.strip_prefix("runner.") {
                Some(name) => crate::core::model::parse_machine_name(name).map(|(_, p, _)| p.to_string()),
                None => a.split_once('[').map(|(p, _)| p.to_string()),
            };
            out.extend(pool);
        }
        Ok(out)
    }

    pub fn observed(&self, kind: &str) -> Result<std::collections::HashSet<String>, JournalError> {
        let mut st = self.conn.prepare("SELECT name FROM observations WHERE kind = ?1").map_err(|e| self.err(e))?;
        let rows = st.query_map(params![kind], |r| r.get::<_, String>(0)).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn latest_run(&self) -> Result<Option<i64>, JournalError> {
        self.conn
            .query_row("SELECT max(id) FROM runs", [], |r| r.get(0))
            .optional()
            .map(Option::flatten)
            .map_err(|e| self.err(e))
    }

    /// Backdates a run (tests of retention).
    #[cfg(feature = "testing")]
    pub fn backdate(&self, run: i64, to: chrono::DateTime<Utc>) -> Result<(), JournalError> {
        let ts = to.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self.conn
            .execute("UPDATE runs SET started_at = ?1 WHERE id = ?2", params![ts, run])
            .map_err(|e| self.err(e))?;
        self.conn
            .execute("UPDATE event_log SET ts = ?1 WHERE run_id = ?2", params![ts, run])
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
