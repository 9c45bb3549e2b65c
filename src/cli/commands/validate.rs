//! `nimbus validate`: checks a fleet file; no network.

use std::path::Path;

use super::{CommandError, exit};
use crate::config;

pub fn validate(file: &Path) -> Result<u8, CommandError> {
    let loaded = config::load(file)?;
    for w in config::warnings(&loaded.config) {
        errln!("warning: {w}");
    }
    errln!(
        "`{}` is valid: tenant `{}`, {} pool(s), {} machine(s).",
        file.display(),
        loaded.config.tenant,
        loaded.config.pools.len(),
        loaded
            .config
            .pools
            .iter()
            .map(|p| u64::from(p.count.or(p.scale.as_ref().map(|s| s.min)).unwrap_or(0)))
            .sum::<u64>()
    );
    Ok(exit::OK)
}
