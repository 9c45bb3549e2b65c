//! Dedicated hosts: reuse of idle hosts (never promised twice), allocation with its exclusion list, and
//! releases, deferred while inside the provider's minimum allocation window or while scrubbing.

use chrono::{DateTime, Utc};

use super::attrs::{Attrs, HostAttrs};
use super::model::*;
use super::reason::ChangeReason;
use super::*;
use crate::core::model::*;

impl<'a> Builder<'a> {
    pub(super) fn host_releasable_now(&self, host_id: Option<&str>) -> bool {
        match host_id.and_then(|h| self.hosts.get(h)) {
            Some(h) => window_end(self.desired, h) <= self.now,
            None => true,
        }
    }

    /// Allocates (or reuses) a host when the pool needs one. Returns the host ref and the actions to wait for.
    pub(super) fn host_for(
        &mut self,
        pool: &DesiredPool,
        name: &str,
        addr: &str,
    ) -> (Option<HostRef>, Vec<usize>, Option<String>) {
        let provider = &self.desired.providers[&pool.provider];
        if !provider.needs_host(pool.spec.instance_type.as_deref()) {
            return (None, Vec::new(), None);
        }
        let itype = pool.spec.instance_type.clone().unwrap_or_default();
        let az = pool.spec.availability_zone.clone().unwrap_or_default();
        let zones = if pool.spec.zones().is_empty() { vec![az.clone()] } else { pool.spec.zones() };
        let kinds: Vec<(String, String, String)> =
            zones.iter().map(|z| (pool.provider.clone(), itype.clone(), z.clone())).collect();
        // An idle host left tagged for this very machine (a killed apply allocated it) comes first.
        let tagged = self.hosts_by_machine_tag.get(name).into_iter().flat_map(HostIds::iter).find(|id| {
            !self.claimed_hosts.contains(*id)
                && kinds.iter().any(|k| self.idle_by_kind.get(k).is_some_and(|v| v.iter().any(|x| x == id)))
        });
        // Then an idle host of the same type, in the pool's zones in order; the one allocated last (the most
        // paid-for time left).
        let mut idle: Option<&'a str> = tagged;
        for kind in &kinds {
            if idle.is_some() {
                break;
            }
            idle = self.idle_by_kind.get_mut(kind).and_then(|v| {
                while let Some(id) = v.pop() {
                    if !self.claimed_hosts.contains(id) {
                        return Some(id);
                    }
                }
                None
            });
        }
        if let Some(id) = idle {
            self.claimed_hosts.insert(id);
            return (Some(HostRef::Existing { host_id: id.to_string() }), Vec::new(), Some(id.to_string()));
        }
        let a = self.add(
            addr,
            ActionKind::AllocateHost {
                provider: pool.provider.clone(),
                pool: pool.name.clone(),
                machine: name.to_string(),
                instance_type: itype,
                availability_zone: az,
                fallback_zones: pool.spec.fallback_zones.clone(),
                exclude_hosts: {
                    let mut v: Vec<String> = self
                        .hosts_by_machine_tag
                        .get(name)
                        .into_iter()
                        .flat_map(HostIds::iter)
                        .map(str::to_string)
                        .collect();
                    v.sort();
                    v
                },
            },
            &[],
        );
        (Some(HostRef::Allocated { action: a }), vec![a], Some("(new dedicated host)".to_string()))
    }

    /// Releases a host after `after` when its release policy says so now; otherwise defers it, saying why it is
    /// kept and when it goes, with the money either way.
    pub(super) fn release_or_defer(&mut self, host_id: &str, after: &[usize], ids: &mut Vec<usize>) {
        let Some(h) = self.hosts.get(host_id).copied() else { return };
        self.claimed_hosts.insert(h.id.as_str());
        let window = window_end(self.desired, h);
        let addr = String::from(Address::host(&h.id));
        let kind = ActionKind::ReleaseHost { provider: h.provider.clone(), host_id: h.id.clone() };
        let per_day = self
            .desired
            .price(&h.provider, &h.instance_type)
            .map(|p| crate::core::cost::money(p * 24.0))
            .unwrap_or_else(|| "an unpriced amount".into());
        let policy = self.desired.release_policy(h).describe();
        match crate::core::cost::release_decision(self.desired, h, self.now) {
            Err(why) if h.allocated_at == UNKNOWN_ALLOCATION => self.deferred.push(Deferred {
                address: addr,
                action: kind,
                due_at: None,
                reason: format!(
                    "the host reports no allocation time, so its window cannot be known: nimbus never releases it \
                     (release it by hand once you know its window has passed); {why}"
                ),
                kind: DeferredKind::AllocationWindow,
            }),
            Err(why) => self.deferred.push(Deferred {
                address: addr,
                action: kind,
                due_at: None,
                reason: format!("{why}; it costs {per_day}/day while idle"),
                kind: DeferredKind::HeldByPolicy,
            }),
            Ok(due) if window > self.now => self.deferred.push(Deferred {
                address: addr,
                action: kind,
                due_at: Some(due),
                reason: format!(
                    "host allocated at {} is inside its minimum allocation window (paid until {}): kept for demand at no extra cost; released at {} if still idle (hosts.release: {policy}), saving {per_day}/day",
                    h.allocated_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    crate::util::time::ts(&window),
                    crate::util::time::ts(&due),
                ),
                kind: DeferredKind::AllocationWindow,
            }),
            Ok(due) if due > self.now => self.deferred.push(Deferred {
                address: addr,
                action: kind,
                due_at: Some(due),
                reason: format!(
                    "past its minimum allocation window; hosts.release: {policy} keeps it until {} ({per_day}/day while idle)",
                    crate::util::time::ts(&due)
                ),
                kind: DeferredKind::HeldByPolicy,
            }),
            Ok(_) => ids.push(self.add(&addr, kind, after)),
        }
    }

