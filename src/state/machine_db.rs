//! The state database on each machine (`/var/lib/nimbus/state.db`).
//!
//! A SQLite file with the tables `machine_state`, `image_state`,
//! `setup_steps` and `runner_state`, readable by a person with the `sqlite3`
//! command. nimbus needs nothing on the machine but a POSIX shell: it builds
//! the file here (rusqlite, in memory), sends the bytes on stdin to
//! `cat > tmp && mv tmp state.db` (an atomic rename, after checking the size),
//! and reads it back with `cat`. It never holds secrets: no tokens, no keys.

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

use crate::core::model::{MachineState, RunnerRecord, StepRecord, StepStatus};
use crate::transport::{Transport, TransportError};
use crate::util::shell::quote;

/// The schema this nimbus writes. `1` was a key-value `machine_state` and `setup_steps` without the seed's
/// columns; a machine's database of an older schema is read as it is and rewritten in this one (by `apply`'s
/// discovery, or the next write), keeping everything it held.
pub const SCHEMA_VERSION: &str = "2";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS machine_state (
  machine        TEXT NOT NULL,
  state          TEXT NOT NULL CHECK (state IN ('provisioning', 'image_installing', 'ready', 'running', 'stopping', 'terminated')),
  updated_at     TEXT NOT NULL,
  tenant         TEXT,
  pool           TEXT,
  provider       TEXT,
  created_at     TEXT,
  nimbus_version TEXT,
  schema_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS machine_info (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS image_state (
  image      TEXT NOT NULL,
  applied_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS setup_steps (
  position      INTEGER NOT NULL,
  name          TEXT PRIMARY KEY,
  step          TEXT NOT NULL,
  hash          TEXT NOT NULL,
  status        TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'timeout')),
  started_at    TEXT,
  finished_at   TEXT,
  completed_at  TEXT,
  exit_code     INTEGER,
  error_message TEXT
);
CREATE TABLE IF NOT EXISTS runner_state (
  name          TEXT PRIMARY KEY,
  labels        TEXT NOT NULL,
  mode          TEXT NOT NULL,
  registered_at TEXT NOT NULL,
  runner_id     INTEGER
);
CREATE INDEX IF NOT EXISTS idx_machine_state_state ON machine_state(state);
CREATE INDEX IF NOT EXISTS idx_setup_steps_status ON setup_steps(status);
";

/// The `machine_info` key of the runner agent release nimbus installed.
pub const AGENT_VERSION_KEY: &str = "runner_agent_version";

/// Keys of the machine record that are columns of `machine_state`; any other key lives in `machine_info`.
const MACHINE_COLUMNS: [&str; 6] = ["machine", "tenant", "pool", "provider", "created_at", "nimbus_version"];

/// Where a machine is in its life, as the seed's `machine_state.state` records it:
/// `provisioning → image_installing → ready → running → stopping → terminated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lifecycle {
    /// Launched and reachable; nothing set up yet.
    #[default]
    Provisioning,
    /// Setup steps are running (or one failed, and the next apply resumes).
    ImageInstalling,
    /// Set up, no runner registered.
    Ready,
    /// Its runner is registered.
    Running,
    /// Being torn down.
    Stopping,
    Terminated,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Provisioning => "provisioning",
            Lifecycle::ImageInstalling => "image_installing",
            Lifecycle::Ready => "ready",
            Lifecycle::Running => "running",
            Lifecycle::Stopping => "stopping",
            Lifecycle::Terminated => "terminated",
        }
    }

    fn parse(s: &str) -> Option<Lifecycle> {
        [
            Lifecycle::Provisioning,
            Lifecycle::ImageInstalling,
            Lifecycle::Ready,
            Lifecycle::Running,
            Lifecycle::Stopping,
            Lifecycle::Terminated,
        ]
        .into_iter()
        .find(|l| l.as_str() == s)
    }
}

