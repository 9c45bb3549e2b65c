//! Discovery benchmark (issue 23.3): `nimbus plan` against 10,000 moto instances and 200 dedicated hosts, read
//! over several pages (1,000 instances and 100 hosts per page), against one boto3 paginated DescribeInstances of
//! the same instances in the same run.
//!
//! Needs the moto peer: run it under the peers, e.g. `source scripts/peers.sh; peers_start; cargo bench --bench
//! discovery` (without `NIMBUS_MOTO_URL` it says so and does nothing). Seeding goes through boto3 in moto's venv
//! (`NIMBUS_PEERS_PYTHON`, else `.peers/venv/bin/python`); sizes from `NIMBUS_BENCH_MACS` (200) and
//! `NIMBUS_BENCH_LINUX` (9,800), in `NIMBUS_BENCH_REGION` (eu-west-3), `NIMBUS_BENCH_ROUNDS` (3) rounds. Figures
//! are printed, never asserted. moto looked each resource's tags up among every tag of the region, which made a
//! page of 10,000 instances take minutes; the project's moto patch (`scripts/peers.sh`, "tags by id") looks
//! them up by id.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn python() -> PathBuf {
    std::env::var_os("NIMBUS_PEERS_PYTHON")
        .or_else(|| std::env::var_os("NIMBUS_REGOPY_PYTHON"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".peers/venv/bin/python"))
}

fn env_num(var: &str, default: u32) -> u32 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `/usr/bin/time`'s figures for one command: (wall s, user+sys s, peak RSS MB, exit code).
fn timed(cmd: &mut Command) -> (f64, f64, f64, i32) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("time");
    let mut t = Command::new("/usr/bin/time");
    t.arg("-o").arg(&out).arg("-f").arg("%e %U %S %M").arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        t.current_dir(d);
    }
    let status = t.stdout(std::process::Stdio::null()).status().expect("/usr/bin/time runs");
    let s = std::fs::read_to_string(&out).unwrap();
    let f: Vec<f64> = s.lines().last().unwrap().split_whitespace().map(|x| x.parse().unwrap()).collect();
    (f[0], f[1] + f[2], f[3] / 1024.0, status.code().unwrap_or(-1))
}

fn main() {
    let Ok(moto) = std::env::var("NIMBUS_MOTO_URL") else {
        println!(
            "discovery benchmark: NIMBUS_MOTO_URL is not set (start the peers: `source scripts/peers.sh; peers_start`)"
        );
        return;
    };
    assert!(moto.starts_with("http://127."), "moto must be on loopback: {moto}");
    let (macs, linux) = (env_num("NIMBUS_BENCH_MACS", 200), env_num("NIMBUS_BENCH_LINUX", 9_800));
    // A region no test uses (and not the peers' read-lag regions), and a tenant of its own: the figures are this
    // fleet's alone.
    let region = std::env::var("NIMBUS_BENCH_REGION").unwrap_or_else(|_| "eu-west-3".into());
    let region = region.as_str();
    let tenant = format!("disco{}", std::process::id());
    let fleet = "discovery-bench";
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/discovery/seed.py");
    let py = |args: &[&str]| {
        let out = Command::new(python()).arg(seed).args(args).output().expect("python runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let started = Instant::now();
    py(&["seed", &moto, region, &tenant, fleet, &macs.to_string(), &linux.to_string()]);
    println!(
        "discovery benchmark: seeded {} instances and {macs} hosts on moto in {:.0} s",
        macs + linux,
        started.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fleet.yaml"),
        format!(
            "version: 1\ntenant: {tenant}\nfleet: {fleet}\nproviders:\n  aws:\n    type: aws\n    region: {region}\n    post_available_delay: 0s\npools:\n  - name: mac\n    provider: aws\n    count: {macs}\n    machine: {{os: macos, arch: arm64, instance_type: mac2.metal, image: ami-0abc, availability_zone: {region}a}}\n  - name: linux\n    provider: aws\n    count: {linux}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: {region}a}}\n"
        ),
    )
    .unwrap();
    let nimbus = env!("CARGO_BIN_EXE_nimbus");
    for round in 1..=env_num("NIMBUS_BENCH_ROUNDS", 3) {
        let mut cmd = Command::new(nimbus);
        cmd.args(["plan", "--detailed-exitcode", "-f", "fleet.yaml"]).current_dir(dir.path());
        for (k, v) in [
            ("AWS_ENDPOINT_URL", moto.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ("NO_COLOR", "1"),
        ] {
            cmd.env(k, v);
        }
        let (wall, cpu, rss, code) = timed(&mut cmd);
        let boto: Vec<String> =
            py(&["time", &moto, region, &tenant, fleet]).split_whitespace().map(String::from).collect();
        let boto_wall: f64 = boto[0].parse().unwrap();
        println!(
            "round {round}: nimbus plan (exit {code}: 0 = converged) wall {wall:.2} s, CPU {cpu:.2} s, peak RSS {rss:.1} MB; boto3 paginated DescribeInstances of the same {} instances: {boto_wall:.2} s; ratio {:.2}",
            boto[1],
            wall / boto_wall
        );
    }
}
