//! The saved plan (`nimbus plan -out FILE`, `nimbus apply FILE`): the JSON plan document plus the fleet file
//! it was made from.
//!
//! A saved plan is never obeyed as written. [`check`] refuses one that is stale (the fleet file or the
//! observed world changed), made as of the future, or whose actions differ from what nimbus plans again,
//! now, from the same fleet file and the same world as of the plan's time: an edited plan is refused.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::document::{PLAN_FORMAT_VERSION, PlanDocument};

/// A saved plan made "as of" a time later than this is refused: it could release hosts early.
pub const FUTURE_SKEW: chrono::Duration = chrono::Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum PlanfileError {
    #[error("cannot read plan `{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write plan `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a nimbus plan: {message}")]
    NotAPlan { path: PathBuf, message: String },
    #[error("plan format {found} is not supported (this nimbus writes {PLAN_FORMAT_VERSION})")]
    Unsupported { found: String },
    #[error("stale plan: {0}")]
    Stale(String),
    #[error("the plan was made as of {0}, which is in the future")]
    Future(String),
    #[error("refusing to apply the saved plan: {0}")]
    Tampered(String),
}

impl PlanfileError {
    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            PlanfileError::Read { .. } | PlanfileError::Write { .. } => "check the path and its permissions",
            PlanfileError::NotAPlan { .. } => "save one with `nimbus plan -out FILE`",
            PlanfileError::Unsupported { .. } => "plan again with this nimbus",
            PlanfileError::Stale(_) => "run `nimbus plan -out FILE` again and apply the new plan",
            PlanfileError::Future(_) => "a plan made with `--at` is for review only; plan without `--at` to apply",
            PlanfileError::Tampered(_) => {
                "a saved plan is carried out only as nimbus plans it; run `nimbus plan -out FILE` again and apply that file unedited"
            }
        }
    }
}

/// Writes `doc` with the fleet file's text to `path`.
pub fn write(path: &Path, doc: &PlanDocument, fleet_source: &str) -> Result<(), PlanfileError> {
    let mut saved = doc.clone();
    if let Some(f) = saved.fleet.as_mut() {
        f.content = Some(fleet_source.to_string());
    }
    std::fs::write(path, saved.to_json()).map_err(|source| PlanfileError::Write { path: path.into(), source })
}

/// Reads a saved plan.
pub fn load(path: &Path) -> Result<PlanDocument, PlanfileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlanfileError::Read { path: path.into(), source })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PlanfileError::NotAPlan { path: path.into(), message: e.to_string() })?;
    // At the door: the published schema first, so a hand-edited file is refused with the JSON path of its error.
    if let Some(v) = value.get("format_version").and_then(|v| v.as_str())
        && v.split('.').next() != PLAN_FORMAT_VERSION.split('.').next()
    {
        return Err(PlanfileError::Unsupported { found: v.to_string() });
    }
    super::document::check_against(&super::document::schema_text(), &value).map_err(|message| {
        PlanfileError::NotAPlan { path: path.into(), message: format!("it does not match the plan schema {message}") }
    })?;
    let doc: PlanDocument = serde_json::from_value(value)
        .map_err(|e| PlanfileError::NotAPlan { path: path.into(), message: e.to_string() })?;
    if doc.format_version.split('.').next() != PLAN_FORMAT_VERSION.split('.').next() {
        return Err(PlanfileError::Unsupported { found: doc.format_version });
    }
    Ok(doc)
}

/// What the saved plan is checked against.
pub struct Current<'a> {
    /// sha256 of the fleet file as it is now, and where it is.
    pub fleet_sha256: &'a str,
    pub fleet_path: &'a Path,
    /// Fingerprint of the world as discovered now.
    pub fingerprint: &'a str,
    pub now: DateTime<Utc>,
}

/// Checks a saved plan and returns the plan to carry out: `replan(at)` plans again from the fleet file and
/// the current world as of `at`; the result must equal the saved plan.
pub fn check(
    saved: &PlanDocument,
    current: &Current,
    replan: impl FnOnce(DateTime<Utc>) -> PlanDocument,
) -> Result<PlanDocument, PlanfileError> {
    let sha = |s: &str| crate::core::model::sha256_hex(s.as_bytes());
    if saved.fleet.as_ref().map(|f| f.sha256.as_str()) != Some(current.fleet_sha256) {
        return Err(PlanfileError::Stale(format!(
            "`{}` changed since the plan was made",
            current.fleet_path.display()
        )));
    }
    if let Some(content) = saved.fleet.as_ref().and_then(|f| f.content.as_deref())
        && sha(content) != current.fleet_sha256
    {
        return Err(PlanfileError::Tampered("the fleet file stored in it does not match its own checksum".into()));
    }
    if saved.observed.as_ref().map(|o| o.fingerprint.as_str()) != Some(current.fingerprint) {
        return Err(PlanfileError::Stale(
            "the fleet's machines, hosts or runners changed since the plan was made".into(),
        ));
    }
    if saved.planned_at > current.now + FUTURE_SKEW {
        return Err(PlanfileError::Future(crate::util::time::ts(&saved.planned_at)));
    }
    // Never carry out the file's actions as written: plan again (the planner is deterministic) and go on only
    // if the result is identical.
    let fresh = replan(saved.planned_at);
    if fresh.tenant != saved.tenant {
        return Err(PlanfileError::Tampered(format!(
            "it names tenant `{}`, but the fleet file is for tenant `{}`",
            saved.tenant, fresh.tenant
        )));
    }
    if fresh.actions != saved.actions || fresh.resource_changes != saved.resource_changes {
        return Err(PlanfileError::Tampered(
            "its actions differ from what nimbus plans for the same fleet file and the same fleet".into(),
        ));
    }
    Ok(fresh)
}
