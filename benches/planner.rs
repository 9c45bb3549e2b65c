//! Planner benchmark: time and memory of `plan()` for 1,000, 10,000 and
//! 100,000 machines. Targets: 10k machines in under 100 ms and 200 MB RSS;
//! 100k in under 250 ms and 300 MB, the whole size (world setup included)
//! in under a minute (issue 23).
//!
//! Run: `cargo bench --bench planner` (each size runs in its own process so
//! that its memory is its own). Figures are printed, never asserted.

/// The allocator the `nimbus` binary uses (`src/main.rs`), so that the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use nimbus::core::model::*;
use nimbus::core::plan::plan;
use nimbus::testing::{Simulator, desired, pool};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Hands freed memory back to the system (mimalloc's `mi_collect`), so that what is measured is what is live.
fn release_free_memory() {
    unsafe extern "C" {
        // mimalloc's own, in the library the `mimalloc` crate links.
        fn mi_collect(force: bool);
    }
    // SAFETY: mi_collect only frees mimalloc's own unused pages.
    unsafe { mi_collect(true) }
}

/// One size, in this process: prints a line of figures.
fn run_size(n: u32) {
    let started = Instant::now();
    let pools = 20u32;
    let per = n / pools;
    let make = |image: &str, count: u32| {
        desired(
            "acme",
            (0..pools)
                .map(|i| {
                    if i % 2 == 0 {
                        pool(&format!("mac-{i}"), "aws", count, "mac2.metal", image)
                    } else {
                        pool(&format!("linux-{i}"), "aws", count, "t3.large", image)
                    }
                })
                .collect(),
        )
    };
    let t0 = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
    // A converged world of n machines.
    let built = make("ami-1", per);
    let mut world = Actual { runners: Some(vec![]), ..Default::default() };
    Simulator::default().apply(
        &built,
        &mut world,
        &plan(&built, &Actual { runners: Some(vec![]), ..Default::default() }, t0),
        t0,
    );
    // The desired fleet: one pool gets a new image, every pool grows by 5%, labels change in another.
    let mut want = make("ami-1", per + per / 20);
    want.pools[0].spec.image = "ami-2".into();
    want.pools[1].runner.as_mut().unwrap().labels.push("new".into());
    let now = t0 + chrono::Duration::hours(2);

    // Building the world planned and applied every machine's creation: that plan is gone, but the allocator keeps
    // its freed memory. Hand it back, so that what is measured is the world and the plan, as in a real `nimbus plan`
    // (discovery, then one plan).
    release_free_memory();
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset the RSS high-water mark
    let rss_before = status_kb("VmRSS:");
    let mut times = Vec::new();
    let mut actions = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let p = std::hint::black_box(plan(&want, &world, now));
        times.push(start.elapsed());
        actions = p.graph.node_count();
        // Untimed: the plan's memory goes back, so that the next plan starts from the heap the first one had (a
        // `nimbus plan` makes one plan).
        drop(p);
        release_free_memory();
    }
    let peak = status_kb("VmHWM:");
    times.sort();
    let median: Duration = times[times.len() / 2];
    println!(
        "{n:>7} machines  {actions:>6} actions  plan median {:>8.1} ms (min {:>7.1} ms)  peak RSS {:>6.1} MB (world resident before planning {:>6.1} MB, {:.1} KB per machine)  whole size {:.1} s",
        median.as_secs_f64() * 1000.0,
        times[0].as_secs_f64() * 1000.0,
        peak as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss_before as f64 * 1024.0 / f64::from(n) / 1000.0,
        started.elapsed().as_secs_f64(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--size") {
        run_size(args[i + 1].parse().expect("size"));
        return;
    }
    let me = std::env::current_exe().expect("bench binary");
    println!("planner benchmark (targets: 10,000 machines < 100 ms, < 200 MB RSS; 100,000 < 250 ms, < 300 MB)");
    for n in [1_000u32, 10_000, 100_000] {
        let status = Command::new(&me).args(["--size", &n.to_string()]).status().expect("runs");
        assert!(status.success());
    }
}
