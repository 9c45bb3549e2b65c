//! Reading secrets named in the fleet file (`{env: VAR}` / `{file: path}`).
//! The values are returned to the caller only; they are never logged,
//! rendered or stored.

use std::path::{Path, PathBuf};

use crate::config::SecretRef;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret `{what}`: environment variable `{var}` is not set")]
    MissingEnv { what: String, var: String },
    #[error("secret `{what}`: cannot read `{path}`: {source}")]
    File {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Expands a leading `~/` to the home folder.
pub fn expand_home(p: &Path) -> PathBuf {
    match p.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        Err(_) => p.to_path_buf(),
    }
}

/// Reads a secret. `base` resolves relative file paths (the fleet file's folder).
pub fn read(what: &str, r: &SecretRef, base: &Path) -> Result<String, SecretError> {
    match r {
        SecretRef::Env(var) => {
            std::env::var(var).map_err(|_| SecretError::MissingEnv { what: what.into(), var: var.clone() })
        }
        SecretRef::File(p) => {
            let p = expand_home(p);
            let path = if p.is_absolute() { p } else { base.join(p) };
            std::fs::read_to_string(&path).map_err(|source| SecretError::File { what: what.into(), path, source })
        }
    }
}

/// HMAC-SHA256 of `message` under `key` (RFC 2104), as GitHub signs webhook deliveries.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths (no early exit on a mismatch).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Token prefixes of well-known credentials (GitHub, GitLab, AWS, Slack): the value after one is hidden.
const TOKEN_PREFIXES: [&str; 11] =
    ["ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_", "glpat-", "glrt-", "AKIA", "ASIA", "xox"];

/// Words that mark the value after `=` or `:` as a secret.
const SECRET_WORDS: [&str; 7] = ["token", "secret", "password", "passwd", "api_key", "apikey", "private_key"];

/// Hides what looks like a credential in text a machine sent back (a failed step's output) before it is stored
/// or shown: well-known token formats, `…token=VALUE` / `password: VALUE` pairs, and private key blocks.
pub fn redact(text: &str) -> String {
    let mut out = Vec::new();
    let mut in_key = false;
    for line in text.lines() {
        if line.contains("PRIVATE KEY-----") {
            in_key = !line.contains("-----END");
            out.push("[REDACTED private key]".to_string());
            continue;
        }
        if in_key {
            continue;
        }
        out.push(redact_line(line));
    }
    out.join("\n")
}

fn redact_line(line: &str) -> String {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut s = String::with_capacity(line.len());
    let mut rest = line;
    'outer: while !rest.is_empty() {
        for p in TOKEN_PREFIXES {
            if rest.starts_with(p) && s.chars().last().is_none_or(|c| !is_token_char(c)) {
                let after = &rest[p.len()..];
                let n = after.find(|c: char| !is_token_char(c)).unwrap_or(after.len());
                if n >= 8 {
                    s.push_str(p);
                    s.push_str("[REDACTED]");
                    rest = &after[n..];
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().expect("not empty");
        s.push(c);
        rest = &rest[c.len_utf8()..];
        // `token=VALUE`, `password: VALUE`: the value up to the next blank goes.
        if c == '=' || c == ':' {
            let lower = s.to_ascii_lowercase();
            let key = lower.trim_end_matches([':', '=']).trim_end_matches(['"', '\'']);
            if SECRET_WORDS.iter().any(|w| key.ends_with(w)) {
                let trimmed = rest.trim_start();
                s.push_str(&rest[..rest.len() - trimmed.len()]);
                let n = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
                if n > 0 {
                    s.push_str("[REDACTED]");
                }
                rest = &trimmed[n..];
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let mac = super::hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(super::constant_time_eq(b"abc", b"abc") && !super::constant_time_eq(b"abc", b"abd"));
    }

    #[test]
    fn redacts_tokens_pairs_and_keys() {
        let r = super::redact(
            "ok\nusing ghp_abcdefghijklmnop1234 now\nTOKEN=s3cr3tvalue rest\npassword: hunter22\n-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\nbye",
        );
        assert!(!r.contains("abcdefghijklmnop1234") && !r.contains("s3cr3tvalue") && !r.contains("hunter22"), "{r}");
        assert!(!r.contains("AAAA"), "{r}");
        assert!(r.contains("ok") && r.contains("bye") && r.contains("rest"), "{r}");
    }
}
