//! Pools that follow demand (`scale:`): each one's size from what the forge reports — its busy runners, the
//! queued jobs it can serve, and the warm idle runners it keeps — within its bounds. Pure: no I/O.
//!
//! # Guarantees
//! - Desired size = clamp(busy + queued jobs this pool can serve + `idle`, `min`, `max`); a `schedule` window
//!   that holds (days, hours, an IANA time zone) overrides `min` and `idle`.
//! - Scale-in removes only machines whose runner has been idle (online, no job) for `idle_timeout`, the
//!   longest-idle first; never a busy one, never one still coming up, never one whose runner is offline (that
//!   is a repair), and never one whose dedicated host is inside its paid minimum allocation window (it costs
//!   nothing extra to keep it warm for the next job).
//! - A job is served by the first pool (in the fleet file's order) whose runners have every label it asks
//!   for, the way GitHub routes jobs: the pool's labels plus `self-hosted`, its OS and its architecture.

use chrono::{DateTime, Utc};

use super::model::*;

/// How long a job may wait with no pool able to take it before the plan and the metrics say so, unless
/// `reconcile.alert_after` says otherwise.
pub const ALERT_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// What demand says about one pool that follows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolDemand {
    pub pool: String,
    pub machines: usize,
    pub busy: usize,
    pub idle: usize,
    /// Queued jobs this pool can serve (and that no earlier pool takes).
    pub queued: usize,
    /// clamp(busy + queued + idle target, min, max).
    pub wanted: u32,
    /// The size planned: `wanted`, or more while machines are not removable yet (idle too briefly, host paid).
    pub count: u32,
    /// Machines scale-in removes, longest idle first.
    pub removing: Vec<String>,
}

/// A queued job no pool can take now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unserved {
    pub job: u64,
    pub labels: Vec<String>,
    pub queued_at: DateTime<Utc>,
    /// `no pool has these labels`, or `pool `x` is at its max (N)`.
    pub why: String,
}

/// What demand decided for the whole fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Demand {
    pub pools: Vec<PoolDemand>,
    /// Jobs waiting longer than the alert time ([`ALERT_AFTER`] by default) that no pool can take.
    pub unserved: Vec<Unserved>,
}

/// The labels a pool's runners answer to, lowercased: its own, `self-hosted`, its OS and architecture.
pub fn runner_labels(pool: &DesiredPool) -> Vec<String> {
    let os = match pool.spec.os {
        crate::config::Os::Macos => "macos",
        crate::config::Os::Linux => "linux",
    };
    let arch = match pool.spec.arch {
        crate::config::Arch::Arm64 => "arm64",
        crate::config::Arch::X86_64 => "x64",
    };
    let mut v: Vec<String> = pool.runner.iter().flat_map(|r| r.labels.iter()).map(|l| l.to_lowercase()).collect();
    v.extend(["self-hosted".to_string(), os.to_string(), arch.to_string()]);
    v
}

/// Whether a job asking for `labels` can run on the pool's runners.
pub fn serves(pool: &DesiredPool, labels: &[String]) -> bool {
    pool.runner.is_some() && {
        let have = runner_labels(pool);
        labels.iter().all(|l| have.contains(&l.to_lowercase()))
    }
}

/// `HH:MM-HH:MM` as minutes of the day (start, end); `24:00` ends the day.
pub fn parse_hours(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once('-')?;
    let minute = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
    };
    let (start, end) = (minute(a)?, minute(b)?);
    (start != end).then_some((start, end))
}

/// Whether `w` holds at `now`.
pub fn window_holds(w: &WindowSpec, now: DateTime<Utc>) -> bool {
    use chrono::{Datelike, Timelike};
    let Ok(tz) = w.time_zone.parse::<chrono_tz::Tz>() else { return false };
    let local = now.with_timezone(&tz);
    let minute = local.hour() * 60 + local.minute();
    let day = local.weekday().num_days_from_monday() as u8;
    let (in_hours, day) = match w.hours {
        None => (true, day),
        Some((start, end)) if start < end => (minute >= start && minute < end, day),
        // Across midnight: the early hours belong to the window that began the day before.
        Some((start, _)) if minute >= start => (true, day),
        Some((_, end)) => (minute < end, (day + 6) % 7),
    };
    in_hours && (w.days.is_empty() || w.days.contains(&day))
}

/// The pool's `min` and `idle` at `now`: the first schedule window that holds overrides them.
pub fn bounds_at(scale: &ScaleSpec, now: DateTime<Utc>) -> (u32, u32) {
    match scale.schedule.iter().find(|w| window_holds(w, now)) {
        Some(w) => (w.min.unwrap_or(scale.min), w.idle.unwrap_or(scale.idle)),
        None => (scale.min, scale.idle),
    }
}

