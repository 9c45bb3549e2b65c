//! GitHub's runner agent (`actions/runner`) on a machine: download, `config.sh` (persistent, as a service)
//! or `run.sh` with a JIT config (ephemeral), and removal. The registration secret is read from stdin and
//! handed to the agent in its environment (`ACTIONS_RUNNER_INPUT_TOKEN` / `ACTIONS_RUNNER_INPUT_JITCONFIG`),
//! never put on a command line.

use crate::config::{Arch, Os};
use crate::forges::{AgentInstall, AgentTarget, Registration, RunnerAgent};
use crate::util::shell;

/// Where the agent goes unless the fleet file says otherwise.
pub const DEFAULT_RUNNER_DIR: &str = "$HOME/actions-runner";

pub struct GithubAgent {
    /// Download URL template; `{os}` and `{arch}` are filled in with the agent's names.
    pub download_url: String,
}

impl GithubAgent {
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
        let install = format!(
            "set -e\nIFS= read -r secret\ndir={dir}\nif [ ! -x \"$dir/config.sh\" ]; then\n  mkdir -p \"$dir\"; cd \"$dir\"\n  if command -v curl >/dev/null; then curl -fsSL {url} -o runner.tgz; else wget -q -O runner.tgz {url}; fi\n  tar xzf runner.tgz; rm -f runner.tgz\nfi\ncd \"$dir\"\n",
            dir = Self::dir_word(t),
            url = shell::quote(&url),
        );
        let script = if reg.ephemeral {
            // The agent reads any argument from `ACTIONS_RUNNER_INPUT_<NAME>`: in its environment, the secret is
            // not in argv, where `ps` would show it for the runner's whole life.
            format!("{install}ACTIONS_RUNNER_INPUT_JITCONFIG=\"$secret\" nohup ./run.sh >/dev/null 2>&1 &\n")
        } else {
            format!(
                "{install}ACTIONS_RUNNER_INPUT_TOKEN=\"$secret\" ./config.sh --unattended --replace --url {} --name {} --labels {}\n\
                 if [ -x ./svc.sh ]; then (sudo -n ./svc.sh install 2>/dev/null || ./svc.sh install) && (sudo -n ./svc.sh start 2>/dev/null || ./svc.sh start); fi\n",
                shell::quote(reg.url.as_deref().unwrap_or_default()),
                shell::quote(t.machine),
                shell::quote(&t.labels.join(",")),
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
