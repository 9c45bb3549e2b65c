//! `nimbus plan` and `nimbus discover`.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;

use super::{CommandError, Output, build_providers, exit, parse_at, runtime};
use crate::cli::PlanArgs;
use crate::cli::views::{plan_markdown as markdown, plan_text as text};
use crate::config::{self, LoadedConfig};
use crate::core::model::{Actual, Desired, INVENTORY_FORMAT_VERSION, Inventory};
use crate::core::plan::document::PlanDocument;
use crate::providers::Provider;

/// Discovers what exists for the fleet's tenant.
pub fn observe(loaded: &LoadedConfig) -> Result<(Actual, Vec<crate::core::plan::Warning>), CommandError> {
    runtime().block_on(async {
        let providers = build_providers(loaded, crate::engine::clients::Purpose::Look).await?;
        let forge = super::build_forge(loaded)?;
        let actual = observe_with(loaded, &providers, forge.as_deref()).await?;
        Ok((actual, super::clock_warnings(&providers)))
    })
}

/// Discovers with providers and forge already built.
pub async fn observe_with(
    loaded: &LoadedConfig,
    providers: &[Arc<dyn Provider>],
    forge: Option<&dyn crate::forges::Forge>,
) -> Result<Actual, CommandError> {
    Ok(crate::engine::discovery::discover_with_forge(&loaded.config.tenant, providers, forge).await?)
}

fn read_inventory(path: &Path, tenant: &str) -> Result<Inventory, CommandError> {
    let text = std::fs::read_to_string(path).map_err(|source| CommandError::Io {
        what: "read inventory",
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        CommandError::usage(
            format!("`{}` is not a nimbus inventory: {e}", path.display()),
            "record one with `nimbus discover -f fleet.yaml -o inventory.json`",
        )
    })?;
    // At the door: the published schema, with the JSON path of the first error.
    crate::core::plan::document::check_against(&crate::core::model::inventory_schema_text(), &value).map_err(|m| {
        CommandError::usage(
            format!("`{}` does not match the inventory schema {m}", path.display()),
            "record it again with `nimbus discover -o FILE`; an inventory is not edited by hand",
        )
    })?;
    let inv: Inventory = serde_json::from_value(value).map_err(|e| {
        CommandError::usage(
            format!("`{}` is not a nimbus inventory: {e}", path.display()),
            "record one with `nimbus discover -f fleet.yaml -o inventory.json`",
        )
    })?;
    if inv.format_version.split('.').next() != INVENTORY_FORMAT_VERSION.split('.').next() {
        return Err(CommandError::usage(
            format!(
                "inventory format {} is not supported (this nimbus reads {INVENTORY_FORMAT_VERSION})",
                inv.format_version
            ),
            "record it again with this version of `nimbus discover`",
        ));
    }
    if inv.tenant != tenant {
        return Err(CommandError::usage(
            format!(
                "inventory `{}` was recorded for tenant `{}`, but the fleet file is for `{tenant}`",
                path.display(),
                inv.tenant
            ),
            "plan with the inventory of the same tenant",
        ));
    }
    Ok(inv)
}

