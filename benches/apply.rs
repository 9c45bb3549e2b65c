//! Apply benchmark: N = 50 local machines, each provider action delayed by
//! D ms and each setup step sleeping D ms, at parallelism ≥ N. Reports wall
//! time against the critical path (the longest dependency chain, weighted by
//! each action's measured duration). Target: ratio ≤ 1.3.
//!
//! Run: `cargo bench --bench apply` (figures are printed, never asserted).

/// The allocator the `nimbus` binary uses (`src/main.rs`), so that the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nimbus::core::model::{Actual, Desired};
use nimbus::core::plan::plan;
use nimbus::engine::actions::Applier;
use nimbus::engine::walk::{ExecEvent, execute};
use nimbus::providers::Provider;
use nimbus::providers::local::LocalProvider;
use petgraph::Direction;
use petgraph::algo::toposort;

fn fleet(n: u32, d_ms: u64) -> String {
    format!(
        "version: 1\ntenant: bench\nproviders:\n  local: {{type: local}}\npools:\n  - name: p\n    provider: local\n    count: {n}\n    machine: {{os: linux, arch: x86_64, image: img}}\n    setup:\n      - name: s\n        run: sleep {}\n",
        d_ms as f64 / 1000.0
    )
}

/// Where the sandboxes go: `NIMBUS_BENCH_DIR`, else tmpfs (`/dev/shm`) when there is one, else the system's
/// temporary folder. On a disk file system the kernel's inode allocation dominates once earlier runs have deleted
/// thousands of sandbox files (ext4 skips recently deleted inodes one by one: `perf` shows `find_inode_bit` and
/// `recently_deleted`, `strace -c` 0.3 ms per `mkdir`); that is the machine's file system, not nimbus, so the
/// figures are taken on tmpfs by default. `NIMBUS_BENCH_DIR=/tmp` measures the disk.
fn sandbox_base() -> std::path::PathBuf {
    match std::env::var_os("NIMBUS_BENCH_DIR") {
        Some(d) => d.into(),
        None if std::path::Path::new("/dev/shm").is_dir() => "/dev/shm".into(),
        None => std::env::temp_dir(),
    }
}

fn run(n: u32, d_ms: u64, parallelism: usize) {
    let dir = tempfile::tempdir_in(sandbox_base()).unwrap();
    let cfg = nimbus::config::parse("bench.yaml", &fleet(n, d_ms)).expect("valid");
    let desired = Desired::from_config(&cfg);
    let provider: Arc<dyn Provider> = Arc::new(
        LocalProvider::new("local", cfg.tenant.clone(), dir.path().join("local"))
            .with_delay(Duration::from_millis(d_ms)),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let p = plan(&desired, &Actual::default(), chrono::Utc::now());
    let graph = Arc::new(p.graph.clone());
    let applier = Arc::new(Applier::new(desired, &Actual::default(), vec![provider], None));
    let mut durations: HashMap<usize, Duration> = HashMap::new();
    let report = rt.block_on(execute(graph.clone(), applier, parallelism, |e| {
        if let ExecEvent::Finished { id, elapsed, .. } = e {
            durations.insert(*id, *elapsed);
        }
    }));
    assert!(report.succeeded(), "{:?}", report.root_causes);
    // Longest path through the DAG, weighted by measured durations.
    let mut finish: HashMap<usize, Duration> = HashMap::new();
    for node in toposort(&*graph, None).unwrap() {
        let start =
            graph.neighbors_directed(node, Direction::Incoming).map(|p| finish[&p.index()]).max().unwrap_or_default();
        finish.insert(node.index(), start + durations[&node.index()]);
    }
    let critical = finish.values().max().copied().unwrap_or_default();
    if std::env::var_os("NIMBUS_BENCH_DETAIL").is_some() {
        let mut by_kind: HashMap<&str, (Duration, u32)> = HashMap::new();
        for (id, d) in &durations {
            let e = by_kind.entry(graph[petgraph::graph::NodeIndex::new(*id)].kind.name()).or_default();
            e.0 += *d;
            e.1 += 1;
        }
        for (k, (d, c)) in by_kind {
            println!("    {k:<16} mean {:>6.1} ms", d.as_secs_f64() * 1000.0 / f64::from(c));
        }
    }
    // The nominal chain: launch (D) → wait → setup (one step sleeping D).
    let nominal = 2.0 * d_ms as f64;
    let wall = report.wall.as_secs_f64() * 1000.0;
    println!(
        "N={n:<3} D={d_ms:>4} ms  parallelism={parallelism:<3} actions={:<4} wall {wall:>7.1} ms  measured critical path {:>7.1} ms (ratio {:.2})  nominal 2D {nominal:>6.0} ms (ratio {:.2})",
        graph.node_count(),
        critical.as_secs_f64() * 1000.0,
        report.wall.as_secs_f64() / critical.as_secs_f64(),
        wall / nominal,
    );
}

fn main() {
    println!(
        "apply benchmark (targets: wall ≤ 1.3 × critical path at parallelism ≥ N; ≤ 2.0 × nominal at D = 50 ms, ≤ 1.3 × at D = 200 ms); sandboxes in {}",
        sandbox_base().display()
    );
    for d in [50, 200, 500] {
        run(50, d, 64);
    }
    run(50, 200, 10);
}
