//! The example workflows' own command lines, run against the quickstart:
//! the plan-comment and drift steps produce Markdown and the exit code the
//! following steps rely on (2 = changes, 0 = none), and every workflow uses a
//! `concurrency:` group so runs on one fleet never overlap.

use std::path::Path;
use std::process::Command;

fn steps(file: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(file).unwrap();
    let wf: serde_json::Value = yaml_serde::from_str(&text).unwrap();
    let steps = wf["jobs"].as_object().unwrap().values().flat_map(|j| j["steps"].as_array().unwrap().clone()).collect();
    (wf, steps)
}

/// Runs the action's command step (`scripts/action-run.sh`) as a workflow step that `uses: ./` does: with its
/// `command` and `fleet-file` inputs, `nimbus` on PATH, in `dir`. Returns the exit code it reports and its status.
fn run_action_step(step: &serde_json::Value, dir: &Path) -> (Option<i32>, bool) {
    assert_eq!(step["uses"], "./", "the repository's own workflows use its action: {step}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_nimbus")).parent().unwrap();
    let fleet = dir.join("fleet.yaml");
    let out_file = dir.join("github_output");
    let _ = std::fs::remove_file(&out_file);
    let status = Command::new("bash")
        .arg(Path::new("scripts/action-run.sh").canonicalize().unwrap())
        .current_dir(dir)
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()))
        .env("COMMAND", step["with"]["command"].as_str().unwrap())
        .env("FLEET_FILE", &fleet)
        .env("BASE_FLEET_FILE", &fleet)
        .env("GITHUB_OUTPUT", &out_file)
        .env("NO_COLOR", "1")
        .status()
        .unwrap();
    let outputs = std::fs::read_to_string(&out_file).unwrap_or_default();
    let code = outputs.lines().find_map(|l| l.strip_prefix("exitcode=")).map(|c| c.parse().unwrap());
    (code, status.success())
}

#[test]
fn workflow_commands_work_on_the_quickstart() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.yaml");
    std::fs::copy("examples/quickstart/fleet.yaml", &fleet).unwrap();

    for (file, id, md) in [
        (".github/workflows/nimbus-plan-comment.yml", "plan", "nimbus-plan.md"),
        (".github/workflows/nimbus-drift.yml", "drift", "nimbus-drift.md"),
    ] {
        let (wf, steps) = steps(file);
        assert!(wf["concurrency"]["group"].as_str().unwrap().starts_with("nimbus-fleet-"), "{file}");
        assert_eq!(wf["concurrency"]["cancel-in-progress"], false, "{file}: an apply must never be cancelled halfway");
        let step = steps.iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("{file}: no step `{id}`"));
        assert_eq!(step["with"]["command"], id, "{file}");
        assert_eq!(step["with"]["fleet-file"], "examples/quickstart/fleet.yaml", "{file}");
        // No workflow builds nimbus from source any more: the action installs a release.
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!text.contains("cargo install") && !text.contains("rust-toolchain"), "{file} builds from source");
        let _ = std::fs::remove_dir_all(dir.path().join(".nimbus"));
        let (code, ok) = run_action_step(step, dir.path());
        assert!(ok, "{file}");
        assert_eq!(code, Some(2), "{file}: a fresh quickstart has changes");
        let body = std::fs::read_to_string(dir.path().join(md)).unwrap();
        assert!(body.starts_with("<!-- nimbus-plan -->"), "{file}: the comment marker leads the body");
        assert!(body.contains("Plan: 2 to add, 0 to change, 0 to destroy."));

        let o = Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(["apply", "--auto-approve", "-f"])
            .arg(&fleet)
            .output()
            .unwrap();
        assert!(o.status.success());
        let (code, _) = run_action_step(step, dir.path());
        assert_eq!(code, Some(0), "{file}: no drift after apply");
        assert!(std::fs::read_to_string(dir.path().join(md)).unwrap().contains("No changes."));
    }

    // Issue 13: the plan comment runs on `pull_request` only; the action passes the base branch's fleet file as
    // the trusted base, and updates only a comment of its own identity.
    let (wf, _) = self::steps(".github/workflows/nimbus-plan-comment.yml");
    let on = wf["on"].as_object().unwrap();
    assert!(on.contains_key("pull_request") && !on.contains_key("pull_request_target"), "{on:?}");
    assert_eq!(wf["permissions"]["contents"], "read");
    let run = std::fs::read_to_string("scripts/action-run.sh").unwrap();
    assert!(run.contains("--trusted-base \"$BASE_FLEET_FILE\""), "{run}");
    let action = std::fs::read_to_string("action.yml").unwrap();
    assert!(action.contains("git show \"origin/$BASE_REF:$FLEET_FILE\" > \"$BASE_FLEET_FILE\""));
    assert!(action.contains("c.user.login === 'github-actions[bot]'"), "the comment finder checks the author");

    // A broken fleet file makes the step itself fail (exit 1), never report "drift".
    std::fs::write(&fleet, "version: 1\ntenant: Bad Name\nproviders: {}\n").unwrap();
    let (_, steps) = self::steps(".github/workflows/nimbus-drift.yml");
    let step = steps.iter().find(|s| s["id"] == "drift").unwrap();
    let (code, ok) = run_action_step(step, dir.path());
    assert!(!ok, "a broken fleet file fails the step");
    assert_eq!(code, Some(1));
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(env!("CARGO_BIN_EXE_nimbus")).args(["completions", shell]).output().unwrap();
        assert!(o.status.success());
        let s = String::from_utf8(o.stdout).unwrap();
        assert!(s.contains("nimbus") && s.contains("detailed-exitcode"), "{shell}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_nimbus")).arg("man").output().unwrap();
    let man = String::from_utf8(o.stdout).unwrap();
    assert!(man.starts_with(".ie") || man.contains(".TH nimbus"), "{}", &man[..200.min(man.len())]);
}

