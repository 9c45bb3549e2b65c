//! `nimbus simulate`: a job trace replayed in virtual time through the real controller — the demand sizing of
//! [`crate::core::scale::follow_demand`] and the planner — against a simulated provider and forge, and compared
//! with a static pool sized for the peak, with releasing hosts as soon as allowed, and with the offline lower
//! bound ([`lower_bound`]).
//!
//! # The simulated world
//! - The controller runs every `reconcile.interval` (default 30 s) when something changed since it last ran
//!   (a job queued or ended, a machine ready, a scrub over), and at least every 5 minutes of virtual time
//!   otherwise (time-based decisions — idle timeouts, host windows, schedules — wait at most that long).
//! - Plans are applied by [`crate::testing::Simulator`], which refuses what the real peers refuse: a busy
//!   runner removed, a host released inside its window, an instance on a host that is scrubbing or settling.
//!   A simulation that breaks one of these rules panics: that is a bug in the policy.
//! - A machine boots in a seeded time: Linux 45–90 s, macOS 6–20 min; its runner is online then. A Mac host
//!   scrubs 50 min – 4.5 h (seeded) after its instance ends, then settles for the provider's delay.
//! - The forge hands a queued job to an idle online runner that has all its labels at once, first come first
//!   served. Runners are persistent (an ephemeral pool is simulated as persistent).
//! - Billing: a dedicated host from its allocation to its release (or the end of the trace), at least its
//!   minimum; a machine without a host from launch to termination, at least its minimum. The end of the trace
//!   is the last job's end.

pub mod world;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use crate::config::FleetConfig;
use crate::core::model::{Actual, Desired, HostState, QueuedJob};
use crate::core::plan::plan;

/// Monday 2026-01-05 00:00 UTC: the trace's time 0 (schedules see weekdays from it).
pub fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 0, 0, 0).unwrap()
}

/// One job of a trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceJob {
    /// Seconds from the trace's start.
    pub submit: f64,
    /// Seconds it runs once started.
    pub duration: f64,
    pub labels: Vec<String>,
}

/// A trace that could not be read: the line (1-based) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TraceError {
    pub line: usize,
    pub message: String,
}

/// Parses a trace: CSV `submit,duration,labels` with a header line; `submit` and `duration` in seconds
/// (decimals allowed), `labels` separated by `;` or spaces (`self-hosted;macOS;arm64`). Blank lines and
/// lines starting with `#` are skipped.
pub fn parse_trace(text: &str) -> Result<Vec<TraceJob>, TraceError> {
    let mut out = Vec::new();
    let mut header = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |m: String| TraceError { line: i + 1, message: m };
        let cols: Vec<&str> = line.splitn(3, ',').map(str::trim).collect();
        if !header {
            header = true;
            if cols.first().is_some_and(|c| c.eq_ignore_ascii_case("submit")) {
                if cols.len() != 3
                    || !cols[1].eq_ignore_ascii_case("duration")
                    || !cols[2].eq_ignore_ascii_case("labels")
                {
                    return Err(err("the header must be `submit,duration,labels`".into()));
                }
                continue;
            }
            return Err(err("the first line must be the header `submit,duration,labels`".into()));
        }
        if cols.len() != 3 {
            return Err(err(format!("expected 3 columns (submit,duration,labels), found {}", cols.len())));
        }
        let num = |what: &str, s: &str| -> Result<f64, TraceError> {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| err(format!("`{s}` is not a number of seconds ({what})")))
        };
        let submit = num("submit", cols[0])?;
        let duration = num("duration", cols[1])?;
        let labels: Vec<String> =
            cols[2].split([';', ' ']).map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        if labels.is_empty() {
            return Err(err("a job needs at least one label".into()));
        }
        out.push(TraceJob { submit, duration, labels });
    }
    out.sort_by(|a, b| a.submit.total_cmp(&b.submit));
    Ok(out)
}

