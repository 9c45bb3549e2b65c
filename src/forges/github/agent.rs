//! GitHub's runner agent (`actions/runner`) on a machine: download, `config.sh` (persistent, as a service)
//! or `run.sh` with a JIT config (ephemeral), and removal. The registration secret is read from stdin and
//! handed to the agent in its environment (`ACTIONS_RUNNER_INPUT_TOKEN` / `ACTIONS_RUNNER_INPUT_JITCONFIG`),
//! never put on a command line. The download is checked against its sha256 before it is unpacked: from a table
//! pinned here per release, or from the fleet file's `forge.runner_sha256`.

use std::collections::BTreeMap;

use crate::config::{Arch, Os};
use crate::forges::{AgentInstall, AgentTarget, Registration, RunnerAgent};
use crate::util::shell;

/// Where the agent goes unless the fleet file says otherwise.
pub const DEFAULT_RUNNER_DIR: &str = "$HOME/actions-runner";

/// The agent release installed unless the fleet file's `forge.runner_version` says otherwise. Maintained with
/// [`PINNED_SHA256`]: a new default comes with its four checksums, as GitHub publishes them with the release.
pub const DEFAULT_RUNNER_VERSION: &str = "2.321.0";

/// The file in the runner directory where nimbus records the agent release it installed.
pub const VERSION_MARKER: &str = ".nimbus-agent-version";

/// Exit code of an update script that found a job running on the machine (nothing was changed).
pub const UPDATE_BUSY_EXIT: i32 = 75;

/// The sha256 of each official `actions/runner` release tarball nimbus knows, as GitHub publishes them with the
/// release: (version, `os-arch`, sha256).
pub const PINNED_SHA256: &[(&str, &str, &str)] = &[
    ("2.321.0", "linux-x64", "ba46ba7ce3a4d7236b16fbe44419fb453bc08f866b24f04d549ec89f1722a29e"),
    ("2.321.0", "linux-arm64", "62cc5735d63057d8d07441507c3d6974e90c1854bdb33e9c8b26c0da086336e1"),
    ("2.321.0", "osx-x64", "b2c91416b3e4d579ae69fc2c381fc50dbda13f1b3fcc283187e2c75d1b173072"),
    ("2.321.0", "osx-arm64", "fbee07e42a134645d4f04f8146b0a3d0b3c948f0d6b2b9fa61f4318c1192ff79"),
];

/// Whether agent release `a` is older than `b` (dotted numbers, compared numerically; anything else compares as
/// text).
pub fn version_older(a: &str, b: &str) -> bool {
    let parse =
        |v: &str| v.trim_start_matches('v').split('.').map(|p| p.parse::<u64>().ok()).collect::<Option<Vec<_>>>();
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x < y,
        _ => a < b,
    }
}

/// The official download URL of a release for a platform.
pub fn official_url(version: &str, os: &str, arch: &str) -> String {
    format!(
        "https://github.com/actions/runner/releases/download/v{version}/actions-runner-{os}-{arch}-{version}.tar.gz"
    )
}

pub struct GithubAgent {
    /// Download URL template; `{os}`, `{arch}` and `{version}` are filled in.
    pub download_url: String,
    /// The release to install (`forge.runner_version`).
    pub version: String,
    /// The fleet file's checksums by `os-arch` (`forge.runner_sha256`); they win over the pinned table.
    pub sha256: BTreeMap<String, String>,
}

impl GithubAgent {
    pub fn new(download_url: impl Into<String>) -> Self {
        GithubAgent {
            download_url: download_url.into(),
            version: DEFAULT_RUNNER_VERSION.into(),
            sha256: BTreeMap::new(),
        }
    }

    /// Installs release `version` (`forge.runner_version`).
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// The download URL for a platform.
    pub fn url(&self, os: &str, arch: &str) -> String {
        self.download_url.replace("{os}", os).replace("{arch}", arch).replace("{version}", &self.version)
    }
    /// The sha256 the download for a platform must have: the fleet file's, or the pinned one when the URL is an
    /// official release's.
    pub fn expected_sha256(&self, os: &str, arch: &str) -> Option<String> {
        let platform = format!("{os}-{arch}");
        if let Some(s) = self.sha256.get(&platform) {
            return Some(s.to_ascii_lowercase());
        }
        let url = self.url(os, arch);
        PINNED_SHA256
            .iter()
            .find(|(v, p, _)| *p == platform && official_url(v, os, arch) == url)
            .map(|(_, _, sum)| sum.to_string())
    }

    /// The agent's names for an OS and an architecture (`osx`/`linux`, `x64`/`arm64`).
    pub fn platform(os: Os, arch: Arch) -> (&'static str, &'static str) {
        let os = match os {
            Os::Macos => "osx",
            Os::Linux => "linux",
        };
        let arch = match arch {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "x64",
        };
        (os, arch)
    }

    fn dir_word(t: &AgentTarget) -> String {
        crate::forges::agent_dir_word(t, DEFAULT_RUNNER_DIR)
    }
}

