//! Runners: ghost runners (registered, named for this tenant, with no machine) and label comparison.

use std::collections::BTreeSet;

use rustc_hash::FxHashSet as HashSet;

use super::attrs::{Attrs, RunnerAttrs};
use super::model::*;
use super::reason::ChangeReason;
use super::*;
use crate::core::model::*;

impl<'a> Builder<'a> {
    /// Runners that carry this tenant's names but have no machine.
    pub(super) fn ghost_runners(&mut self) {
        let Some(runners) = &self.runners else { return };
        let tenant = self.desired.tenant.as_str();
        // Runners no chain handled (every kept machine's is): few, so the set of live names is made only for them.
        let unhandled: Vec<&'a ForgeRunner> = runners
            .values()
            .copied()
            .filter(|r| !self.runners_handled.contains(r.name.as_str()))
            .filter(|r| parse_machine_name(&r.name).is_some_and(|(t, _, _)| t == tenant))
            .collect();
        if unhandled.is_empty() {
            return;
        }
        // A runner whose machine exists is never a ghost, even when that machine is unreachable.
        let live: HashSet<&str> = self.by_pool.values().flatten().filter_map(|m| m.name()).collect();
        let mut ghosts: Vec<&'a ForgeRunner> = unhandled
            .into_iter()
            .filter(|r| !live.contains(r.name.as_str()))
            // Another fleet file's machine has this runner: not a ghost, not ours.
            .filter(|r| !self.other_fleet_names.contains(&r.name))
            // Nor is a runner of a pool this fleet never declared nor acted on (another fleet file's, on providers
            // this one cannot see).
            .filter(|r| {
                let pool = parse_machine_name(&r.name).map(|(_, p, _)| p).unwrap_or_default();
                self.known_pools
                    .as_ref()
                    .is_none_or(|k| k.contains(pool) || self.desired.pools.iter().any(|p| p.name == pool))
            })
            .collect();
        ghosts.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        for r in ghosts {
            let addr = String::from(Address::runner(&r.name));
            if self.must_wait_for_job(&r.name) {
                let a = ActionKind::DeregisterRunner { runner_id: r.id, runner_name: r.name.clone() };
                self.defer_for_job(&addr, &r.name, a, "then the runner, which has no machine, is removed");
                continue;
            }
            let id =
                self.add(&addr, ActionKind::DeregisterRunner { runner_id: r.id, runner_name: r.name.clone() }, &[]);
            let subject = Subject {
                address: addr,
                kind: ResourceKind::Runner,
                name: r.name.clone(),
                pool: parse_machine_name(&r.name).map(|(_, p, _)| p.to_string()),
            };
            let before = Attrs::from(RunnerAttrs { id: r.id, labels: r.labels.clone(), online: r.online });
            self.changes.push(ResourceChange::delete(subject, ChangeReason::GhostRunner, before, vec![id]));
        }
    }
}

/// Forge labels compare case-insensitively and as sets.
pub(super) fn same_labels(a: &[String], b: &[String]) -> bool {
    // The common case (nothing changed) without allocating.
    if a == b {
        return true;
    }
    let norm = |v: &[String]| v.iter().map(|s| s.to_lowercase()).collect::<BTreeSet<_>>();
    norm(a) == norm(b)
}
