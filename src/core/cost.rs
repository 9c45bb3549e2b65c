//! What hosts and machines cost: prices, billing models, the host ledger, hold-or-release decisions, budgets and
//! what a plan commits. Pure functions of the desired fleet, what exists, and the time.
//!
//! # Billing
//! A provider's capabilities carry its billing model ([`Billing`]): AWS Mac hosts per second with a 24-hour
//! minimum from their allocation; EC2 Linux instances per second with a 60-second minimum; `local` free;
//! hourly providers (Hetzner) per started hour with no minimum. A dedicated host is billed for
//! `max(time held, minimum)`: allocating one commits the minimum, and releasing it early is impossible.
//!
//! # Prices
//! Dollars per hour per instance type, from [`DEFAULT_PRICES`] (on-demand list prices, `us-east-1`, as taken on
//! [`PRICES_TAKEN`]) under the fleet file's `pricing:` (`{mac2.metal: 0.65, "mac2.metal@eu-west-1": 0.74}`),
//! which wins. An instance type without a price is reported as unpriced, never guessed.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::model::{Desired, Host, HostState, UNKNOWN_ALLOCATION, host_window_end};

/// When [`DEFAULT_PRICES`] were taken.
pub const PRICES_TAKEN: &str = "2026-12-06";

/// On-demand list prices in `us-east-1`, dollars per hour (for Mac types: per dedicated host). Approximate: check
/// them against your bill and override them with `pricing:`.
pub const DEFAULT_PRICES: &[(&str, f64)] = &[
    ("mac1.metal", 1.083),
    ("mac2.metal", 0.65),
    ("mac2-m2.metal", 0.878),
    ("mac2-m2pro.metal", 1.56),
    ("mac2-m1ultra.metal", 2.2),
    ("mac-m4.metal", 1.23),
    ("mac-m4pro.metal", 1.97),
    ("t3.medium", 0.0416),
    ("t3.large", 0.0832),
    ("t3.xlarge", 0.1664),
    ("t3.2xlarge", 0.3328),
    ("c7i.large", 0.08925),
    ("c7i.xlarge", 0.1785),
    ("m7i.large", 0.1008),
    ("m7i.xlarge", 0.2016),
];

/// How a provider bills a machine or a host.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Billing {
    /// `second`, `hour` (each started hour), or `free`.
    pub unit: super::model::BillingUnit,
    /// The least time billed from the start (24 h for an EC2 Mac host, 60 s for an EC2 instance).
    #[serde(with = "super::model::secs")]
    #[schemars(with = "u64")]
    pub minimum: Duration,
}

impl Billing {
    pub const FREE: Billing = Billing { unit: super::model::BillingUnit::Free, minimum: Duration::ZERO };

    /// Hours billed for holding something `held` long.
    pub fn billed_hours(&self, held: Duration) -> f64 {
        use super::model::BillingUnit::*;
        let held = held.max(self.minimum);
        match self.unit {
            Free => 0.0,
            Second => held.as_secs_f64() / 3600.0,
            Hour => (held.as_secs_f64() / 3600.0).ceil().max(1.0),
        }
    }

    /// The end of the time already paid for, holding since `start`, at `now`.
    pub fn paid_until(&self, start: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        use super::model::BillingUnit::*;
        let min_end = start + chrono::Duration::from_std(self.minimum).unwrap_or_default();
        match self.unit {
            Free | Second => min_end.max(now),
            Hour => {
                let held = (now - start).num_seconds().max(1);
                let hours = (held + 3599) / 3600;
                min_end.max(start + chrono::Duration::hours(hours))
            }
        }
    }
}

/// When an idle host past its paid window is released (`hosts.release`, per provider or pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReleasePolicy {
    /// As soon as the provider allows it: the end of the minimum window (plus the margin against clock skew).
    #[default]
    Asap,
    /// At the end of the time already paid for: the minimum window, or for hourly billing the current hour.
    EndOfWindow,
    /// Once it has been idle this long (and is past its window).
    IdleFor(#[schemars(with = "String")] crate::config::HumanDuration),
    /// Never: a person releases it.
    Never,
}

impl ReleasePolicy {
    pub fn describe(&self) -> String {
        match self {
            ReleasePolicy::Asap => "asap".into(),
            ReleasePolicy::EndOfWindow => "end-of-window".into(),
            ReleasePolicy::IdleFor(d) => format!("idle-for: {}", humantime::format_duration(d.0)),
            ReleasePolicy::Never => "never".into(),
        }
    }
}