impl StateError {
    /// The machine answered, but its database is empty or damaged (as opposed to not reachable at all).
    pub fn is_bad_state(&self) -> bool {
        matches!(self, StateError::Empty { .. } | StateError::Corrupt { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the state database `{path}` on `{machine}` is empty (0 bytes)")]
    Empty { machine: String, path: String },
    #[error("the state database `{path}` on `{machine}` is damaged: {message}")]
    Corrupt { machine: String, path: String, message: String },
    #[error("reading the state database `{path}` on `{machine}` failed (exit {code}): {stderr}")]
    ReadFailed { machine: String, path: String, code: i32, stderr: String },
    #[error("the state database for `{machine}` could not be built: {message}")]
    Encode { machine: String, message: String },
    #[error("writing the state database on `{machine}` failed (exit {code}): {stderr}")]
    WriteFailed { machine: String, code: i32, stderr: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRow {
    pub position: i64,
    pub name: String,
    pub hash: String,
    pub status: StepStatus,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i64>,
    /// The last lines of a failed step's output, secrets redacted.
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRow {
    pub name: String,
    pub labels: Vec<String>,
    pub mode: String,
    pub registered_at: String,
    pub runner_id: Option<i64>,
}

/// The whole state database, as rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateDb {
    pub machine: BTreeMap<String, String>,
    /// Where the machine is in its life, and since when (`updated_at`).
    pub lifecycle: Lifecycle,
    pub updated_at: Option<String>,
    /// The schema the database was read in (`None`: built here, never read).
    pub read_schema: Option<String>,
    pub images: Vec<(String, String)>,
    pub steps: Vec<StepRow>,
    pub runner: Option<RunnerRow>,
}

fn status_str(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Running => "running",
        StepStatus::Done => "done",
        StepStatus::Failed => "failed",
        StepStatus::TimedOut => "timeout",
    }
}

fn parse_status(s: &str) -> StepStatus {
    match s {
        "done" => StepStatus::Done,
        "failed" => StepStatus::Failed,
        "timeout" => StepStatus::TimedOut,
        _ => StepStatus::Running,
    }
}

impl StateDb {
    /// Serialises to SQLite file bytes (always in the current schema).
    pub fn to_bytes(&self) -> rusqlite::Result<Vec<u8>> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        let col = |k: &str| self.machine.get(k).cloned();
        let updated_at = self.updated_at.clone().unwrap_or_else(|| crate::util::time::ts(&chrono::Utc::now()));
        conn.execute(
            "INSERT INTO machine_state (machine, state, updated_at, tenant, pool, provider, created_at, nimbus_version, schema_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                col("machine").unwrap_or_default(),
                self.lifecycle.as_str(),
                updated_at,
                col("tenant"),
                col("pool"),
                col("provider"),
                col("created_at"),
                col("nimbus_version"),
                SCHEMA_VERSION
            ],
        )?;
        for (k, v) in self.machine.iter().filter(|(k, _)| !MACHINE_COLUMNS.contains(&k.as_str())) {
            conn.execute("INSERT INTO machine_info (key, value) VALUES (?1, ?2)", params![k, v])?;
        }
        for (image, at) in &self.images {
            conn.execute("INSERT INTO image_state (image, applied_at) VALUES (?1, ?2)", params![image, at])?;
        }
        for s in &self.steps {
            let completed = if s.status == StepStatus::Running { None } else { s.finished_at.clone() };
            conn.execute(
                "INSERT INTO setup_steps (position, name, step, hash, status, started_at, finished_at, completed_at, exit_code, error_message) VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    s.position,
                    s.name,
                    s.hash,
                    status_str(s.status),
                    s.started_at,
                    s.finished_at,
                    completed,
                    s.exit_code,
                    s.error_message
                ],
            )?;
        }
        if let Some(r) = &self.runner {
            conn.execute(
                "INSERT INTO runner_state (name, labels, mode, registered_at, runner_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    r.name,
                    serde_json::to_string(&r.labels).unwrap_or_default(),
                    r.mode,
                    r.registered_at,
                    r.runner_id
                ],
            )?;
        }
        Ok(conn.serialize("main")?.to_vec())
    }