/// The pool that takes a job asking for `labels`: the first (in the fleet file's order) that serves it.
pub fn serving_pool(pools: &[DesiredPool], labels: &[String]) -> Option<usize> {
    pools.iter().position(|p| serves(p, labels))
}

/// Sets the `count` of every pool that follows demand (and `remove_first` for its scale-in) from `jobs` and
/// what exists, as of `now`. Pools with a fixed `count` are left as they are, but take the jobs they can serve.
pub fn follow_demand(
    desired: &mut Desired,
    actual: &Actual,
    jobs: &[QueuedJob],
    now: DateTime<Utc>,
    alert_after: std::time::Duration,
) -> Demand {
    let tenant = desired.tenant.clone();
    let runner = |name: &str| actual.runners.iter().flatten().find(|r| r.name == name);
    // Each job goes to the first pool that can serve it.
    let mut queued = vec![0usize; desired.pools.len()];
    let mut unserved = Vec::new();
    let mut jobs: Vec<&QueuedJob> = jobs.iter().collect();
    jobs.sort_by_key(|j| (j.queued_at, j.id));
    for j in &jobs {
        match serving_pool(&desired.pools, &j.labels) {
            Some(i) => queued[i] += 1,
            None if j.queued_at + chrono::Duration::from_std(alert_after).unwrap_or_default() <= now => {
                unserved.push(Unserved {
                    job: j.id,
                    labels: j.labels.clone(),
                    queued_at: j.queued_at,
                    why: "no pool has all of these labels".into(),
                })
            }
            None => {}
        }
    }
    let mut out = Demand::default();
    let providers = desired.providers.clone();
    for (i, pool) in desired.pools.iter_mut().enumerate() {
        let Some(scale) = pool.scale.clone() else { continue };
        let mut names: Vec<&str> = actual
            .machines
            .iter()
            .filter(|m| owned_by(&m.tags, &tenant) && !m.state.is_gone())
            .filter(|m| m.pool() == Some(pool.name.as_str()) && m.provider == pool.provider)
            .filter_map(|m| m.name())
            .collect();
        names.sort();
        names.dedup();
        let busy = names.iter().filter(|n| runner(n).is_some_and(|r| r.busy)).count();
        let idle = names.iter().filter(|n| runner(n).is_some_and(|r| r.online && !r.busy)).count();
        let (min, idle_target) = bounds_at(&scale, now);
        let want = (busy + queued[i] + idle_target as usize).clamp(min.min(scale.max) as usize, scale.max as usize);
        if busy + queued[i] > scale.max as usize {
            let waiting = busy + queued[i] - scale.max as usize;
            for j in jobs.iter().filter(|j| serves(pool, &j.labels)).rev().take(waiting) {
                if j.queued_at + chrono::Duration::from_std(alert_after).unwrap_or_default() <= now {
                    unserved.push(Unserved {
                        job: j.id,
                        labels: j.labels.clone(),
                        queued_at: j.queued_at,
                        why: format!("pool `{}` is at its max ({})", pool.name, scale.max),
                    });
                }
            }
        }
        let current = names.len();
        let mut removing = Vec::new();
        if want < current {
            let timeout = chrono::Duration::from_std(scale.idle_timeout).unwrap_or(chrono::Duration::MAX);
            let mut removable: Vec<(DateTime<Utc>, &str)> = names
                .iter()
                .filter_map(|n| {
                    let r = runner(n)?;
                    let since = r.idle_since?;
                    (r.online && !r.busy && since + timeout <= now).then_some((since, *n))
                })
                .filter(|(_, n)| !host_paid(&providers, actual, n, now))
                .collect();
            removable.sort();
            removing = removable.iter().take(current - want).map(|(_, n)| n.to_string()).collect();
        }
        let count = (current - removing.len()).max(want) as u32;
        pool.count = count.min(scale.max.max(current as u32));
        desired.remove_first.extend(removing.iter().cloned());
        out.pools.push(PoolDemand {
            pool: pool.name.clone(),
            machines: current,
            busy,
            idle,
            queued: queued[i],
            wanted: want as u32,
            count: pool.count,
            removing,
        });
    }
    unserved.sort_by_key(|u| (u.queued_at, u.job));
    out.unserved = unserved;
    out
}

/// Whether `machine` runs on a dedicated host still inside its paid minimum allocation window.
fn host_paid(
    providers: &std::collections::BTreeMap<String, ProviderInfo>,
    actual: &Actual,
    machine: &str,
    now: DateTime<Utc>,
) -> bool {
    let Some(m) = actual.machines.iter().find(|m| m.name() == Some(machine) && !m.state.is_gone()) else {
        return false;
    };
    let Some(h) = m.host_id.as_ref().and_then(|id| actual.hosts.iter().find(|h| &h.id == id)) else { return false };
    host_window_end(providers, h) > now
}