/// Spending limits (`budget:`): hosts per instance type, and what one plan may commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max_hosts: BTreeMap<String, u32>,
    /// Dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_commit_per_plan: Option<f64>,
}

/// Parses a money amount: `$500`, `500`, `500.00`, `$1,200`.
pub fn parse_money(s: &str) -> Option<f64> {
    let t = s.trim().trim_start_matches('$').replace(',', "");
    let v: f64 = t.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// `$12.34`.
pub fn money(v: f64) -> String {
    format!("${v:.2}")
}

/// Prices for one provider (its region's): instance type → dollars per hour.
pub fn prices_for(region: Option<&str>, overrides: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = DEFAULT_PRICES.iter().map(|(t, p)| (t.to_string(), *p)).collect();
    for (k, v) in overrides {
        match k.split_once('@') {
            None => {
                out.insert(k.clone(), *v);
            }
            Some((t, r)) if Some(r) == region => {
                out.insert(t.to_string(), *v);
            }
            Some(_) => {}
        }
    }
    // `type@region` wins over `type` for this region.
    for (k, v) in overrides {
        if let Some((t, r)) = k.split_once('@')
            && Some(r) == region
        {
            out.insert(t.to_string(), *v);
        }
    }
    out
}

impl Desired {
    /// Dollars per hour for an instance type on a provider (`None`: unpriced). Free providers cost nothing.
    pub fn price(&self, provider: &str, instance_type: &str) -> Option<f64> {
        let p = self.providers.get(provider)?;
        if p.capabilities.billing_unit == super::model::BillingUnit::Free {
            return Some(0.0);
        }
        p.prices.get(instance_type).copied()
    }

    /// How a machine (or its dedicated host) of `instance_type` is billed on `provider`.
    pub fn billing(&self, provider: &str, instance_type: &str) -> Billing {
        let Some(p) = self.providers.get(provider) else { return Billing::FREE };
        match p.capabilities.host_policy(instance_type) {
            Some(h) => Billing { unit: super::model::BillingUnit::Second, minimum: h.min_allocation },
            None => Billing { unit: p.capabilities.billing_unit, minimum: p.capabilities.minimum_billed },
        }
    }

    /// The release policy for a host: its pool's (by the host's pool tag), else its provider's, else `asap`.
    pub fn release_policy(&self, host: &Host) -> ReleasePolicy {
        let pool = host.tags.get(super::names::tags::POOL);
        pool.and_then(|p| self.pools.iter().find(|d| d.name == p && d.provider == host.provider))
            .and_then(|p| p.host_release)
            .or_else(|| self.providers.get(&host.provider).and_then(|p| p.host_release))
            .unwrap_or_default()
    }
}

/// Where a dedicated host stands, for the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LedgerState {
    /// A machine runs on it.
    InUse,
    /// No machine, inside its paid window: kept for demand, costing nothing extra.
    Idle,
    /// The provider is scrubbing it after its last instance.
    Scrubbing,
    /// Reports available after a scrub, not usable yet.
    Settling,
    /// Idle past its window, and the release policy says release: the plan releases it.
    Due,
    /// Idle past its window, and kept: by the release policy, or because its allocation time is unknown.
    Held,
    /// Failed or under assessment: the provider's business.
    Other,
}

impl LedgerState {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerState::InUse => "in_use",
            LedgerState::Idle => "idle",
            LedgerState::Scrubbing => "scrubbing",
            LedgerState::Settling => "settling",
            LedgerState::Due => "due",
            LedgerState::Held => "held",
            LedgerState::Other => "other",
        }
    }
}

/// One dedicated host in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LedgerEntry {
    pub host_id: String,
    pub provider: String,
    pub instance_type: String,
    pub availability_zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `None`: the provider does not say (the host is never released by nimbus).
    pub allocated_at: Option<DateTime<Utc>>,
    /// Time held so far, in hours (0 when the provider's clock is ahead of this one's).
    pub hours_held: Option<f64>,
    /// Hours billed so far: the time held, or the minimum allocation while inside it.
    pub hours_billed: Option<f64>,
    /// The end of its minimum allocation window.
    pub window_ends_at: Option<DateTime<Utc>>,
    /// Dollars per hour (`None`: unpriced).
    pub price_per_hour: Option<f64>,
    /// Dollars billed so far.
    pub cost_so_far: Option<f64>,
    pub state: LedgerState,
    /// Why it is kept, or when and why it goes.
    pub reason: String,
    /// When the release policy releases it if it stays idle (`None`: never, or not idle).
    pub release_at: Option<DateTime<Utc>>,
    pub release_policy: String,
}