    /// Parses SQLite file bytes, of this schema or an older one (schema 1: a key-value `machine_state`, steps
    /// without the seed's columns): what the database held is kept, and the lifecycle of an older one is
    /// inferred from its steps and runner.
    pub fn from_bytes(bytes: &[u8]) -> rusqlite::Result<StateDb> {
        let mut conn = Connection::open_in_memory()?;
        conn.deserialize_read_exact("main", bytes, bytes.len(), true)?;
        let columns = |table: &str| -> rusqlite::Result<Vec<String>> {
            let mut st = conn.prepare(&format!("PRAGMA table_info({table})"))?;
            st.query_map([], |r| r.get::<_, String>(1))?.collect()
        };
        let mut db = StateDb::default();
        let machine_cols = columns("machine_state")?;
        let legacy = machine_cols.iter().any(|c| c == "key");
        let mut schema = None;
        let mut lifecycle = None;
        if legacy {
            let mut st = conn.prepare("SELECT key, value FROM machine_state")?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                let (k, v) = row?;
                db.machine.insert(k, v);
            }
            schema = db.machine.remove("schema_version").or(Some("1".into()));
        } else {
            let mut st = conn.prepare(&format!(
                "SELECT state, updated_at, schema_version, {} FROM machine_state LIMIT 1",
                MACHINE_COLUMNS.join(", ")
            ))?;
            let mut rows = st.query([])?;
            if let Some(r) = rows.next()? {
                lifecycle = Lifecycle::parse(&r.get::<_, String>(0)?);
                db.updated_at = r.get(1)?;
                schema = r.get(2)?;
                for (i, k) in MACHINE_COLUMNS.iter().enumerate() {
                    if let Some(v) = r.get::<_, Option<String>>(3 + i)? {
                        db.machine.insert(k.to_string(), v);
                    }
                }
            }
            let mut st = conn.prepare("SELECT key, value FROM machine_info")?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                let (k, v) = row?;
                db.machine.insert(k, v);
            }
        }
        db.read_schema = schema;
        let mut st = conn.prepare("SELECT image, applied_at FROM image_state ORDER BY rowid")?;
        for row in st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
            db.images.push(row?);
        }
        let has_error = columns("setup_steps")?.iter().any(|c| c == "error_message");
        let mut st = conn.prepare(&format!(
            "SELECT position, name, hash, status, started_at, finished_at, exit_code, {} FROM setup_steps ORDER BY position, name",
            if has_error { "error_message" } else { "NULL" }
        ))?;
        for row in st.query_map([], |r| {
            Ok(StepRow {
                position: r.get(0)?,
                name: r.get(1)?,
                hash: r.get(2)?,
                status: parse_status(&r.get::<_, String>(3)?),
                started_at: r.get(4)?,
                finished_at: r.get(5)?,
                exit_code: r.get(6)?,
                error_message: r.get(7)?,
            })
        })? {
            db.steps.push(row?);
        }
        let mut st = conn.prepare("SELECT name, labels, mode, registered_at, runner_id FROM runner_state LIMIT 1")?;
        let mut rows = st.query([])?;
        if let Some(r) = rows.next()? {
            db.runner = Some(RunnerRow {
                name: r.get(0)?,
                labels: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                mode: r.get(2)?,
                registered_at: r.get(3)?,
                runner_id: r.get(4)?,
            });
        }
        db.lifecycle = lifecycle.unwrap_or_else(|| db.inferred_lifecycle());
        Ok(db)
    }

    /// The lifecycle an older database implies: a registered runner is running; unfinished steps are installing.
    fn inferred_lifecycle(&self) -> Lifecycle {
        if self.runner.is_some() {
            Lifecycle::Running
        } else if self.steps.iter().any(|s| s.status != StepStatus::Done) {
            Lifecycle::ImageInstalling
        } else if self.steps.is_empty() {
            Lifecycle::Provisioning
        } else {
            Lifecycle::Ready
        }
    }

    /// Whether the database on the machine is of an older schema (and is rewritten in this one).
    pub fn needs_migration(&self) -> bool {
        self.read_schema.as_deref().is_some_and(|v| v != SCHEMA_VERSION)
    }

    /// Moves the machine to `state`, now.
    pub fn set_lifecycle(&mut self, state: Lifecycle) {
        self.lifecycle = state;
        self.updated_at = Some(crate::util::time::ts(&chrono::Utc::now()));
    }

    /// What the planner needs.
    pub fn to_model(&self) -> MachineState {
        MachineState {
            steps: self
                .steps
                .iter()
                .map(|s| StepRecord { name: s.name.clone(), hash: s.hash.clone(), status: s.status })
                .collect(),
            runner: self.runner.as_ref().map(|r| RunnerRecord {
                name: r.name.clone(),
                labels: r.labels.clone(),
                runner_id: r.runner_id.and_then(|i| u64::try_from(i).ok()),
                agent_version: self.machine.get(AGENT_VERSION_KEY).cloned(),
            }),
            lifecycle: Some(self.lifecycle.as_str().to_string()),
        }
    }

    /// Records a step's progress, keeping one row per step name.
    /// Records why a step failed: the last lines of its output, secrets redacted.
    pub fn set_step_error(&mut self, name: &str, output_tail: &str) {
        if let Some(r) = self.steps.iter_mut().find(|s| s.name == name) {
            let lines: Vec<&str> = output_tail.lines().collect();
            let last = lines[lines.len().saturating_sub(20)..].join("\n");
            r.error_message = Some(crate::util::secrets::redact(&last)).filter(|m| !m.trim().is_empty());
        }
    }

    pub fn set_step(&mut self, position: i64, name: &str, hash: &str, status: StepStatus, exit_code: Option<i64>) {
        let now = crate::util::time::ts(&chrono::Utc::now());
        let row = match self.steps.iter_mut().find(|s| s.name == name) {
            Some(r) => r,
            None => {
                self.steps.push(StepRow {
                    position,
                    name: name.into(),
                    hash: hash.into(),
                    status,
                    started_at: None,
                    finished_at: None,
                    exit_code: None,
                    error_message: None,
                });
                self.steps.last_mut().expect("just pushed")
            }
        };
        row.position = position;
        row.hash = hash.into();
        row.status = status;
        row.exit_code = exit_code;
        row.error_message = None;
        match status {
            StepStatus::Running => {
                row.started_at = Some(now);
                row.finished_at = None;
            }
            _ => row.finished_at = Some(now),
        }
    }
}