/// Issue 23.7: every workflow passes `zizmor` (PyPI, installed into the peers' venv by the test script) with no
/// findings, and the check has teeth: a workflow with `pull_request_target`, a checkout of the pull request's
/// head and a template injection gets findings.
#[test]
fn workflows_pass_zizmor_and_a_bad_one_does_not() {
    let Some(zizmor) = crate::common::peer_value("NIMBUS_ZIZMOR", "zizmor (PyPI)") else { return };
    let o = Command::new(&zizmor).args(["--offline", ".github/workflows/", "action.yml"]).output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "zizmor found problems in .github/workflows:\n{out}");
    assert!(out.contains("No findings"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("bad.yml");
    std::fs::write(
        &wf,
        "name: bad\non: pull_request_target\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - uses: actions/checkout@34e114876b0b11c390a56381ad16ebd13914f8d5 # v4.3.1\n        with:\n          ref: ${{ github.event.pull_request.head.sha }}\n      - run: echo \"${{ github.event.pull_request.title }}\"\n",
    )
    .unwrap();
    let o = Command::new(&zizmor).arg("--offline").arg(&wf).output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "zizmor found nothing in a dangerous workflow:\n{out}");
    assert!(out.contains("template-injection") && out.contains("dangerous-triggers"), "{out}");
}

/// Issue 23.7: every workflow passes actionlint (upstream rhysd/actionlint, installed by the test script) with
/// no findings, and the check has teeth: a workflow with an undefined input of a known action, a bad expression
/// and a malformed timeout gets each reported with its line.
#[test]
fn workflows_pass_actionlint_and_a_bad_one_does_not() {
    let Some(actionlint) = crate::common::peer_value("NIMBUS_ACTIONLINT", "actionlint (rhysd/actionlint)") else {
        return;
    };
    let o = Command::new(&actionlint).arg(".github/workflows/*.yml").output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "actionlint found problems in .github/workflows:\n{out}");
    let workflows = std::fs::read_dir(".github/workflows").unwrap().count();
    assert!(out.contains(&format!("Checking {workflows} workflow file(s)")), "every workflow was checked: {out}");
    assert!(out.contains("All workflow files passed"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yml"),
        "name: bad\non: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    timeout-minutes: soon\n    steps:\n      - uses: actions/checkout@v4\n        with:\n          reff: main\n      - run: echo \"${{ matrix.nothing }}\"\n",
    )
    .unwrap();
    let o = Command::new(&actionlint).arg("bad.yml").current_dir(dir.path()).output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "actionlint found nothing in a broken workflow:\n{out}");
    for finding in ["bad.yml:6:", "bad.yml:10:11 input \"reff\" is not defined", "bad.yml:11:"] {
        assert!(out.contains(finding), "{finding} in:\n{out}");
    }
}