/// The minutes a host must be idle before `idle-for` counts from: since its scrub ended (when nimbus saw it), else
/// since its allocation.
fn idle_since(h: &Host) -> DateTime<Utc> {
    h.available_since.unwrap_or(h.allocated_at)
}

/// What the release policy decides for an idle, available host: `Ok(due)` releases at `due` (now or later),
/// `Err(reason)` keeps it.
pub fn release_decision(desired: &Desired, h: &Host, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if h.allocated_at == UNKNOWN_ALLOCATION {
        return Err("its allocation time is unknown, so its window cannot be known: never released by nimbus".into());
    }
    let window = host_window_end(&desired.providers, h);
    let policy = desired.release_policy(h);
    match policy {
        ReleasePolicy::Asap => Ok(window),
        ReleasePolicy::EndOfWindow => {
            let billing = desired.billing(&h.provider, &h.instance_type);
            Ok(window.max(billing.paid_until(h.allocated_at, now.max(window))))
        }
        ReleasePolicy::IdleFor(d) => {
            Ok(window.max(idle_since(h) + chrono::Duration::from_std(d.0).unwrap_or(chrono::Duration::MAX)))
        }
        ReleasePolicy::Never => Err("hosts.release is never: kept until a person releases it".into()),
    }
}

/// The ledger: every dedicated host of the fleet, what it cost so far, where it stands and why.
pub fn ledger(desired: &Desired, hosts: &[Host], now: DateTime<Utc>) -> Vec<LedgerEntry> {
    let mut out: Vec<LedgerEntry> = hosts
        .iter()
        .filter(|h| h.state != HostState::Released && desired.providers.contains_key(&h.provider))
        .map(|h| entry(desired, h, now))
        .collect();
    out.sort_by(|a, b| (&a.provider, &a.instance_type, &a.host_id).cmp(&(&b.provider, &b.instance_type, &b.host_id)));
    out
}

fn entry(desired: &Desired, h: &Host, now: DateTime<Utc>) -> LedgerEntry {
    let known = h.allocated_at != UNKNOWN_ALLOCATION;
    let billing = desired.billing(&h.provider, &h.instance_type);
    let price = desired.price(&h.provider, &h.instance_type);
    let held = known.then(|| (now - h.allocated_at).to_std().unwrap_or_default());
    let hours_billed = held.map(|d| billing.billed_hours(d));
    let window_ends_at =
        known.then(|| h.allocated_at + chrono::Duration::from_std(billing.minimum).unwrap_or_default());
    let releasable = host_window_end(&desired.providers, h);
    let per_day = price.map(|p| money(p * 24.0)).unwrap_or_else(|| "an unknown amount".into());
    let policy = desired.release_policy(h);
    let settling_until = h.available_since.map(|t| {
        let delay = desired
            .providers
            .get(&h.provider)
            .and_then(|p| p.capabilities.host_policy(&h.instance_type))
            .map(|p| p.post_available_delay)
            .unwrap_or_default();
        t + chrono::Duration::from_std(delay).unwrap_or_default()
    });
    let (state, reason, release_at) = if !h.instance_ids.is_empty() {
        (LedgerState::InUse, format!("machine {} runs on it", h.instance_ids.join(", ")), None)
    } else {
        match h.state {
            HostState::Pending => (
                LedgerState::Scrubbing,
                "the provider is scrubbing it after its last instance; reused or released once available".into(),
                None,
            ),
            HostState::Available if settling_until.is_some_and(|t| t > now) => (
                LedgerState::Settling,
                format!(
                    "available after its scrub, usable from {}",
                    crate::util::time::ts(&settling_until.unwrap_or(now))
                ),
                None,
            ),
            HostState::Available => match release_decision(desired, h, now) {
                Err(why) => (LedgerState::Held, format!("{why}; costs {per_day}/day while idle"), None),
                Ok(_) if releasable > now => {
                    let due = release_decision(desired, h, releasable).ok();
                    (
                        LedgerState::Idle,
                        format!(
                            "inside its paid window until {}: kept for demand at no extra cost; if still idle, released {} (hosts.release: {}), saving {per_day}/day",
                            crate::util::time::ts(&releasable),
                            due.map(|d| format!("at {}", crate::util::time::ts(&d))).unwrap_or_else(|| "then".into()),
                            policy.describe()
                        ),
                        due,
                    )
                }
                Ok(due) if due > now => (
                    LedgerState::Held,
                    format!(
                        "past its window; hosts.release: {} keeps it until {} ({per_day}/day while idle)",
                        policy.describe(),
                        crate::util::time::ts(&due)
                    ),
                    Some(due),
                ),
                Ok(due) => (
                    LedgerState::Due,
                    format!(
                        "idle past its window: released now (hosts.release: {}), saving {per_day}/day",
                        policy.describe()
                    ),
                    Some(due),
                ),
            },
            _ => (LedgerState::Other, format!("{:?}: left to the provider", h.state), None),
        }
    };
    LedgerEntry {
        host_id: h.id.clone(),
        provider: h.provider.clone(),
        instance_type: h.instance_type.clone(),
        availability_zone: h.availability_zone.clone(),
        machine: h.tags.get(super::names::tags::MACHINE).map(str::to_string),
        pool: h.tags.get(super::names::tags::POOL).map(str::to_string),
        allocated_at: known.then_some(h.allocated_at),
        hours_held: held.map(|d| d.as_secs_f64() / 3600.0),
        hours_billed,
        window_ends_at,
        price_per_hour: price,
        cost_so_far: hours_billed.zip(price).map(|(h, p)| h * p),
        state,
        reason,
        release_at,
        release_policy: policy.describe(),
    }
}