/// The exit code of [`read_script`] when there is no database.
pub const MISSING: i32 = 44;
const SHORT_WRITE: i32 = 45;

/// Shell that sets `p` (the state database), `d` (its folder) and `s` (`sudo -n` when it must be used, else
/// empty) on the machine. A configured path is used as it is. The default, `/var/lib/nimbus/state.db`, works
/// for a non-root login too: through `sudo -n` when that works without a password, otherwise in the user's
/// XDG state folder (`~/.local/state/nimbus/state.db`).
pub fn locate(state_path: &str) -> String {
    let dir = match state_path.rfind('/') {
        Some(0) => "/",
        Some(i) => &state_path[..i],
        None => ".",
    };
    let mut sh = format!("p={}; d={}; s=", quote(state_path), quote(dir));
    if state_path == crate::transport::ssh::REMOTE_STATE_PATH {
        sh.push_str(
            "; if ! { [ -w \"$d\" ] || { [ ! -e \"$d\" ] && mkdir -p \"$d\" 2>/dev/null; }; }; then \
             if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then s='sudo -n'; \
             else d=\"${XDG_STATE_HOME:-$HOME/.local/state}/nimbus\"; p=\"$d/state.db\"; fi; fi",
        );
    }
    sh
}

/// Shell (after [`locate`]) that prints the state database, or exits [`MISSING`] when there is none.
pub fn read_script() -> String {
    format!("if [ -f \"$p\" ]; then $s cat \"$p\"; else exit {MISSING}; fi")
}

/// The folder holding the state database when the machine is a folder on this computer (a `local` sandbox):
/// its bookkeeping is then file operations, with the shell scripts' semantics and no process spawned.
pub fn local_dir(t: &dyn Transport) -> Option<std::path::PathBuf> {
    t.local_path(t.state_path()).and_then(|p| p.parent().map(std::path::Path::to_path_buf))
}

/// What [`read_script`] prints for the database at `path` on this computer, without a shell.
pub fn read_local(path: &std::path::Path) -> crate::transport::ExecOutput {
    let (code, stdout, stderr_tail) = match std::fs::read(path) {
        Ok(bytes) => (0, bytes, String::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (MISSING, Vec::new(), String::new()),
        Err(e) => (1, Vec::new(), e.to_string()),
    };
    crate::transport::ExecOutput { code, stdout, stderr_tail }
}

/// [`write_script`] without a shell, for a database on this computer: a temporary file, then a rename; the pid
/// file of a finished setup step goes.
fn write_local(t: &dyn Transport, path: &std::path::Path, bytes: &[u8]) -> Result<(), StateError> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let fail =
        |e: std::io::Error| StateError::WriteFailed { machine: t.machine().into(), code: 1, stderr: e.to_string() };
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".state.db.tmp.{}.{n}", std::process::id()));
    // The pid file goes before the rename: killed in between, the state still shows the step running (so the next
    // setup runs it again) and nothing is left behind; the other way round, a state that says "done" would keep a
    // stale pid file on a machine no later setup touches.
    let written = std::fs::write(&tmp, bytes).and_then(|()| {
        let _ = std::fs::remove_file(dir.join(".setup-step.pid"));
        std::fs::rename(&tmp, path)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    crate::util::failpoint::after("state-write");
    Ok(())
}

/// Reads the state database; `None` when the machine has none yet.
pub async fn read(t: &dyn Transport) -> Result<Option<StateDb>, StateError> {
    if let Some(p) = t.local_path(t.state_path()) {
        return parse_read(t, read_local(&p));
    }
    let script = format!("{}; {}", locate(t.state_path()), read_script());
    let out = t.exec(&script, b"", None).await?;
    parse_read(t, out)
}

/// What [`read_script`] printed, as a database: `None` when it exited [`MISSING`].
pub fn parse_read(t: &dyn Transport, out: crate::transport::ExecOutput) -> Result<Option<StateDb>, StateError> {
    let (machine, path) = (t.machine().to_string(), t.state_path().to_string());
    match out.code {
        0 if out.stdout.is_empty() => Err(StateError::Empty { machine, path }),
        0 => StateDb::from_bytes(&out.stdout).map(Some).map_err(|e| StateError::Corrupt {
            machine,
            path,
            message: match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::OutOfMemory) => {
                    format!("it is not a SQLite database ({} bytes)", out.stdout.len())
                }
                _ => e.to_string(),
            },
        }),
        MISSING => Ok(None),
        code => Err(StateError::ReadFailed { machine, path, code, stderr: out.stderr_tail }),
    }
}