    /// Whether `budget:` lets the pool allocate one more host (or launch one more instance) now; when not, the
    /// machine's creation is deferred with the reason and `false` is returned. Counts what it allows.
    pub(super) fn budget_allows(&mut self, pool: &DesiredPool, name: &str, addr: &str) -> bool {
        let itype = pool.spec.instance_type.clone().unwrap_or_default();
        let provider = &self.desired.providers[&pool.provider];
        let needs_host = provider.needs_host(Some(itype.as_str())) && !self.has_usable_idle_host(pool);
        let billing = self.desired.billing(&pool.provider, &itype);
        let commits = if needs_host || !provider.needs_host(Some(itype.as_str())) {
            self.desired.price(&pool.provider, &itype).map(|p| p * billing.billed_hours(std::time::Duration::ZERO))
        } else {
            Some(0.0)
        };
        let budget = &self.desired.budget;
        let over_hosts = needs_host
            && budget
                .max_hosts
                .get(&itype)
                .is_some_and(|max| self.hosts_per_type.get(&itype).copied().unwrap_or(0) >= *max);
        let over_money =
            budget.max_commit_per_plan.is_some_and(|max| self.committed + commits.unwrap_or(0.0) > max + 1e-9);
        if !over_hosts && !over_money {
            if needs_host {
                *self.hosts_per_type.entry(itype).or_default() += 1;
            }
            self.committed += commits.unwrap_or(0.0);
            return true;
        }
        let reason = if over_hosts {
            format!(
                "budget.max_hosts allows {} `{itype}` hosts and {} are held or planned: this machine's host is not allocated (raise the budget, or free a host)",
                budget.max_hosts[&itype],
                self.hosts_per_type.get(&itype).copied().unwrap_or(0)
            )
        } else {
            format!(
                "budget.max_commit_per_plan is {}: this plan already commits {}, and this machine would commit {} more; it waits for the next plan",
                crate::core::cost::money(budget.max_commit_per_plan.unwrap_or(0.0)),
                crate::core::cost::money(self.committed),
                crate::core::cost::money(commits.unwrap_or(0.0))
            )
        };
        self.deferred.push(Deferred {
            address: addr.to_string(),
            action: if needs_host {
                ActionKind::AllocateHost {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.to_string(),
                    instance_type: itype,
                    availability_zone: pool.spec.availability_zone.clone().unwrap_or_default(),
                    fallback_zones: pool.spec.fallback_zones.clone(),
                    exclude_hosts: Vec::new(),
                }
            } else {
                ActionKind::LaunchInstance {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.to_string(),
                    spec: pool.spec.clone(),
                    host: None,
                }
            },
            due_at: None,
            reason,
            kind: DeferredKind::Budget,
        });
        false
    }