impl GithubAgent {
    /// Shell lines (in the runner directory) that download release `self.version`, check its sha256 and unpack it
    /// over what is there, then record the release in [`VERSION_MARKER`]. Nothing unverified is unpacked: without
    /// a known checksum they fail before downloading.
    fn download(&self, t: &AgentTarget) -> String {
        let (os, arch) = Self::platform(t.os, t.arch);
        let url = self.url(os, arch);
        let (refuse, verify) = match self.expected_sha256(os, arch) {
            Some(sum) => (
                String::new(),
                format!(
                    "  sum=$( (sha256sum runner.tgz 2>/dev/null || shasum -a 256 runner.tgz) | cut -d' ' -f1)\n  if [ \"$sum\" != {want} ]; then rm -f runner.tgz; echo \"the runner agent from \"{url}\" has sha256 $sum, not \"{want}\": not installing it (check forge.runner_download_url and forge.runner_sha256)\" >&2; exit 1; fi\n",
                    want = shell::quote(&sum),
                    url = shell::quote(&url),
                ),
            ),
            None => (
                format!(
                    "  echo \"no sha256 is known for the runner agent at \"{url}\": add forge.runner_sha256.{os}-{arch} to the fleet file\" >&2; exit 1\n",
                    url = shell::quote(&url),
                ),
                String::new(),
            ),
        };
        format!(
            "{refuse}  if command -v curl >/dev/null; then curl -fsSL {url} -o runner.tgz; else wget -q -O runner.tgz {url}; fi\n{verify}  tar xzf runner.tgz; rm -f runner.tgz\n  printf '%s\\n' {version} > {marker}\n",
            url = shell::quote(&url),
            version = shell::quote(&self.version),
            marker = VERSION_MARKER,
        )
    }
}

impl RunnerAgent for GithubAgent {
    fn version(&self) -> Option<&str> {
        Some(&self.version)
    }

    fn install(&self, t: &AgentTarget, reg: &Registration) -> AgentInstall {
        // The runner is not registered yet, so no job can be running: an agent nimbus installed at another release
        // is replaced by the wanted one before it registers. An agent that came with the image (no marker) is used
        // as it is.
        let install = format!(
            "set -e\nIFS= read -r secret\ndir={dir}\nmkdir -p \"$dir\"; cd \"$dir\"\nif [ ! -x ./config.sh ] || {{ [ -f {marker} ] && [ \"$(cat {marker})\" != {version} ]; }}; then\n{download}fi\n",
            dir = Self::dir_word(t),
            marker = VERSION_MARKER,
            version = shell::quote(&self.version),
            download = self.download(t),
        );
        let script = if reg.ephemeral {
            // The agent reads any argument from `ACTIONS_RUNNER_INPUT_<NAME>`: in its environment, the secret is
            // not in argv, where `ps` would show it for the runner's whole life.
            format!("{install}ACTIONS_RUNNER_INPUT_JITCONFIG=\"$secret\" nohup ./run.sh >/dev/null 2>&1 &\n")
        } else {
            format!(
                "{install}ACTIONS_RUNNER_INPUT_TOKEN=\"$secret\" ./config.sh --unattended --replace --url {} --name {} --labels {}{}\n\
                 if [ -x ./svc.sh ]; then (sudo -n ./svc.sh install 2>/dev/null || ./svc.sh install) && (sudo -n ./svc.sh start 2>/dev/null || ./svc.sh start); fi\n",
                shell::quote(reg.url.as_deref().unwrap_or_default()),
                shell::quote(t.machine),
                shell::quote(&t.labels.join(",")),
                match reg.group.as_deref() {
                    Some(g) => format!(" --runnergroup {}", shell::quote(g)),
                    None => String::new(),
                },
            )
        };
        AgentInstall { script, stdin: format!("{}\n", reg.secret.expose()).into_bytes() }
    }

    fn restart(&self, t: &AgentTarget) -> String {
        format!(
            "set -e\ndir={dir}\ncd \"$dir\"\nif [ -x ./svc.sh ]; then (sudo -n ./svc.sh stop 2>/dev/null || ./svc.sh stop || true); (sudo -n ./svc.sh start 2>/dev/null || ./svc.sh start); else nohup ./run.sh >/dev/null 2>&1 & fi\n",
            dir = Self::dir_word(t)
        )
    }

    fn update(&self, t: &AgentTarget) -> String {
        // In place, while the runner is idle: a job's worker process on the machine stops the update before it
        // changes anything (exit 75), whatever the forge said when the plan was made. The registration
        // (`.runner`, `.credentials`) stays; the new release is unpacked over the old one and the agent restarted.
        format!(
            "set -e\ndir={dir}\ncd \"$dir\"\nif ps -eo args 2>/dev/null | grep -v grep | grep -q 'Runner.Worker'; then echo 'a job is running on this machine: the agent is not updated now' >&2; exit {busy}; fi\nif [ -x ./svc.sh ] && [ -f .service ]; then (sudo -n ./svc.sh stop 2>/dev/null || ./svc.sh stop || true); fi\n{download}if [ -x ./svc.sh ] && [ -f .service ]; then (sudo -n ./svc.sh start 2>/dev/null || ./svc.sh start); elif [ -x ./svc.sh ]; then (sudo -n ./svc.sh start 2>/dev/null || ./svc.sh start || nohup ./run.sh >/dev/null 2>&1 &); else nohup ./run.sh >/dev/null 2>&1 & fi\n",
            dir = Self::dir_word(t),
            busy = UPDATE_BUSY_EXIT,
            download = self.download(t),
        )
    }

    fn installed_version(&self, t: &AgentTarget) -> String {
        format!("cat {dir}/{VERSION_MARKER} 2>/dev/null || true\n", dir = Self::dir_word(t))
    }

    fn remove(&self, t: &AgentTarget) -> String {
        format!(
            "dir={dir}\n[ -d \"$dir\" ] || exit 0\ncd \"$dir\"\nif [ -x ./svc.sh ]; then (sudo -n ./svc.sh stop 2>/dev/null || ./svc.sh stop || true); (sudo -n ./svc.sh uninstall 2>/dev/null || ./svc.sh uninstall || true); fi\nrm -f .runner .credentials .credentials_rsaparams\n",
            dir = Self::dir_word(t)
        )
    }
}
