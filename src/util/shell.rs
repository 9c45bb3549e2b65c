//! POSIX shell quoting. Every value nimbus puts into a command line goes
//! through [`quote`]; nothing is interpolated raw.

/// Quotes `s` as one POSIX shell word: `'…'`, with embedded quotes as `'\''`.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// `export NAME='value'` lines for an environment.
pub fn exports(vars: &[(&str, &str)]) -> String {
    vars.iter()
        .map(|(k, v)| {
            debug_assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            format!("export {k}={}\n", quote(v))
        })
        .collect()
}

/// What a child nimbus starts on this computer (`ssh.proxy_command`, a local machine's setup steps) inherits
/// from nimbus's environment: these only. Credentials nimbus holds (AWS keys, the GitHub App's key given by
/// `{env: ...}`, tokens) never reach it.
pub const CHILD_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR", "TERM"];

/// The variables a child gets besides [`CHILD_ENV`]: the fleet's `env_passthrough`, then its section's, each once.
pub fn passthrough(fleet: &[String], section: Option<&[String]>) -> Vec<String> {
    let mut names: Vec<String> = fleet.iter().chain(section.into_iter().flatten()).cloned().collect();
    names.sort();
    names.dedup();
    names
}

/// Clears `cmd`'s environment down to [`CHILD_ENV`] and the variables the fleet file lets through
/// (`env_passthrough`).
pub fn minimal_env(cmd: &mut tokio::process::Command, passthrough: &[String]) {
    cmd.env_clear();
    for k in CHILD_ENV.iter().copied().chain(passthrough.iter().map(String::as_str)) {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_stay_one_word() {
        for v in ["plain", "it's", "$(touch /tmp/x)", "`id`", "a\nb", "'; rm -rf / #", "\"\\$HOME\"", ""] {
            let out =
                std::process::Command::new("sh").arg("-c").arg(format!("printf %s {}", quote(v))).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), v);
        }
    }
}