    /// Owned hosts with no instance that nothing claimed: release when due, else defer.
    pub(super) fn idle_hosts(&mut self) {
        let mut idle: Vec<&'a Host> = self
            .hosts
            .values()
            .copied()
            .filter(|h| h.instance_ids.is_empty() && !self.claimed_hosts.contains(h.id.as_str()))
            .collect();
        idle.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        for h in idle {
            let addr = String::from(Address::host(&h.id));
            let due = window_end(self.desired, h);
            // A second host tagged for a machine that runs on another host (a replacement's old host, or a copy):
            // one name, one host. It is not that machine's; it is reused or goes by the window rules like any idle
            // host, and the plan says so.
            let copy_of = h.tags.get(tags::MACHINE).filter(|name| {
                self.live_machines.iter().any(|m| m.name() == Some(name) && m.host_id.as_deref() != Some(h.id.as_str()))
            });
            if let Some(name) = copy_of
                && !(h.state == HostState::Available && window_end(self.desired, h) <= self.now)
            {
                self.warnings.push(Warning {
                    address: addr.clone(),
                    message: format!(
                        "host `{}` is a second host tagged for `{name}`, which runs on another: it is idle, reused by a machine that needs a host or released once its minimum allocation window ends ({})",
                        h.id,
                        crate::util::time::ts(&due)
                    ),
                    kind: WarningKind::Other,
                });
            }
            match h.state {
                HostState::Available => {
                    let mut ids = Vec::new();
                    self.release_or_defer(&h.id, &[], &mut ids);
                    if !ids.is_empty() {
                        let subject = Subject {
                            address: addr,
                            kind: ResourceKind::Host,
                            name: h.id.clone(),
                            pool: h.tags.get(tags::POOL).map(str::to_string),
                        };
                        let before = Attrs::from(HostAttrs {
                            instance_type: h.instance_type.clone(),
                            availability_zone: h.availability_zone.clone(),
                            state: h.state,
                            allocated_at: h.allocated_at,
                        });
                        let mut change = ResourceChange::delete(subject, ChangeReason::IdleHost, before, ids);
                        // The money either way: what keeping it would cost, which releasing it saves.
                        let per_day = self.desired.price(&h.provider, &h.instance_type).map(|p| p * 24.0);
                        change.reason = format!(
                            "{} (hosts.release: {}): releasing it saves {}",
                            change.reason,
                            self.desired.release_policy(h).describe(),
                            per_day
                                .map(|d| format!("{}/day", crate::core::cost::money(d)))
                                .unwrap_or_else(|| "its unpriced cost".into())
                        );
                        self.changes.push(change);
                    }
                }
                HostState::Pending => self.deferred.push(Deferred {
                    address: addr,
                    action: ActionKind::ReleaseHost { provider: h.provider.clone(), host_id: h.id.clone() },
                    due_at: Some(due).filter(|d| *d > self.now),
                    reason: "host is being scrubbed; it can be reused or released once it is available".into(),
                    kind: DeferredKind::Scrubbing,
                }),
                HostState::UnderAssessment | HostState::PermanentFailure => self.warnings.push(Warning {
                    address: addr,
                    message: format!("host `{}` is {:?}; nimbus leaves it to the provider", h.id, h.state),
                    kind: WarningKind::Other,
                }),
                HostState::Released => {}
            }
        }
    }

    fn host_policy_of(&self, host_id: &str) -> Option<&'a HostPolicy> {
        let h = self.hosts.get(host_id)?;
        self.desired.providers.get(&h.provider)?.capabilities.host_policy(&h.instance_type)
    }

    /// Whether an idle, usable host of the pool's kind is waiting to be reused.
    pub(super) fn has_usable_idle_host(&self, pool: &DesiredPool) -> bool {
        if self.idle_by_kind.is_empty() {
            return false;
        }
        let itype = pool.spec.instance_type.clone().unwrap_or_default();
        let mut zones = pool.spec.zones();
        if zones.is_empty() {
            zones.push(String::new());
        }
        zones.into_iter().any(|z| {
            self.idle_by_kind
                .get(&(pool.provider.clone(), itype.clone(), z))
                .is_some_and(|v| v.iter().any(|id| !self.claimed_hosts.contains(id)))
        })
    }

    /// The host tagged for `name`, of the pool's kind, that is being scrubbed or has not settled yet.
    pub(super) fn own_host_not_ready(&self, pool: &DesiredPool, name: &str) -> Option<&'a str> {
        self.hosts_by_machine_tag.get(name).into_iter().flat_map(HostIds::iter).find_map(|id| {
            let h = self.hosts.get(id)?;
            let fits = Some(&h.instance_type) == pool.spec.instance_type.as_ref()
                && pool.spec.allows_zone(Some(&h.availability_zone));
            let idle = h.instance_ids.is_empty() && !self.claimed_hosts.contains(id);
            let settling = h.state == HostState::Available
                && h.available_since.is_some_and(|t| {
                    let delay = self.host_policy_of(id).map(|p| p.post_available_delay).unwrap_or_default();
                    window_end_at(t, delay) > self.now
                });
            (fits && idle && (h.state == HostState::Pending || settling)).then_some(id)
        })
    }

    /// When a host being scrubbed (or about to be) is expected to be usable.
    pub(super) fn scrub_expected(&self, host_id: &str) -> DateTime<Utc> {
        let p = self.host_policy_of(host_id);
        let after = p.map(|p| p.scrub_estimate + p.post_available_delay).unwrap_or_default();
        window_end_at(self.now, after)
    }

    /// The minimum allocation of a new host for the pool, in hours, for the plan's cost note.
    pub(super) fn window_hours(&self, pool: &DesiredPool) -> u64 {
        let t = pool.spec.instance_type.as_deref().unwrap_or_default();
        self.desired.providers.get(&pool.provider).map(|p| p.min_allocation_for(t).as_secs() / 3600).unwrap_or(0)
    }
}

pub(super) fn window_end(desired: &Desired, host: &Host) -> DateTime<Utc> {
    host_window_end(&desired.providers, host)
}
