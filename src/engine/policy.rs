//! Policy checks: Rego policies evaluated against the JSON plan with `regorus` (Microsoft's Rego interpreter),
//! following conftest's conventions — rules `deny`, `violation` (failures) and `warn` (warnings) in package
//! `main` or `nimbus`, each a set of messages (strings, or objects with a `msg`). The input is the plan document
//! exactly as `nimbus plan --json` prints it (Terraform-shaped: `input.resource_changes[_].change.actions`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the policies said of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PolicyReport {
    /// The policy files evaluated.
    pub files: Vec<String>,
    /// Messages of `deny`/`violation` rules: the plan must not be applied.
    #[serde(default)]
    pub denies: Vec<String>,
    /// Messages of `warn` rules.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl PolicyReport {
    pub fn denied(&self) -> bool {
        !self.denies.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy path `{path}` cannot be read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("policy path `{0}` holds no `.rego` file")]
    Empty(PathBuf),
    #[error("policy `{path}` is not valid Rego: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("evaluating the policies failed: {0}")]
    Eval(String),
}

/// The `.rego` files of `paths` (files, or folders read recursively, `_test.rego` files left out), sorted.
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| PolicyError::Read { path: p.clone(), source })?;
        if meta.is_file() {
            out.push(p.clone());
            continue;
        }
        let before = out.len();
        walk(p, &mut out)?;
        if out.len() == before {
            return Err(PolicyError::Empty(p.clone()));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PolicyError> {
    let rd = std::fs::read_dir(dir).map_err(|source| PolicyError::Read { path: dir.to_path_buf(), source })?;
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rego") && !p.to_string_lossy().ends_with("_test.rego") {
            out.push(p);
        }
    }
    Ok(())
}

/// A prepared set of policies, evaluated against any number of plans.
pub struct Policies {
    engine: regorus::Engine,
    files: Vec<String>,
    packages: Vec<String>,
}

impl Policies {
    pub fn load(paths: &[PathBuf]) -> Result<Policies, PolicyError> {
        let mut engine = regorus::Engine::new();
        let mut names = Vec::new();
        for f in files(paths)? {
            let text = std::fs::read_to_string(&f).map_err(|source| PolicyError::Read { path: f.clone(), source })?;
            engine
                .add_policy(f.display().to_string(), text)
                .map_err(|e| PolicyError::Parse { path: f.clone(), message: e.to_string() })?;
            names.push(f.display().to_string());
        }
        let packages = engine.get_packages().map_err(|e| PolicyError::Eval(e.to_string()))?;
        Ok(Policies { engine, files: names, packages })
    }

    /// Evaluates the policies against a plan document's JSON.
    pub fn evaluate(&mut self, plan_json: &str) -> Result<PolicyReport, PolicyError> {
        let eval = |e: regorus::Value| -> Vec<String> { messages(&e) };
        self.engine.set_input_json(plan_json).map_err(|e| PolicyError::Eval(e.to_string()))?;
        let mut report = PolicyReport { files: self.files.clone(), ..Default::default() };
        for pkg in ["main", "nimbus"] {
            if !self.packages.iter().any(|p| p == &format!("data.{pkg}")) {
                continue;
            }
            for (rule, deny) in [("deny", true), ("violation", true), ("warn", false)] {
                let r = self
                    .engine
                    .eval_query(format!("data.{pkg}.{rule}"), false)
                    .map_err(|e| PolicyError::Eval(format!("data.{pkg}.{rule}: {e}")))?;
                for res in r.result {
                    for ex in res.expressions {
                        let found = eval(ex.value);
                        if deny {
                            report.denies.extend(found);
                        } else {
                            report.warnings.extend(found);
                        }
                    }
                }
            }
        }
        report.denies.sort();
        report.denies.dedup();
        report.warnings.sort();
        report.warnings.dedup();
        Ok(report)
    }
}

/// The messages of a rule's value: a set or array of strings, or of objects with a `msg`.
fn messages(v: &regorus::Value) -> Vec<String> {
    let Ok(json) = v.to_json_str() else { return Vec::new() };
    let Ok(j) = serde_json::from_str::<serde_json::Value>(&json) else { return Vec::new() };
    let one = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("msg").and_then(|m| m.as_str()).map(str::to_string),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    };
    match &j {
        serde_json::Value::Array(items) => items.iter().filter_map(one).collect(),
        serde_json::Value::Bool(_) | serde_json::Value::Null => Vec::new(),
        other => one(other).into_iter().collect(),
    }
}
