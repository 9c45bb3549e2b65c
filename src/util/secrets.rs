//! Reading secrets named in the fleet file (`{env: VAR}` / `{file: path}`).
//! The values are returned to the caller only; they are never logged,
//! rendered or stored.

use std::path::{Path, PathBuf};

use crate::config::SecretRef;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret `{what}`: environment variable `{var}` is not set")]
    MissingEnv { what: String, var: String },
    #[error("secret `{what}`: cannot read `{path}`: {source}")]
    File {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Expands a leading `~/` to the home folder.
pub fn expand_home(p: &Path) -> PathBuf {
    match p.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        Err(_) => p.to_path_buf(),
    }
}

/// Reads a secret. `base` resolves relative file paths (the fleet file's folder).
pub fn read(what: &str, r: &SecretRef, base: &Path) -> Result<String, SecretError> {
    match r {
        SecretRef::Env(var) => {
            std::env::var(var).map_err(|_| SecretError::MissingEnv { what: what.into(), var: var.clone() })
        }
        SecretRef::File(p) => {
            let p = expand_home(p);
            let path = if p.is_absolute() { p } else { base.join(p) };
            std::fs::read_to_string(&path).map_err(|source| SecretError::File { what: what.into(), path, source })
        }
    }
}