fn encode(t: &dyn Transport, db: &StateDb) -> Result<Vec<u8>, StateError> {
    db.to_bytes().map_err(|e| StateError::Encode { machine: t.machine().into(), message: e.to_string() })
}

/// Shell that replaces the state database with the `len` bytes on its stdin, atomically: a temporary file of the
/// expected size, then a rename. It also clears the pid file a finished setup step leaves beside the database
/// (see `engine::actions`), before the rename, as [`write_local`] does. It sets `set -e` and a trap: run it in a
/// subshell when something follows.
fn write_script(state_path: &str, len: usize) -> String {
    // Few processes (cat, wc, mv, rm): it runs once per setup step on every machine.
    format!(
        "set -e; {locate}; [ -d \"$d\" ] || $s mkdir -p \"$d\"; t=\"$d/.state.db.tmp.$$\"; \
         trap '$s rm -f \"$t\"' EXIT; if [ -z \"$s\" ]; then cat > \"$t\"; else $s tee \"$t\" >/dev/null; fi; \
         n=$(($(wc -c < \"$t\"))); if [ \"$n\" -ne {len} ]; then exit {SHORT_WRITE}; fi; \
         $s rm -f \"$d/.setup-step.pid\"; $s mv -f \"$t\" \"$p\"; trap - EXIT",
        locate = locate(state_path),
    )
}

/// Replaces the state database atomically: a temporary file of the expected size, then a rename.
pub async fn write(t: &dyn Transport, db: &StateDb) -> Result<(), StateError> {
    let bytes = encode(t, db)?;
    if let Some(p) = t.local_path(t.state_path()) {
        return write_local(t, &p, &bytes);
    }
    let out = t.exec(&write_script(t.state_path(), bytes.len()), &bytes, None).await?;
    if out.code == 0 {
        Ok(())
    } else {
        Err(StateError::WriteFailed { machine: t.machine().into(), code: out.code, stderr: out.stderr_tail })
    }
}

/// What [`write_then`]'s script prints on stderr, and its exit code, when the database could not be written.
const WRITE_FAILED_MARK: &str = "nimbus: could not write the state database on the machine";
const WRITE_FAILED: i32 = 46;

/// Writes the database as [`write`] does, then, in the same shell (one process spawn, or one SSH channel),
/// runs `then`, which sees none of the write's variables. When the write fails, `then` does not run and the
/// error is [`StateError::WriteFailed`]; otherwise the output is `then`'s.
pub async fn write_then(
    t: &dyn Transport,
    db: &StateDb,
    then: &str,
    log: Option<&std::path::Path>,
) -> Result<crate::transport::ExecOutput, StateError> {
    let bytes = encode(t, db)?;
    if let Some(p) = t.local_path(t.state_path()) {
        write_local(t, &p, &bytes)?;
        return Ok(t.exec(then, b"", log).await?);
    }
    let script = format!(
        // Not `( … ) || …`: a shell ignores `set -e` inside the left side of `||`.
        "( {} )\nif [ $? -ne 0 ]; then echo '{WRITE_FAILED_MARK}' >&2; exit {WRITE_FAILED}; fi\n{then}",
        write_script(t.state_path(), bytes.len())
    );
    let out = t.exec(&script, &bytes, log).await?;
    if out.code == WRITE_FAILED && out.stderr_tail.contains(WRITE_FAILED_MARK) {
        return Err(StateError::WriteFailed { machine: t.machine().into(), code: out.code, stderr: out.stderr_tail });
    }
    Ok(out)
}