/// What one action commits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ActionCost {
    pub action: usize,
    pub address: String,
    pub kind: String,
    pub instance_type: String,
    /// Hours the action commits at least (a host's minimum allocation, an instance's minimum billing).
    pub hours: f64,
    /// Dollars (`None`: unpriced).
    pub amount: Option<f64>,
}

/// What a plan commits, and what the fleet costs per day at its planned size (plan JSON `cost`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
pub struct PlanCost {
    pub currency: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionCost>,
    /// Host-hours (and instance-hours) the plan commits.
    pub committed_hours: f64,
    /// Dollars the plan commits (priced actions only).
    pub committed: f64,
    /// Dollars per day for the machines the fleet has once the plan is applied (their hosts, or the instances).
    pub per_day: f64,
    /// Instance types without a price: not in the figures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unpriced: Vec<String>,
    /// When the default prices were taken.
    pub prices_taken: String,
}

/// The cost of `actions` (id, address, kind) for `desired`, with `planned` machines per pool.
pub fn plan_cost(
    desired: &Desired,
    actions: &[(usize, String, &super::plan::ActionKind)],
    planned: &BTreeMap<String, u32>,
) -> PlanCost {
    use super::plan::ActionKind as K;
    let mut out = PlanCost { currency: "USD".into(), prices_taken: PRICES_TAKEN.into(), ..Default::default() };
    let mut unpriced = std::collections::BTreeSet::new();
    for (id, address, kind) in actions {
        let (provider, itype) = match kind {
            K::AllocateHost { provider, instance_type, .. } => (provider, instance_type.clone()),
            K::LaunchInstance { provider, spec, host: None, .. } => {
                let Some(t) = spec.instance_type.clone() else { continue };
                (provider, t)
            }
            _ => continue,
        };
        let billing = desired.billing(provider, &itype);
        if billing.unit == super::model::BillingUnit::Free {
            continue;
        }
        let hours = billing.billed_hours(Duration::ZERO);
        let price = desired.price(provider, &itype);
        if price.is_none() {
            unpriced.insert(itype.clone());
        }
        out.committed_hours += hours;
        out.committed += price.map(|p| p * hours).unwrap_or(0.0);
        out.actions.push(ActionCost {
            action: *id,
            address: address.clone(),
            kind: kind.name().to_string(),
            instance_type: itype,
            hours,
            amount: price.map(|p| p * hours),
        });
    }
    for pool in &desired.pools {
        let n = planned.get(&pool.name).copied().unwrap_or(pool.count);
        let Some(t) = pool.spec.instance_type.as_deref() else { continue };
        if desired.billing(&pool.provider, t).unit == super::model::BillingUnit::Free {
            continue;
        }
        match desired.price(&pool.provider, t) {
            Some(p) => out.per_day += p * 24.0 * n as f64,
            None if n > 0 => {
                unpriced.insert(t.to_string());
            }
            None => {}
        }
    }
    out.unpriced = unpriced.into_iter().collect();
    out
}

impl PlanCost {
    /// One line for the terminal and Markdown views.
    pub fn line(&self) -> String {
        let mut s = format!(
            "Cost: this plan commits {} ({:.1} host-hours); the fleet costs {}/day at its planned size",
            money(self.committed),
            self.committed_hours,
            money(self.per_day)
        );
        if !self.unpriced.is_empty() {
            s.push_str(&format!(" (unpriced, not counted: {}; add them under `pricing:`)", self.unpriced.join(", ")));
        }
        s.push_str(&format!(" — prices as of {}.", self.prices_taken));
        s
    }
}
