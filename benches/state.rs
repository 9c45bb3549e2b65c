//! Remote state benchmark (issue 14): lock acquire (+ release), journal download and journal upload (a
//! compare-and-swap) for a journal of 10,000 actions, against moto's S3 on loopback. Goal: under 100 ms each.
//!
//! Run with the peers up (`source scripts/peers.sh; peers_start`, which sets NIMBUS_MOTO_URL):
//! `cargo bench --bench state`. Figures are printed, never asserted.

use std::time::{Duration, Instant};

use nimbus::config::{StateBackend, StateConfig};
use nimbus::state::journal::Journal;
use nimbus::state::remote::S3State;

const ACTIONS: usize = 10_000;
const ROUNDS: usize = 20;

fn journal(dir: &std::path::Path) -> Vec<u8> {
    let mut j = Journal::open(&dir.join("journal.db")).unwrap();
    let run = j.start_run("apply", "bench", "fleet.yaml").unwrap();
    let rows: Vec<(usize, String, String, serde_json::Value)> = (0..ACTIONS)
        .map(|i| {
            let details =
                serde_json::json!({"type": "launch_instance", "pool": "p", "machine": format!("nimbus.bench.p.{i}")});
            (i, format!("p[{i}]"), "launch_instance".to_string(), details)
        })
        .collect();
    j.add_actions(run, &rows).unwrap();
    for i in 0..ACTIONS {
        j.action_started(run, i, None).unwrap();
        j.action_finished(run, i, "SUCCESS", None, None).unwrap();
    }
    j.snapshot().unwrap()
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<28} median {:>7.1} ms   p90 {:>7.1} ms   max {:>7.1} ms   (goal < 100 ms)",
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 9 / 10]),
        ms(*samples.last().unwrap())
    );
}

fn main() {
    let Ok(url) = std::env::var("NIMBUS_MOTO_URL") else {
        println!("state bench: NIMBUS_MOTO_URL is not set (start the peers: source scripts/peers.sh; peers_start)");
        return;
    };
    // SAFETY: set before any thread starts.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let dir = tempfile::tempdir().unwrap();
    let image = journal(dir.path());
    println!("journal of {ACTIONS} actions: {} KiB", image.len() / 1024);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let bucket = format!("nimbus-bench-{}", std::process::id());
        let config = StateConfig {
            backend: StateBackend::S3,
            bucket: Some(bucket.clone()),
            key: Some("bench/journal.db".into()),
            region: None,
            endpoint: Some(url.clone()),
            lock_lease: None,
            ..Default::default()
        };
        let s3 = S3State::from_config(&config).await.unwrap();
        s3.create_bucket().await.unwrap();

        let mut acquire = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let lock = s3.acquire("apply").await.unwrap();
            acquire.push(t.elapsed());
            s3.release(&lock).await.unwrap();
        }
        let mut upload = Vec::new();
        let mut etag = None;
        for _ in 0..ROUNDS {
            let t = Instant::now();
            etag = Some(s3.upload(image.clone(), etag.as_deref()).await.unwrap());
            upload.push(t.elapsed());
        }
        let mut download = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let (got, _) = s3.download().await.unwrap().unwrap();
            download.push(t.elapsed());
            assert_eq!(got.len(), image.len());
        }
        report("lock acquire", acquire);
        report("journal download", download);
        report("journal upload (CAS)", upload);
    });
}
