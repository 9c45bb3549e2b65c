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

/// The sha256 of each official `actions/runner` release tarball nimbus knows, as GitHub publishes them with the
/// release: (version, `os-arch`, sha256).
pub const PINNED_SHA256: &[(&str, &str, &str)] = &[
    ("2.321.0", "linux-x64", "ba46ba7ce3a4d7236b16fbe44419fb453bc08f866b24f04d549ec89f1722a29e"),
    ("2.321.0", "linux-arm64", "62cc5735d63057d8d07441507c3d6974e90c1854bdb33e9c8b26c0da086336e1"),
    ("2.321.0", "osx-x64", "b2c91416b3e4d579ae69fc2c381fc50dbda13f1b3fcc283187e2c75d1b173072"),
    ("2.321.0", "osx-arm64", "fbee07e42a134645d4f04f8146b0a3d0b3c948f0d6b2b9fa61f4318c1192ff79"),
];

/// The official download URL of a release for a platform.
pub fn official_url(version: &str, os: &str, arch: &str) -> String {
    format!(
        "https://github.com/actions/runner/releases/download/v{version}/actions-runner-{os}-{arch}-{version}.tar.gz"
    )
}

pub struct GithubAgent {
    /// Download URL template; `{os}` and `{arch}` are filled in with the agent's names.
    pub download_url: String,
    /// The fleet file's checksums by `os-arch` (`forge.runner_sha256`); they win over the pinned table.
    pub sha256: BTreeMap<String, String>,
}

impl GithubAgent {
    pub fn new(download_url: impl Into<String>) -> Self {
        GithubAgent { download_url: download_url.into(), sha256: BTreeMap::new() }
    }

    /// The sha256 the download for a platform must have: the fleet file's, or the pinned one when the URL is an
    /// official release's.
    pub fn expected_sha256(&self, os: &str, arch: &str) -> Option<String> {
        let platform = format!("{os}-{arch}");
        if let Some(s) = self.sha256.get(&platform) {
            return Some(s.to_ascii_lowercase());
        }
        let url = self.download_url.replace("{os}", os).replace("{arch}", arch);
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
        let dir = t.dir.unwrap_or(DEFAULT_RUNNER_DIR).replace("{machine}", t.machine);
        // A runner dir given with `$HOME` is left to the shell; anything else is quoted.
        match dir.strip_prefix("$HOME/") {
            Some(rest) => format!("\"$HOME\"/{}", shell::quote(rest)),
            None => shell::quote(&dir),
        }
    }
}

impl RunnerAgent for GithubAgent {
    fn install(&self, t: &AgentTarget, reg: &Registration) -> AgentInstall {
        let (os, arch) = Self::platform(t.os, t.arch);
        let url = self.download_url.replace("{os}", os).replace("{arch}", arch);
        // Nothing unverified is unpacked: without a known checksum the step fails before downloading.
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
        let install = format!(
            "set -e\nIFS= read -r secret\ndir={dir}\nif [ ! -x \"$dir/config.sh\" ]; then\n  mkdir -p \"$dir\"; cd \"$dir\"\n{refuse}  if command -v curl >/dev/null; then curl -fsSL {url} -o runner.tgz; else wget -q -O runner.tgz {url}; fi\n{verify}  tar xzf runner.tgz; rm -f runner.tgz\nfi\ncd \"$dir\"\n",
            dir = Self::dir_word(t),
            url = shell::quote(&url),
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

    fn remove(&self, t: &AgentTarget) -> String {
        format!(
            "dir={dir}\n[ -d \"$dir\" ] || exit 0\ncd \"$dir\"\nif [ -x ./svc.sh ]; then (sudo -n ./svc.sh stop 2>/dev/null || ./svc.sh stop || true); (sudo -n ./svc.sh uninstall 2>/dev/null || ./svc.sh uninstall || true); fi\nrm -f .runner .credentials .credentials_rsaparams\n",
            dir = Self::dir_word(t)
        )
    }
}