/// Issue 23.5: the release workflow builds the three targets with `--locked` through `scripts/package.sh`, and
/// attests and publishes what it makes; the same script, run here for this machine's own target (on the test
/// binary, to spare a release build), makes an archive of the promised layout whose sum checks out and whose
/// binary runs.
#[test]
fn release_packaging_is_the_workflows_own() {
    let wf = std::fs::read_to_string(".github/workflows/release.yml").unwrap();
    for t in ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl", "aarch64-apple-darwin"] {
        assert!(wf.contains(t), "release.yml builds {t}");
    }
    assert!(wf.contains("bash scripts/package.sh \"$TARGET\" dist"), "the workflow calls the packaging script");
    assert!(wf.contains("actions/attest-build-provenance@") && wf.contains("SHA256SUMS"));
    let script = std::fs::read_to_string("scripts/package.sh").unwrap();
    assert!(script.contains("cargo build --release --locked --target"));

    let out = tempfile::tempdir().unwrap();
    let host = String::from_utf8(Command::new("rustc").arg("-vV").output().unwrap().stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .unwrap();
    let o = Command::new("bash")
        .arg("scripts/package.sh")
        .arg(&host)
        .arg(out.path())
        .arg(env!("CARGO_BIN_EXE_nimbus"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let name = format!("nimbus-{}-{host}", env!("CARGO_PKG_VERSION"));
    let archive = out.path().join(format!("{name}.tar.gz"));
    let list = Command::new("tar").arg("tzf").arg(&archive).output().unwrap();
    let mut entries: Vec<String> = String::from_utf8_lossy(&list.stdout).lines().map(str::to_string).collect();
    entries.sort();
    assert_eq!(
        entries,
        [format!("{name}/"), format!("{name}/LICENSE"), format!("{name}/README.md"), format!("{name}/nimbus")]
    );
    let sums = std::fs::read_to_string(out.path().join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 1);
    assert!(sums.trim_end().ends_with(&format!("  {name}.tar.gz")), "{sums}");
    let check = Command::new("sha256sum").arg("-c").arg("SHA256SUMS").current_dir(out.path()).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    // Unpacked, it runs.
    assert!(Command::new("tar").arg("xzf").arg(&archive).current_dir(out.path()).status().unwrap().success());
    let v = Command::new(out.path().join(&name).join("nimbus")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Issue 23.6: the reusable action (composite, `action.yml`): its install step downloads a release and refuses
/// one whose sha256 is not the pinned one; its run step plans, detects drift and applies with the exit codes the
/// comment and issue steps rely on.
#[test]
fn the_action_installs_a_verified_release_and_runs_nimbus() {
    let action: serde_json::Value = yaml_serde::from_str(&std::fs::read_to_string("action.yml").unwrap()).unwrap();
    assert_eq!(action["runs"]["using"], "composite");
    for input in ["command", "fleet-file", "version", "sha256", "github-token"] {
        assert!(action["inputs"][input]["description"].is_string(), "input {input} is documented");
    }
    let steps = action["runs"]["steps"].as_array().unwrap();
    let uses: Vec<&str> = steps.iter().filter_map(|s| s["uses"].as_str()).collect();
    assert!(uses.iter().all(|u| u.split('@').nth(1).is_some_and(|r| r.len() == 40)), "pinned to commits: {uses:?}");
    let text = std::fs::read_to_string("action.yml").unwrap();
    assert!(text.contains("scripts/install.sh") && text.contains("scripts/action-run.sh"));

    // A release of this very binary, as scripts/package.sh makes it, served from a folder.
    let dir = tempfile::tempdir().unwrap();
    let host = String::from_utf8(Command::new("rustc").arg("-vV").output().unwrap().stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .unwrap();
    let rel = dir.path().join("release");
    assert!(
        Command::new("bash")
            .arg("scripts/package.sh")
            .arg(&host)
            .arg(&rel)
            .arg(env!("CARGO_BIN_EXE_nimbus"))
            .status()
            .unwrap()
            .success()
    );
    let install = |sha: &str| {
        Command::new("bash")
            .arg("scripts/install.sh")
            .env("VERSION", env!("CARGO_PKG_VERSION"))
            .env("NIMBUS_TARGET", &host)
            .env("NIMBUS_RELEASE_URL", format!("file://{}", rel.display()))
            .env("SHA256", sha)
            .env("PREFIX", dir.path().join("prefix"))
            .env("GITHUB_PATH", dir.path().join("github_path"))
            .output()
            .unwrap()
    };
    let bad = install(&"0".repeat(64));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not installing it"));
    assert!(!dir.path().join("prefix/bin/nimbus").exists(), "nothing unverified was installed");
    let ok = install("");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let bin = dir.path().join("prefix/bin");
    assert!(bin.join("nimbus").exists());
    assert_eq!(std::fs::read_to_string(dir.path().join("github_path")).unwrap().trim(), bin.display().to_string());

    // The run step on the quickstart: drift (2), apply, drift (0), a pull request's plan (0, Markdown).
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let fleet = work.join("fleet.yaml");
    std::fs::copy("examples/quickstart/fleet.yaml", &fleet).unwrap();
    let run = |command: &str| {
        let out = work.join("github_output");
        let _ = std::fs::remove_file(&out);
        let st = Command::new("bash")
            .arg(std::path::Path::new("scripts/action-run.sh").canonicalize().unwrap())
            .current_dir(&work)
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
            .env("COMMAND", command)
            .env("FLEET_FILE", &fleet)
            .env("BASE_FLEET_FILE", &fleet)
            .env("GITHUB_OUTPUT", &out)
            .env("NO_COLOR", "1")
            .status()
            .unwrap();
        assert!(st.success(), "{command}");
        std::fs::read_to_string(&out).unwrap().trim().to_string()
    };
    assert_eq!(run("drift"), "exitcode=2");
    assert_eq!(run("apply"), "exitcode=0");
    assert_eq!(run("drift"), "exitcode=0");
    assert_eq!(run("plan"), "exitcode=0");
    assert!(std::fs::read_to_string(work.join("nimbus-plan.md")).unwrap().contains("No changes"));
}