/// splitmix64: a small seeded generator, the same numbers for the same seed everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)` seconds.
    pub fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// What one policy did on the trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyReport {
    pub policy: String,
    pub jobs: usize,
    /// Seconds from queued to started.
    pub wait_p50: f64,
    pub wait_p95: f64,
    pub wait_max: f64,
    /// Host-hours (dedicated hosts) plus instance-hours (machines without a host) billed.
    pub billed_hours: f64,
    /// Dollars (priced types only).
    pub cost: f64,
    /// The share of billed hours no job ran.
    pub idle_share: f64,
    /// Billed hours by instance type.
    pub billed_by_type: BTreeMap<String, f64>,
    /// The most machines at once.
    pub peak_machines: usize,
}

/// The whole report of `nimbus simulate`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub seed: u64,
    pub jobs: usize,
    /// Seconds from the first submission to the last job's end.
    pub horizon: f64,
    /// The fleet file's policy, a static pool sized for the peak, and release as soon as allowed.
    pub policies: Vec<PolicyReport>,
    /// The offline lower bound at the fleet policy's p95 wait.
    pub lower_bound: LowerBound,
    /// The fleet policy's billed hours over the lower bound's.
    pub ratio_to_lower_bound: f64,
    /// Jobs no pool can serve (never started).
    pub unserved: usize,
}

/// The offline lower bound on billed hours (see [`lower_bound`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LowerBound {
    /// The p95 wait (seconds) the bound allows.
    pub p95_wait: f64,
    pub billed_hours: f64,
    pub cost: f64,
    /// Per instance type: (job-hours, hosts needed at least, minimum billed per host in hours, bound in hours).
    pub by_type: BTreeMap<String, (f64, u64, f64, f64)>,
}

/// The offline lower bound for one class of machines (one instance type): jobs `(submit, duration)` in seconds,
/// each host running one job at a time and billed at least `minimum` seconds, when all but `late` jobs (the 5 %
/// a p95 allows: `late = ⌊0.05·total⌋`) start within `w` seconds of their submission. Returns (hours, hosts).
///
/// Every schedule bills `Σ_h max(minimum, lifetime_h)` with `lifetime_h ≥ busy_h`, so at least each of:
/// 1. **work**: `Σ_j d_j` — every job runs on some host, one at a time;
/// 2. **hosts × minimum**: `H·minimum`, where `H` hosts must exist: cut time into disjoint windows of length
///    `L`; an on-time job submitted in a window whose latest end `s + w + d` is in it runs wholly inside it, so
///    the window's on-time work `W_i` needs `⌈W_i / L⌉` hosts alive at once. Fewer than `k` hosts need the late
///    jobs to remove, from every window, enough of its largest jobs to bring its work under `k·L`; the windows
///    are disjoint, so those counts add up, and `H` is the least `k` whose total fits in `late`;
/// 3. **coverage**: a window holding an on-time job has a host alive in it; a host alive in windows `i` and `j`
///    lives at least the gap between them, and is billed at least `minimum`. The cheapest way to touch every such
///    window — runs of consecutive windows, each billed `max(minimum, gap)` — with up to `late` jobs excused (a
///    window is excused when all its jobs are late) is found exactly by dynamic programming.
///
/// Each is a lower bound for any schedule, so the largest of them is. The windows tried are 10 min to 1 day
/// long; any set of lengths keeps the bound valid.
#[allow(clippy::needless_range_loop)] // the dynamic programme reads rows i and kk+1 of one table by index
pub fn class_bound(jobs: &[(f64, f64)], minimum: f64, w: f64, late: usize) -> (f64, u64) {
    if jobs.is_empty() {
        return (0.0, 0);
    }
    let work: f64 = jobs.iter().map(|j| j.1).sum();
    let t0 = jobs.iter().map(|j| j.0).fold(f64::INFINITY, f64::min);
    let t1 = jobs.iter().map(|j| j.0 + w + j.1).fold(0.0, f64::max);
    let mut hosts: u64 = 1;
    let mut cover: f64 = minimum;
    for len in [600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0] {
        let m = (((t1 - t0) / len).floor() as usize) + 1;
        // Each window's on-time jobs (their durations, largest first).
        let mut inside: Vec<Vec<f64>> = vec![Vec::new(); m];
        for j in jobs {
            let i = ((j.0 - t0) / len).floor() as usize;
            let b = t0 + (i + 1) as f64 * len;
            if j.0 + w + j.1 <= b + 1e-9 {
                inside[i].push(j.1);
            }
        }
        for v in &mut inside {
            v.sort_by(|x, y| y.total_cmp(x));
        }
        // 2. the least k whose excusals fit in `late`.
        let need = |k: u64| -> usize {
            inside
                .iter()
                .map(|v| {
                    let mut rest: f64 = v.iter().sum();
                    let mut n = 0;
                    while rest > k as f64 * len + 1e-9 && n < v.len() {
                        rest -= v[n];
                        n += 1;
                    }
                    n
                })
                .sum()
        };
        let mut k = 0u64;
        while need(k) > late {
            k += 1;
        }
        hosts = hosts.max(k);
        // 3. coverage with excusals: windows that hold jobs, in order.
        let needed: Vec<(usize, usize)> =
            inside.iter().enumerate().filter(|(_, v)| !v.is_empty()).map(|(i, v)| (i, v.len())).collect();
        let n = needed.len();
        if n == 0 {
            continue;
        }
        let cap = late.min(jobs.len());
        // f[k][e]: the cheapest handling of the first k needed windows with e jobs excused.
        let inf = f64::INFINITY;
        let mut f = vec![vec![inf; cap + 1]; n + 1];
        f[0][0] = 0.0;
        for kk in 0..n {
            // Excuse window kk.
            let c = needed[kk].1;
            for e in 0..=cap {
                if f[kk][e].is_finite() && e + c <= cap {
                    let v = f[kk][e];
                    if v < f[kk + 1][e + c] {
                        f[kk + 1][e + c] = v;
                    }
                }
            }
            // A run of windows i..=kk on one host.
            for i in 0..=kk {
                let gap = ((needed[kk].0 as f64 - needed[i].0 as f64 - 1.0) * len).max(0.0);
                let run = minimum.max(gap);
                for e in 0..=cap {
                    if f[i][e].is_finite() && f[i][e] + run < f[kk + 1][e] {
                        f[kk + 1][e] = f[i][e] + run;
                    }
                }
            }
        }
        let best = f[n].iter().copied().fold(inf, f64::min);
        if best.is_finite() {
            cover = cover.max(best);
        } else {
            cover = cover.max(0.0);
        }
    }
    // With every job excusable, nothing is certain but the work.
    if late >= jobs.len() {
        cover = 0.0;
    }
    let hours = work.max(hosts as f64 * minimum).max(cover) / 3600.0;
    (hours, hosts)
}

