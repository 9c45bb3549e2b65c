//! Pools: which machines stay, which go (scale-down order, moved and removed pools), which are created.

use std::collections::{BTreeSet, HashSet};

use super::reason::{ChangeReason, ReplaceCause};
use super::*;
use crate::core::model::*;

impl<'a> Builder<'a> {
    pub(super) fn run(&mut self) {
        let desired = self.desired;
        let mut pools: Vec<&DesiredPool> = desired.pools.iter().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        // Hosts that kept machines run on are not idle.
        for p in &pools {
            for m in self.by_pool.get(p.name.as_str()).into_iter().flatten() {
                if let Some(h) = &m.host_id {
                    self.claimed_hosts.insert(h.clone());
                }
            }
        }
        let wanted: BTreeSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();

        // Destroy orphans first, so the hosts they free are accounted for.
        let orphan_pools: Vec<&str> = self.by_pool.keys().copied().filter(|p| !wanted.contains(p)).collect();
        for pool in orphan_pools {
            let ms = self.by_pool.get(pool).cloned().unwrap_or_default();
            for m in ms {
                self.destroy(m, ChangeReason::PoolRemoved { pool: pool.to_string() });
            }
        }
        for p in pools {
            self.plan_pool(p);
        }
        self.ghost_runners();
        self.idle_hosts();
    }

    pub(super) fn plan_pool(&mut self, pool: &'a DesiredPool) {
        let existing: Vec<&'a ActualMachine> = self.by_pool.get(pool.name.as_str()).cloned().unwrap_or_default();
        let (same_provider, moved): (Vec<_>, Vec<_>) = existing.into_iter().partition(|m| m.provider == pool.provider);
        for m in moved {
            let cause = ChangeReason::PoolMoved {
                pool: pool.name.clone(),
                from: m.provider.clone(),
                to: pool.provider.clone(),
            };
            self.destroy(m, cause);
        }

        // Which machines stay: see the order below.
        let mut ranked: Vec<(&'a ActualMachine, Option<Replacement>)> =
            same_provider.into_iter().map(|m| (m, self.replacement_reason(pool, m))).collect();
        let count = pool.count as usize;
        let mut removed = Vec::new();
        if ranked.len() > count {
            let mut order: Vec<usize> = (0..ranked.len()).collect();
            order.sort_by_key(|&i| {
                let (m, repl) = &ranked[i];
                // Idle machines go first; then those needing replacement anyway, then those whose hosts can be
                // released now, then the highest indexes.
                (
                    m.name().is_some_and(|n| self.busy(n)),
                    repl.is_none(),
                    !self.host_releasable_now(m.host_id.as_deref()),
                    std::cmp::Reverse(machine_index(m)),
                )
            });
            let drop: HashSet<usize> = order.into_iter().take(ranked.len() - count).collect();
            let mut keep = Vec::new();
            for (i, r) in ranked.into_iter().enumerate() {
                if drop.contains(&i) { removed.push(r.0) } else { keep.push(r) }
            }
            ranked = keep;
        }
        let total = ranked.len() + removed.len();
        for m in removed {
            self.destroy(m, ChangeReason::ScaleDown { pool: pool.name.clone(), from: total, to: pool.count });
        }
        let mut used: BTreeSet<u32> = ranked.iter().filter_map(|(m, _)| machine_index(m)).collect();
        // Unusable machines of this pool exist: they count, and their names stay theirs.
        let held: BTreeSet<u32> = self.occupied.get(&pool.name).cloned().unwrap_or_default();
        let held_only = held.difference(&used).count();
        used.extend(held);
        // Other fleets' machines of a pool of the same name keep their names, and do not count here.
        used.extend(self.reserved.get(&pool.name).cloned().unwrap_or_default());
        for (m, repl) in ranked.iter().cloned() {
            match repl {
                Some(causes) => self.replace(pool, m, causes),
                None => self.converge(pool, m),
            }
        }
        let mut missing = count.saturating_sub(ranked.len() + held_only);
        // Another fleet file of the tenant has machines in a pool of this name: it may be this very fleet under
        // another id (a moved file, a checkout without git), so nothing is created here (a Mac host costs a day);
        // the plan's warning says how to settle it.
        if missing > 0 && self.reserved.get(&pool.name).is_some_and(|r| !r.is_empty()) {
            missing = 0;
        }
        let mut next = 0u32;
        for _ in 0..missing {
            while used.contains(&next) {
                next += 1;
            }
            used.insert(next);
            self.create(pool, next, ChangeReason::PoolWants { pool: pool.name.clone(), count: pool.count });
        }
    }

    /// Why a kept machine must be replaced.
    pub(super) fn replacement_reason(&self, pool: &DesiredPool, m: &ActualMachine) -> Option<Replacement> {
        let s = &pool.spec;
        let mut why = Vec::new();
        if m.image != s.image {
            why.push(ReplaceCause::Image { from: m.image.clone(), to: s.image.clone() });
        }
        if s.instance_type.is_some() && m.instance_type != s.instance_type {
            why.push(ReplaceCause::InstanceType { from: m.instance_type.clone(), to: s.instance_type.clone() });
        }
        if s.availability_zone.is_some() && !s.allows_zone(m.availability_zone.as_deref()) {
            why.push(ReplaceCause::AvailabilityZone {
                from: m.availability_zone.clone(),
                to: s.availability_zone.clone(),
            });
        }
        if matches!(m.state, InstanceState::Stopped | InstanceState::Stopping) {
            why.push(ReplaceCause::Stopped);
        }
        // An ephemeral runner's job is over and the provider cannot reimage this machine in place: a fresh one.
        let in_place = self.desired.providers[&pool.provider].reimages_in_place(pool.spec.instance_type.as_deref());
        if self.ephemeral_job_done(pool, m) && !in_place {
            why.push(ReplaceCause::JobDone);
        }
        // Unreachable for longer than the grace period, and no sign of life from its runner either.
        let grace = pool.runner.as_ref().map(|r| r.offline_grace).unwrap_or(DEFAULT_OFFLINE_GRACE);
        let runner_online = m.name().and_then(|n| self.runner(n)).is_some_and(|r| r.online);
        if let (OnMachine::Unreachable { .. }, Some(since)) = (&m.on_machine, m.unreachable_since)
            && since + chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX) <= self.now
            && !runner_online
        {
            why.push(ReplaceCause::Unreachable { since });
        }
        if why.is_empty() { None } else { Some(why) }
    }
}