/// Builds the plan document for a loaded fleet file.
pub fn build_document(loaded: &LoadedConfig, args: &PlanArgs) -> Result<PlanDocument, CommandError> {
    let now = Utc::now();
    let at = match &args.at {
        Some(s) => parse_at(s, now)?,
        None => now,
    };
    let mut clock = Vec::new();
    let mut journal = None;
    let (actual, source) = match &args.inventory {
        Some(p) => (read_inventory(p, &loaded.config.tenant)?.actual, "inventory"),
        None => {
            let (mut actual, warnings) = observe(loaded)?;
            clock = warnings;
            // Since when runners have been offline and machines unreachable: the journal remembers.
            // A plan that cannot write the journal (a read-only checkout) still plans; it only cannot tell
            // how long something has been offline, so it repairs nothing for that yet.
            // With remote state, the copy last uploaded is read: a plan takes no lock.
            let noted = super::read_journal(loaded, None).and_then(|j| match j {
                Some(r) => {
                    let done = crate::engine::discovery::annotate_with_history(&mut actual, &r.journal, now)
                        .map_err(CommandError::from);
                    journal = Some(r);
                    done
                }
                None => Ok(()),
            });
            if let Err(e) = noted {
                errln!(
                    "warning: {}; offline runners and unreachable machines are not timed in this plan",
                    crate::util::text::terminal(&e.to_string())
                );
            }
            (actual, "discovery")
        }
    };
    let mut desired = Desired::from_config(&loaded.config);
    desired.interrupt_jobs = args.interrupt_jobs;
    // Pools that follow demand: sized from the forge's queued jobs, as the controller sizes them (an inventory
    // has no jobs and no idle clocks: nothing is removed for demand then).
    let forge = match (&args.inventory, desired.pools.iter().any(|p| p.scale.is_some())) {
        (None, true) => super::build_forge(loaded)?,
        _ => None,
    };
    let demand =
        runtime().block_on(crate::engine::fleet::follow_demand(loaded, &mut desired, &actual, forge.as_deref(), at))?;
    let mut doc = super::document(loaded, &desired, &actual, at, source);
    // How changed setup scripts changed: from what last ran on each machine, and from the trusted base.
    let base = match &args.trusted_base {
        Some(b) => Some(config::load(b)?.config),
        None => None,
    };
    crate::engine::fleet::add_script_diffs(
        &mut doc,
        &desired,
        &actual,
        journal.as_ref().map(|r| &r.journal),
        base.as_ref(),
    );
    doc.warnings.extend(clock);
    doc.warnings.extend(demand);
    // With the controller in use, say which changes it leaves for a person.
    if loaded.config.reconcile.is_some() || loaded.config.pools.iter().any(|p| p.scale.is_some()) {
        let policy = crate::engine::reconcile::Policy::from_config(loaded.config.reconcile.as_ref());
        doc.pending_review = crate::engine::reconcile::split(&doc, &policy).1.into_iter().map(|c| c.address).collect();
    }
    Ok(doc)
}

pub fn plan(args: &PlanArgs, out: Output) -> Result<u8, CommandError> {
    let loaded = config::load(&args.fleet.file)?;
    // Before anything else: an untrusted file must not choose what runs or where credentials go.
    if let Some(base) = &args.trusted_base {
        config::check_trusted(&loaded, &config::load(base)?)?;
    }
    for w in config::warnings(&loaded.config) {
        errln!("warning: {w}");
    }
    let mut doc = build_document(&loaded, args)?;
    crate::engine::fleet::check_policies(&loaded, &args.policy, &mut doc).map_err(|e| {
        CommandError::usage(e.to_string(), "fix the policy file, or the path given to --policy / policy.paths")
    })?;
    if args.json {
        out!("{}", doc.to_json());
    } else if args.markdown {
        out!("{}", markdown::render(&doc));
    } else {
        out!("{}", text::render(&doc, text::Style { color: out.stdout_color }));
    }
    if let Some(path) = &args.out {
        // The saved plan carries the fleet file it was made from: apply plans again from it.
        crate::core::plan::planfile::write(path, &doc, &loaded.source)?;
        errln!("Saved the plan to `{}`. Apply it with `nimbus apply {}`.", path.display(), path.display());
    }
    if let Some(p) = doc.policy.as_ref().filter(|p| p.denied()) {
        return Err(CommandError::usage(
            format!("the policies deny this plan: {}", p.denies.join("; ")),
            "change the fleet file (or the policy) until no `deny` rule fires; `apply` refuses a denied plan",
        ));
    }
    let unchecked = doc.unchecked();
    if args.detailed_exitcode && !unchecked.is_empty() {
        // "No changes" (0) or "changes" (2) cannot be known while part of the fleet went unchecked: an error.
        return Err(CommandError::usage(
            format!(
                "{} part(s) of the fleet could not be checked: {}",
                unchecked.len(),
                unchecked.iter().map(|w| format!("{}: {}", w.address, w.message)).collect::<Vec<_>>().join("; ")
            ),
            "fix what the warnings name (network, SSH host key, damaged records) and plan again; \
             with --detailed-exitcode an unchecked machine is an error (exit 1), never \"no changes\"",
        ));
    }
    Ok(if args.detailed_exitcode && (doc.has_changes() || doc.drift_pending()) { exit::CHANGES } else { exit::OK })
}
