//! `nimbus discover`: records what exists, for `plan --inventory`.

use chrono::Utc;

use super::plan::observe;
use super::{CommandError, exit};
use crate::cli::DiscoverArgs;
use crate::config;
use crate::core::model::{INVENTORY_FORMAT_VERSION, Inventory};

pub fn discover(args: &DiscoverArgs) -> Result<u8, CommandError> {
    let loaded = config::load(&args.fleet.file)?;
    let (actual, _) = observe(&loaded)?;
    let inv = Inventory {
        format_version: INVENTORY_FORMAT_VERSION.into(),
        tenant: loaded.config.tenant.clone(),
        observed_at: Utc::now(),
        actual,
    };
    let mut json = serde_json::to_string_pretty(&inv).expect("inventory serialises");
    json.push('\n');
    if args.output.as_os_str() == "-" {
        out!("{json}");
    } else {
        std::fs::write(&args.output, json).map_err(|source| CommandError::Io {
            what: "write inventory",
            path: args.output.clone(),
            source,
        })?;
        errln!(
            "Recorded {} machine(s) and {} host(s) of tenant `{}` in `{}`.",
            inv.actual.machines.len(),
            inv.actual.hosts.len(),
            inv.tenant,
            args.output.display()
        );
    }
    Ok(exit::OK)
}