/// The exact optimum for a tiny trace by brute force, for tests: every way of giving the jobs to hosts (set
/// partitions), each host running its jobs in submission order as early as it can, allocated just in time for
/// its first (perfect foresight), billed `max(minimum, last end − first start)`; the cheapest whose p95 wait is
/// at most `w`. Returns hours.
pub fn brute_force(jobs: &[(f64, f64)], minimum: f64, w: f64, total_jobs: usize) -> Option<f64> {
    let n = jobs.len();
    assert!(n <= 8, "brute force is for tiny traces");
    let mut sorted = jobs.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let late = total_jobs / 20;
    let mut best: Option<f64> = None;
    let mut assign = vec![0usize; n];
    #[allow(clippy::too_many_arguments)] // a local recursion; a struct would only rename its arguments
    fn rec(
        k: usize,
        used: usize,
        assign: &mut Vec<usize>,
        jobs: &[(f64, f64)],
        minimum: f64,
        w: f64,
        late: usize,
        best: &mut Option<f64>,
    ) {
        if k == jobs.len() {
            let mut billed = 0.0;
            let mut waits = Vec::new();
            for h in 0..used {
                let mut end: Option<f64> = None;
                let mut start_first = None;
                for (j, job) in jobs.iter().enumerate().filter(|(j, _)| assign[*j] == h) {
                    let _ = j;
                    let start = end.map_or(job.0, |e: f64| e.max(job.0));
                    start_first.get_or_insert(start);
                    waits.push(start - job.0);
                    end = Some(start + job.1);
                }
                if let (Some(s), Some(e)) = (start_first, end) {
                    billed += (e - s).max(minimum);
                }
            }
            waits.sort_by(|a, b| b.total_cmp(a));
            if waits.iter().skip(late).all(|x| *x <= w + 1e-9) && best.is_none_or(|b| billed < b) {
                *best = Some(billed);
            }
            return;
        }
        for h in 0..=used {
            assign[k] = h;
            rec(k + 1, used.max(h + 1), assign, jobs, minimum, w, late, best);
        }
    }
    rec(0, 0, &mut assign, &sorted, minimum, w, late, &mut best);
    best.map(|b| b / 3600.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A job ends on a runner (job index).
    Finish(usize),
    /// A machine's runner comes online (machine name index).
    Ready(usize),
    /// A host's scrub ends (host id index).
    ScrubDone(usize),
}

/// Runs one policy (the fleet file as given) over the trace.
pub fn run(config: &FleetConfig, trace: &[TraceJob], seed: u64, name: &str) -> PolicyReport {
    let start = epoch();
    let at = |s: f64| start + chrono::Duration::milliseconds((s * 1000.0).round() as i64);
    let secs = |t: DateTime<Utc>| (t - start).num_milliseconds() as f64 / 1000.0;
    let base = Desired::from_config(config);
    let interval = config
        .reconcile
        .as_ref()
        .and_then(|r| r.interval.as_ref())
        .map(|d| d.0)
        .unwrap_or(crate::engine::reconcile::DEFAULT_INTERVAL)
        .as_secs_f64()
        .max(1.0);
    let alert_after = config
        .reconcile
        .as_ref()
        .and_then(|r| r.alert_after.as_ref())
        .map(|d| d.0)
        .unwrap_or(crate::core::scale::ALERT_AFTER);
    let mut rng = Rng::new(seed);
    let mut world = Actual { runners: Some(Vec::new()), ..Actual::default() };
    let mut sim = world::Simulator::default();

    let mut events: BinaryHeap<Reverse<(i64, Ev)>> = BinaryHeap::new();
    let ms = |s: f64| (s * 1000.0).round() as i64;
    let mut names: Vec<String> = Vec::new();
    let mut name_idx: HashMap<String, usize> = HashMap::new();
    let mut host_ids: Vec<String> = Vec::new();
    let mut booting: HashMap<String, f64> = HashMap::new();
    let mut scrubbing: HashMap<String, f64> = HashMap::new();
    // Billing: host id → (type, provider, allocated, released); instance id → (type, provider, launched, gone).
    let mut host_bill: BTreeMap<String, (String, String, f64, Option<f64>)> = BTreeMap::new();
    let mut inst_bill: BTreeMap<String, (String, String, f64, Option<f64>, bool)> = BTreeMap::new();
    let mut queued: Vec<usize> = Vec::new();
    let mut running: HashMap<String, usize> = HashMap::new();
    let mut waits: Vec<f64> = vec![f64::NAN; trace.len()];
    let mut next_job = 0usize;
    let mut busy_seconds = 0.0;
    let mut peak = 0usize;
    let last_end_lb: f64 = trace.iter().map(|j| j.submit + j.duration).fold(0.0, f64::max);

    let mut t = trace.first().map(|j| (j.submit / interval).floor() * interval).unwrap_or(0.0);
    let mut last_plan = f64::NEG_INFINITY;
    let mut dirty = true;
    let mut done = 0usize;
    let served_somewhere = |labels: &[String]| crate::core::scale::serving_pool(&base.pools, labels).is_some();
    let servable = trace.iter().filter(|j| served_somewhere(&j.labels)).count();
    loop {
        // Events up to t, in time order; the forge hands out jobs at each.
        loop {
            let next_ev = events.peek().map(|Reverse((when, _))| *when);
            let next_arrival = trace.get(next_job).map(|j| ms(j.submit));
            let now_ms = match (next_ev, next_arrival) {
                (Some(e), Some(a)) => e.min(a),
                (Some(e), None) => e,
                (None, Some(a)) => a,
                (None, None) => break,
            };
            if now_ms > ms(t) {
                break;
            }
            let now_s = now_ms as f64 / 1000.0;
            dirty = true;
            // Who may run a job: the pool of a runner's machine serves the job's labels.
            let serves = |runner: &str, job: &TraceJob| {
                let pool = crate::core::names::parse_machine_name(runner).map(|(_, p, _)| p);
                base.pools.iter().any(|p| Some(p.name.as_str()) == pool && crate::core::scale::serves(p, &job.labels))
            };
            let mut freed: Option<String> = None;
            if next_arrival == Some(now_ms) {
                // The forge hands a new job to an idle online runner at once, or queues it.
                let j = next_job;
                next_job += 1;
                let job = &trace[j];
                let free = world.runners.iter_mut().flatten().find(|r| r.online && !r.busy && serves(&r.name, job));
                match free {
                    Some(r) => {
                        r.busy = true;
                        running.insert(r.name.clone(), j);
                        waits[j] = 0.0;
                        busy_seconds += job.duration;
                        events.push(Reverse((ms(now_s + job.duration), Ev::Finish(j))));
                    }
                    None => queued.push(j),
                }
            } else if let Some(Reverse((_, ev))) = events.pop() {
                match ev {
                    Ev::Finish(j) => {
                        let runner = running.iter().find(|(_, v)| **v == j).map(|(k, _)| k.clone());
                        if let Some(r) = runner {
                            running.remove(&r);
                            for fr in world.runners.iter_mut().flatten().filter(|fr| fr.name == r) {
                                fr.busy = false;
                                fr.idle_since = Some(at(now_s));
                            }
                            freed = Some(r);
                        }
                        done += 1;
                    }
                    Ev::Ready(i) => {
                        let n = names[i].clone();
                        if booting.get(&n).is_some_and(|when| ms(*when) <= now_ms) {
                            booting.remove(&n);
                            for fr in world.runners.iter_mut().flatten().filter(|fr| fr.name == n) {
                                fr.online = true;
                                fr.idle_since = Some(at(now_s));
                            }
                            freed = Some(n);
                        }
                    }
                    Ev::ScrubDone(i) => {
                        let id = &host_ids[i];
                        if scrubbing.remove(id).is_some() {
                            for h in world.hosts.iter_mut().filter(|h| &h.id == id && h.state == HostState::Pending) {
                                h.state = HostState::Available;
                                h.available_since = Some(at(now_s));
                            }
                        }
                    }
                }
            }
            // A runner that became free takes the oldest queued job it can run.
            if let Some(r) = freed
                && let Some(pos) = queued.iter().position(|&j| serves(&r, &trace[j]))
                && let Some(fr) = world.runners.iter_mut().flatten().find(|fr| fr.name == r && fr.online && !fr.busy)
            {
                let j = queued.remove(pos);
                fr.busy = true;
                running.insert(r.clone(), j);
                waits[j] = now_s - trace[j].submit;
                busy_seconds += trace[j].duration;
                events.push(Reverse((ms(now_s + trace[j].duration), Ev::Finish(j))));
            }
        }
        let all_done = next_job >= trace.len() && done >= servable && running.is_empty();
        if all_done {
            break;
        }
        // The controller.
        if dirty || t - last_plan >= 300.0 {
            dirty = false;
            last_plan = t;
            let now = at(t);
            let jobs: Vec<QueuedJob> = queued
                .iter()
                .map(|&j| QueuedJob { id: j as u64, labels: trace[j].labels.clone(), queued_at: at(trace[j].submit) })
                .collect();
            let mut desired = base.clone();
            crate::core::scale::follow_demand(&mut desired, &world, &jobs, now, alert_after);
            let p = plan(&desired, &world, now);
            {
                let before_m: Vec<(String, String)> = world
                    .machines
                    .iter()
                    .map(|m| (m.instance_id.clone(), m.name().unwrap_or_default().to_string()))
                    .collect();
                let before_h: Vec<String> = world.hosts.iter().map(|h| h.id.clone()).collect();
                sim.apply(&desired, &mut world, &p, now);
                // New hosts and machines; gone ones.
                for h in &world.hosts {
                    host_bill
                        .entry(h.id.clone())
                        .or_insert_with(|| (h.instance_type.clone(), h.provider.clone(), t, None));
                }
                for id in &before_h {
                    if !world.hosts.iter().any(|h| &h.id == id)
                        && let Some(b) = host_bill.get_mut(id)
                    {
                        b.3 = Some(t);
                    }
                }
                for h in world.hosts.iter().filter(|h| h.state == HostState::Pending) {
                    if !scrubbing.contains_key(&h.id) {
                        let d = rng.between(50.0 * 60.0, 4.5 * 3600.0);
                        scrubbing.insert(h.id.clone(), t + d);
                        let i = host_ids.len();
                        host_ids.push(h.id.clone());
                        events.push(Reverse((ms(t + d), Ev::ScrubDone(i))));
                    }
                }
                for m in &world.machines {
                    if before_m.iter().any(|(id, _)| id == &m.instance_id) {
                        continue;
                    }
                    let name = m.name().unwrap_or_default().to_string();
                    let on_host = m.host_id.is_some();
                    inst_bill.insert(
                        m.instance_id.clone(),
                        (
                            m.instance_type.as_deref().unwrap_or_default().to_string(),
                            m.provider.to_string(),
                            t,
                            None,
                            on_host,
                        ),
                    );
                    let mac = m.instance_type.as_deref().is_some_and(crate::providers::aws::config::is_mac_metal);
                    let boot = if mac { rng.between(360.0, 1200.0) } else { rng.between(45.0, 90.0) };
                    booting.insert(name.clone(), t + boot);
                    let i = *name_idx.entry(name.clone()).or_insert_with(|| {
                        names.push(name.clone());
                        names.len() - 1
                    });
                    events.push(Reverse((ms(t + boot), Ev::Ready(i))));
                }
                for (id, name) in &before_m {
                    if !world.machines.iter().any(|m| &m.instance_id == id) {
                        if let Some(b) = inst_bill.get_mut(id) {
                            b.3 = Some(t);
                        }
                        booting.remove(name);
                    }
                }
                // A runner registered on a machine still booting is offline until it is ready.
                for r in world.runners.iter_mut().flatten() {
                    if booting.contains_key(&r.name) {
                        r.online = false;
                        r.idle_since = None;
                    }
                }
                peak = peak.max(world.machines.len());
            }
        }
        t += interval;
        if t > last_end_lb + 30.0 * 86400.0 {
            break; // a policy that never serves the trace (no pool can): stop
        }
    }
    let horizon =
        trace.iter().enumerate().map(|(j, job)| job.submit + waits[j].max(0.0) + job.duration).fold(0.0, f64::max);
    let end = horizon.max(t.min(horizon));
    let mut billed_by_type: BTreeMap<String, f64> = BTreeMap::new();
    let mut cost = 0.0;
    for (itype, provider, from, to) in host_bill.values() {
        let held = (to.unwrap_or(end) - from).max(0.0);
        let hours = base.billing(provider, itype).billed_hours(Duration::from_secs_f64(held));
        *billed_by_type.entry(itype.clone()).or_default() += hours;
        cost += hours * base.price(provider, itype).unwrap_or(0.0);
    }
    for (itype, provider, from, to, on_host) in inst_bill.values() {
        if *on_host {
            continue;
        }
        let held = (to.unwrap_or(end) - from).max(0.0);
        let hours = base.billing(provider, itype).billed_hours(Duration::from_secs_f64(held));
        *billed_by_type.entry(itype.clone()).or_default() += hours;
        cost += hours * base.price(provider, itype).unwrap_or(0.0);
    }
    let billed: f64 = billed_by_type.values().sum();
    let mut w: Vec<f64> = waits.iter().copied().filter(|x| !x.is_nan()).collect();
    w.sort_by(f64::total_cmp);
    let pct = |p: f64| if w.is_empty() { 0.0 } else { w[((w.len() as f64 * p).ceil() as usize).clamp(1, w.len()) - 1] };
    let _ = secs;
    PolicyReport {
        policy: name.to_string(),
        jobs: w.len(),
        wait_p50: pct(0.50),
        wait_p95: pct(0.95),
        wait_max: w.last().copied().unwrap_or(0.0),
        billed_hours: billed,
        cost,
        idle_share: if billed > 0.0 { (1.0 - busy_seconds / 3600.0 / billed).max(0.0) } else { 0.0 },
        billed_by_type,
        peak_machines: peak,
    }
}

/// The offline lower bound for the trace at p95 wait `w` (seconds), per instance type of the serving pools.
pub fn lower_bound(config: &FleetConfig, trace: &[TraceJob], w: f64) -> LowerBound {
    let desired = Desired::from_config(config);
    let mut by_type: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    for j in trace {
        if let Some(i) = crate::core::scale::serving_pool(&desired.pools, &j.labels) {
            let p = &desired.pools[i];
            by_type
                .entry((p.provider.clone(), p.spec.instance_type.clone().unwrap_or_default()))
                .or_default()
                .push((j.submit, j.duration));
        }
    }
    let late = trace.len() / 20;
    let mut out = LowerBound { p95_wait: w, billed_hours: 0.0, cost: 0.0, by_type: BTreeMap::new() };
    for ((provider, itype), jobs) in by_type {
        let billing = desired.billing(&provider, &itype);
        if billing.unit == crate::core::model::BillingUnit::Free {
            continue;
        }
        let minimum = billing.minimum.as_secs_f64();
        let (hours, hosts) = class_bound(&jobs, minimum, w, late);
        let work = jobs.iter().map(|j| j.1).sum::<f64>() / 3600.0;
        out.billed_hours += hours;
        out.cost += hours * desired.price(&provider, &itype).unwrap_or(0.0);
        out.by_type.insert(itype, (work, hosts, minimum / 3600.0, hours));
    }
    out
}

/// The peak number of jobs each pool would run at once if every job started on submission.
pub fn peak_concurrency(config: &FleetConfig, trace: &[TraceJob]) -> BTreeMap<String, u32> {
    let desired = Desired::from_config(config);
    let mut edges: BTreeMap<String, Vec<(f64, i32)>> = BTreeMap::new();
    for j in trace {
        if let Some(i) = crate::core::scale::serving_pool(&desired.pools, &j.labels) {
            let e = edges.entry(desired.pools[i].name.clone()).or_default();
            e.push((j.submit, 1));
            e.push((j.submit + j.duration, -1));
        }
    }
    edges
        .into_iter()
        .map(|(p, mut e)| {
            e.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let (mut cur, mut max) = (0i32, 0i32);
            for (_, d) in e {
                cur += d;
                max = max.max(cur);
            }
            (p, max as u32)
        })
        .collect()
}

/// The fleet file with every pool fixed at its peak and hosts never released.
pub fn static_variant(config: &FleetConfig, trace: &[TraceJob]) -> FleetConfig {
    let peaks = peak_concurrency(config, trace);
    let mut c = config.clone();
    for p in &mut c.pools {
        let peak = peaks.get(&p.name).copied().unwrap_or(0);
        p.count = Some(peak.max(p.scale.as_ref().map(|s| s.min).unwrap_or(0)));
        p.scale = None;
        p.hosts = Some(crate::config::HostsConfig { release: Some(crate::core::cost::ReleasePolicy::Never) });
    }
    c
}

/// The fleet file releasing hosts as soon as allowed, and scaling in as soon as a runner is idle.
pub fn asap_variant(config: &FleetConfig) -> FleetConfig {
    let mut c = config.clone();
    for p in &mut c.pools {
        p.hosts = Some(crate::config::HostsConfig { release: Some(crate::core::cost::ReleasePolicy::Asap) });
        if let Some(s) = &mut p.scale {
            s.idle_timeout = Some(crate::config::HumanDuration(Duration::from_secs(60)));
            s.idle = Some(0);
        }
    }
    c
}

/// Simulates the fleet's policy and the two others, and bounds them.
pub fn simulate(config: &FleetConfig, trace: &[TraceJob], seed: u64) -> Report {
    let fleet = run(config, trace, seed, "fleet");
    let stat = run(&static_variant(config, trace), trace, seed, "static-peak");
    let asap = run(&asap_variant(config), trace, seed, "release-asap");
    let lb = lower_bound(config, trace, fleet.wait_p95);
    let unserved = {
        let d = Desired::from_config(config);
        trace.iter().filter(|j| crate::core::scale::serving_pool(&d.pools, &j.labels).is_none()).count()
    };
    let horizon = trace
        .first()
        .map(|f| trace.iter().map(|j| j.submit + j.duration).fold(0.0, f64::max) - f.submit)
        .unwrap_or(0.0);
    Report {
        seed,
        jobs: trace.len(),
        horizon,
        ratio_to_lower_bound: if lb.billed_hours > 0.0 { fleet.billed_hours / lb.billed_hours } else { 1.0 },
        policies: vec![fleet, stat, asap],
        lower_bound: lb,
        unserved,
    }
}
