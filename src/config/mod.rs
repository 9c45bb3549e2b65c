//! Reading and validating `fleet.yaml`.
//!
//! Owns: the document model ([`model`]), source positions ([`span`]), and the
//! two validation passes: the typed parse (which the JSON schema mirrors) and
//! the rules a schema cannot state ([`validate`]). No network, no side effects.

pub mod model;
pub mod span;
pub mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};
use serde_path_to_error::Segment;

pub use model::*;
use span::SpanIndex;

/// One problem in a fleet file, with its position.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("{message}")]
pub struct ConfigDiagnostic {
    pub message: String,
    #[source_code]
    pub src: NamedSource<Arc<String>>,
    #[label("{label}")]
    pub span: SourceSpan,
    pub label: String,
    #[help]
    pub help: Option<String>,
}

impl ConfigDiagnostic {
    /// 1-based (line, column) of the error, for tests and machine output.
    pub fn line_col(&self) -> (usize, usize) {
        let src = self.src.inner();
        let off = self.span.offset().min(src.len());
        let before = &src[..off];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        (line, col)
    }
}

/// Why a fleet file could not be used.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum ConfigError {
    #[error("cannot read fleet file `{path}`: {source}")]
    #[diagnostic(help("pass the fleet file with `-f FILE` (default: `fleet.yaml` in the current folder)"))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet file `{file}` is invalid ({} problem{})", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" })]
    Invalid {
        file: String,
        #[related]
        diagnostics: Vec<ConfigDiagnostic>,
    },
    #[error("fleet file `{file}` changes {} field{} that only a maintainer may change (trusted base: `{base}`)", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" })]
    Untrusted {
        file: String,
        base: String,
        #[related]
        diagnostics: Vec<ConfigDiagnostic>,
    },
}

/// The fields of a fleet file that run a command, send a credential, choose whose resources are read or where
/// state lives, by the path users read (`ssh.proxy_command`), with their values. A plan of an untrusted fleet
/// file (a pull request's) takes every one of them from the trusted base, or refuses.
pub fn trusted_fields(c: &FleetConfig) -> BTreeMap<String, serde_json::Value> {
    let v = serde_json::to_value(c).unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut take = |path: String, value: Option<&serde_json::Value>| {
        out.insert(path, value.cloned().unwrap_or(serde_json::Value::Null));
    };
    take("tenant".into(), v.get("tenant"));
    take("fleet".into(), v.get("fleet"));
    take("adopt_fleets".into(), v.get("adopt_fleets"));
    take("env_passthrough".into(), v.get("env_passthrough"));
    // The policies a plan must pass: a pull request cannot choose (or weaken) them.
    take("policy".into(), v.get("policy"));
    for k in [
        "proxy_command",
        "jump_host",
        "key",
        "known_hosts",
        "user",
        "port",
        "state_path",
        "host_key_policy",
        "env_passthrough",
    ] {
        take(format!("ssh.{k}"), v.get("ssh").and_then(|s| s.get(k)));
    }
    for k in [
        "type",
        "api_url",
        "private_key",
        "app_id",
        "installation_id",
        "org",
        "runner_group_id",
        "runner_download_url",
        "runner_sha256",
        "runner_version",
        "url",
        "token",
        "runner_type",
        "group_id",
        "project_id",
        "scope",
        "executor",
        "flavour",
    ] {
        take(format!("forge.{k}"), v.get("forge").and_then(|s| s.get(k)));
    }
    // Every named forge is trusted as a whole: a pull request adds, removes or changes none.
    take("forges".into(), v.get("forges"));
    take("journal.path".into(), v.get("journal").and_then(|j| j.get("path")));
    take("reconcile.webhook_secret".into(), v.get("reconcile").and_then(|r| r.get("webhook_secret")));
    // Who the S3 client acts as is trusted like where it goes (issue 24).
    for k in ["backend", "bucket", "key", "region", "endpoint"].into_iter().chain(AWS_IDENTITY_KEYS) {
        take(format!("state.{k}"), v.get("state").and_then(|s| s.get(k)));
    }
    if let Some(providers) = v.get("providers").and_then(|p| p.as_object()) {
        for (name, p) in providers {
            for k in [
                "type",
                "region",
                "data_dir",
                "subnet_id",
                "security_group_ids",
                "key_name",
                "env_passthrough",
                // Hetzner: the credential, where it goes, and what runs on every new server.
                "token",
                "api_url",
                "ssh_keys",
                "user_data",
            ]
            // AWS: who the provider's clients act as (issue 24).
            .into_iter()
            .chain(AWS_IDENTITY_KEYS)
            {
                take(format!("providers.{name}.{k}"), p.get(k));
            }
        }
    }
    // Which forge (and so which credential) a pool's runners register with.
    for (i, p) in v.get("pools").and_then(|p| p.as_array()).into_iter().flatten().enumerate() {
        take(format!("pools[{i}].forge"), p.get("forge"));
    }
    out
}

/// Refuses `loaded` (an untrusted fleet file) when it differs from the trusted `base` in any
/// [`trusted_fields`]: each difference is a diagnostic at the field, naming it.
pub fn check_trusted(loaded: &LoadedConfig, base: &LoadedConfig) -> Result<(), ConfigError> {
    let mine = trusted_fields(&loaded.config);
    let theirs = trusted_fields(&base.config);
    let mut paths: Vec<&String> = mine.keys().chain(theirs.keys()).collect();
    paths.sort();
    paths.dedup();
    let null = serde_json::Value::Null;
    let changed: Vec<&String> =
        paths.into_iter().filter(|p| mine.get(*p).unwrap_or(&null) != theirs.get(*p).unwrap_or(&null)).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let name = loaded.path.display().to_string();
    let (_, index, ctx) = prepare(&name, &loaded.source);
    let index = index.ok();
    let diagnostics = changed
        .into_iter()
        .map(|path| {
            // The field where it is; a field the base has and this file lacks, at its section (or the top).
            let mut at = path.as_str();
            let span = loop {
                if let Some(s) = index.as_ref().and_then(|i| i.value_span(at)) {
                    break s;
                }
                match at.rsplit_once('.') {
                    Some((parent, _)) => at = parent,
                    None => break SourceSpan::new(0.into(), 0),
                }
            };
            ctx.diag(
                format!("a change to {path} must be applied by a maintainer"),
                span,
                "differs from the trusted base",
                Some(format!(
                    "this plan runs with the fleet's credentials, so fields that run a command, send a credential or \
                     choose where state lives must match the trusted base `{}`; a maintainer applies such a change \
                     from the protected branch",
                    base.path.display()
                )),
            )
        })
        .collect();
    Err(ConfigError::Untrusted { file: name, base: base.path.display().to_string(), diagnostics })
}

/// A fleet file that parsed and passed every rule.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: FleetConfig,
    /// Path as the user gave it.
    pub path: PathBuf,
    /// Folder relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    /// The file's text, for hashing (stale plans).
    pub source: Arc<String>,
}

impl LoadedConfig {
    /// A fleet that did not come from a file (an application's own storage): validated like a file,
    /// with relative paths resolved against `base_dir`.
    pub fn from_config(name: &str, config: FleetConfig, base_dir: &Path) -> Result<LoadedConfig, ConfigError> {
        let text = yaml_serde::to_string(&config).map_err(|e| ConfigError::Invalid {
            file: name.to_string(),
            diagnostics: vec![Ctx { name: name.into(), src: Arc::new(String::new()) }.diag(
                format!("the fleet cannot be written as YAML: {e}"),
                SourceSpan::new(0.into(), 0),
                "here",
                None,
            )],
        })?;
        // The same rules as a file, with positions in its YAML form.
        let config = parse(name, &text)?;
        let base_dir = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        Ok(LoadedConfig { config, path: PathBuf::from(name), base_dir, source: Arc::new(text) })
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.base_dir.join(p) }
    }

    /// This fleet's id (`nimbus:fleet`): the file's `fleet`, or else its path in its git repository, or its name
    /// outside one. The same in every clone of the repository, wherever it is checked out.
    pub fn fleet_id(&self) -> String {
        if let Some(id) = &self.config.fleet {
            return id.clone();
        }
        let name = self.path.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("fleet.yaml"));
        // The file's real path: `..`, symlinks and the folder nimbus was started from make no difference.
        let file = std::fs::canonicalize(self.base_dir.join(&name)).unwrap_or_else(|_| self.base_dir.join(&name));
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| self.base_dir.clone());
        let root = dir.ancestors().find(|d| d.join(".git").exists());
        let rel = root.and_then(|r| file.strip_prefix(r).ok()).unwrap_or(&name);
        let id: String = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/")
            .chars()
            .map(|c| if fleet_id_char(c) { c } else { '-' })
            .collect();
        id.chars().take(128).collect()
    }
}

/// Characters a fleet id may have: what an EC2 tag value allows, in ASCII.
pub fn fleet_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || " _.:/=+-@".contains(c)
}

/// Reads and validates a fleet file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let config = parse(&path.display().to_string(), &text)?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    // Absolute, so every path derived from it (sandboxes, keys, the journal) works from any folder and on
    // any machine nimbus hands it to.
    let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
    Ok(LoadedConfig { config, path: path.to_path_buf(), base_dir, source: Arc::new(text) })
}

/// Fleet file text ready for diagnostics: without the byte order mark editors on Windows start UTF-8 files
/// with (it is not part of the YAML), its span index, and a context whose error snippets never show a secret
/// someone wrote inline.
fn prepare<'t>(name: &str, text: &'t str) -> (&'t str, Result<SpanIndex, span::SyntaxError>, Ctx) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let index = SpanIndex::build(text);
    let shown = match &index {
        Ok(i) => mask_inline_secrets(i, text),
        Err(_) => text.to_string(),
    };
    (text, index, Ctx { name: name.to_string(), src: Arc::new(shown) })
}

/// Parses and validates fleet file text; `name` is how errors name the file.
pub fn parse(name: &str, text: &str) -> Result<FleetConfig, ConfigError> {
    let (text, index, ctx) = prepare(name, text);
    let index = match index {
        Ok(i) => i,
        Err(e) => {
            return Err(ctx.invalid(vec![ctx.diag(
                format!("YAML syntax error: {}", e.message),
                e.span,
                "here",
                Some("check the indentation (spaces, not tabs) and that every `key: value` pair is complete".into()),
            )]));
        }
    };
    if !index.duplicates.is_empty() {
        let diags = index
            .duplicates
            .iter()
            .map(|d| {
                let at = if d.path.is_empty() { "the top level".to_string() } else { format!("`{}`", d.path) };
                ctx.diag(
                    format!("duplicate key `{}` in {at}", d.key),
                    d.span,
                    "written a second time here",
                    Some("each key may appear once in a mapping; remove or merge the repeated one".into()),
                )
            })
            .collect();
        return Err(ctx.invalid(diags));
    }
    if text.trim().is_empty() {
        return Err(ctx.invalid(vec![ctx.diag(
            "the fleet file is empty".into(),
            SourceSpan::new(0.into(), 0),
            "nothing here",
            Some("start from `examples/quickstart/fleet.yaml`, or print the schema with `nimbus schema`".into()),
        )]));
    }

    let de = yaml_serde::Deserializer::from_str(text);
    let config: FleetConfig = match serde_path_to_error::deserialize(de) {
        Ok(c) => c,
        Err(e) => return Err(ctx.invalid(vec![serde_diagnostic(&ctx, &index, e)])),
    };
    let problems = validate::validate(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        let diags = problems
            .into_iter()
            .map(|p| {
                let span = match p.at {
                    validate::At::Key => index.key_span(&p.path),
                    validate::At::Value => index.value_span(&p.path),
                }
                .unwrap_or(SourceSpan::new(0.into(), 0));
                ctx.diag(p.message, span, &p.label, p.hint)
            })
            .collect();
        Err(ctx.invalid(diags))
    }
}

struct Ctx {
    name: String,
    src: Arc<String>,
}

impl Ctx {
    fn diag(&self, message: String, span: SourceSpan, label: &str, help: Option<String>) -> ConfigDiagnostic {
        ConfigDiagnostic {
            message,
            src: NamedSource::new(self.name.clone(), self.src.clone()).with_language("yaml"),
            span,
            label: label.to_string(),
            help,
        }
    }

    fn invalid(&self, diagnostics: Vec<ConfigDiagnostic>) -> ConfigError {
        ConfigError::Invalid { file: self.name.clone(), diagnostics }
    }
}

/// Turns a serde error into a positioned diagnostic with a hint.
fn serde_diagnostic(
    ctx: &Ctx,
    index: &SpanIndex,
    err: serde_path_to_error::Error<yaml_serde::Error>,
) -> ConfigDiagnostic {
    let segs: Vec<span::Seg> = err
        .path()
        .iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(span::Seg::Index(*index)),
            Segment::Map { key } => Some(span::Seg::Key(key.clone())),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect();
    let mut path = span::path_string(&segs);
    let inner = err.into_inner();
    let fallback =
        inner.location().map(|l| SourceSpan::new(l.index().into(), 1)).unwrap_or(SourceSpan::new(0.into(), 0));
    let raw = strip_location(&inner.to_string());
    // yaml_serde prefixes its own path ("pools[0]: ..."); keep only the message.
    let msg = match raw.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') && !head.is_empty() => rest.to_string(),
        _ => raw,
    };
    // Inside an internally tagged enum (`type: ...`) serde loses the position;
    // find the node the message is about below the path it did keep.
    if !path.is_empty()
        && !msg.starts_with("unknown field")
        && !msg.starts_with("missing field")
        && let Some(p) = refine_path(index, text_of(ctx), &path, &msg)
    {
        path = p;
    }
    let field = if path.is_empty() { "the top level".to_string() } else { format!("`{path}`") };

    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or("");
        let expected = expected_list(&msg);
        let full = if path.ends_with(name) { path.clone() } else { join(&path, name) };
        let span = index.key_span(&full).unwrap_or(fallback);
        let parent = full.strip_suffix(name).map(|p| p.trim_end_matches('.')).unwrap_or("");
        let in_ = if parent.is_empty() { "at the top level".to_string() } else { format!("in `{parent}`") };
        let hint = match closest(name, &expected) {
            Some(s) => format!("did you mean `{s}`? allowed keys here: {}", backticked(&expected)),
            None => format!("allowed keys here: {}", backticked(&expected)),
        };
        return ctx.diag(format!("unknown key `{name}` {in_}"), span, "unknown key", Some(hint));
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let name = rest.split('`').next().unwrap_or("");
        let expected = expected_list(&msg);
        let span = index.value_span(&path).unwrap_or(fallback);
        let hint = match closest(name, &expected) {
            Some(s) => format!("did you mean `{s}`? one of: {}", backticked(&expected)),
            None => format!("one of: {}", backticked(&expected)),
        };
        return ctx.diag(format!("`{name}` is not a valid value for {field}"), span, "not allowed here", Some(hint));
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or("");
        let span = index.key_span(&path).unwrap_or(fallback);
        let where_ = if path.is_empty() { "the fleet file".to_string() } else { format!("`{path}`") };
        return ctx.diag(
            format!("{where_} is missing the required key `{name}`"),
            span,
            &format!("missing `{name}`"),
            Some(format!("add `{name}:`; `nimbus schema` prints every key and its type")),
        );
    }
    if msg.contains("secret reference") {
        let span = index.value_span(&path).unwrap_or(fallback);
        return ctx.diag(
            format!("{field}: {msg}"),
            span,
            "ambiguous secret",
            Some("write either `{env: VARIABLE}` or `{file: path/to/key.pem}`".into()),
        );
    }
    if msg.starts_with(INLINE_SECRET) {
        let span = index.value_span(&path).unwrap_or(fallback);
        return ctx.diag(
            format!("{field}: {INLINE_SECRET}"),
            span,
            "secret written inline",
            Some(
                "write `{env: VARIABLE}` or `{file: path/to/key.pem}`; keep secrets out of the fleet file and the repository"
                    .into(),
            ),
        );
    }
    if msg.contains("invalid duration") {
        let span = index.value_span(&path).unwrap_or(fallback);
        return ctx.diag(
            format!("invalid duration for {field}"),
            span,
            "not a duration",
            Some("write a duration like `24h`, `90m` or `1h 30m`".into()),
        );
    }
    if msg.starts_with("invalid value: integer `-") || msg.starts_with("invalid type: integer `-") {
        let span = index.value_span(&path).unwrap_or(fallback);
        return ctx.diag(
            format!("{field} must not be negative"),
            span,
            "negative number",
            Some(format!("use a whole number of 0 or more, e.g. `{}: 2`", last_key(&path))),
        );
    }
    if msg.starts_with("invalid type: ") {
        let span = index.value_span(&path).unwrap_or(fallback);
        let hint = type_hint(&msg, &path);
        return ctx.diag(format!("wrong type for {field}: {msg}"), span, "wrong type", Some(hint));
    }
    let span = if path.is_empty() { fallback } else { index.value_span(&path).unwrap_or(fallback) };
    ctx.diag(
        format!("invalid {field}: {msg}"),
        span,
        "here",
        Some("`nimbus schema` prints every key and its type".into()),
    )
}

fn text_of(ctx: &Ctx) -> &str {
    ctx.src.as_str()
}

/// Finds the node below `path` that an error message is about.
fn refine_path(index: &SpanIndex, src: &str, path: &str, msg: &str) -> Option<String> {
    let nodes = index.descendants(path);
    let text = |n: &span::NodePos| &src[n.value.offset()..n.value.offset() + n.value.len()];
    if msg.starts_with(INLINE_SECRET) {
        return nodes
            .iter()
            .find(|(p, n)| SECRET_KEYS.iter().any(|k| p.ends_with(&format!(".{k}"))) && !text(n).starts_with('{'))
            .map(|(p, _)| p.to_string());
    }
    if msg.contains("secret reference") || msg.starts_with("`env`") || msg.starts_with("`file`") {
        return nodes
            .iter()
            .find(|(p, _)| SECRET_KEYS.iter().any(|k| p.ends_with(&format!(".{k}"))))
            .map(|(p, _)| p.to_string());
    }
    // The offending value is quoted in the message: `forever`, "two", `-1`.
    let quoted: Vec<&str> = msg.split(['`', '"']).skip(1).step_by(2).filter(|s| !s.is_empty()).collect();
    nodes
        .iter()
        .find(|(_, n)| {
            let t = text(n).trim_matches(['"', '\'']);
            quoted.contains(&t)
        })
        .map(|(p, _)| p.to_string())
}

/// A copy of `text` with every inline value of a secret key replaced by `*`
/// (same byte length, so positions stay valid).
fn mask_inline_secrets(index: &SpanIndex, text: &str) -> String {
    let nodes = index.descendants("");
    let mut bytes = text.as_bytes().to_vec();
    for (i, (p, n)) in nodes.iter().enumerate() {
        let is_secret = SECRET_KEYS.iter().any(|k| p.ends_with(&format!(".{k}")) || *p == *k);
        let start = n.value.offset();
        if !is_secret || text[start..].starts_with('{') {
            continue;
        }
        // A block scalar runs on to the next node.
        let end = nodes.get(i + 1).map(|(_, m)| m.key.unwrap_or(m.value).offset()).unwrap_or(text.len());
        let end = end.max(start + n.value.len()).min(text.len());
        for b in &mut bytes[start..end] {
            if !b.is_ascii_whitespace() && *b != b'|' && *b != b'>' {
                *b = b'*';
            }
        }
    }
    // Only ASCII bytes were written, over whole characters' bytes as well as ASCII ones: a
    // multi-byte character becomes several `*`, which is still valid UTF-8.
    String::from_utf8(bytes).unwrap_or_else(|_| text.to_string())
}

/// The keys of an AWS identity (an `aws` provider's, or the S3 state's): all trusted-only.
const AWS_IDENTITY_KEYS: [&str; 6] = ["profile", "role_arn", "external_id", "session_name", "duration", "web_identity"];

/// Keys whose values are [`SecretRef`]s.
const SECRET_KEYS: &[&str] = &["private_key", "key", "web_identity"];

fn type_hint(msg: &str, path: &str) -> String {
    let key = last_key(path);
    if msg.contains("expected u32") || msg.contains("expected u64") || msg.contains("expected u16") {
        format!("`{key}` takes a whole number, e.g. `{key}: 2` (no quotes)")
    } else if msg.contains("expected a sequence") {
        format!("`{key}` takes a list, e.g. `{key}: [a, b]`")
    } else if msg.contains("expected a string") {
        format!("`{key}` takes text; quote it if it looks like a number, e.g. `{key}: \"1\"`")
    } else if msg.contains("expected struct") || msg.contains("expected a map") || msg.contains("internally tagged") {
        format!("`{key}` takes a mapping of keys; `nimbus schema` shows which")
    } else {
        "`nimbus schema` prints every key and its type".to_string()
    }
}

fn last_key(path: &str) -> &str {
    path.rsplit('.').next().map(|s| s.split('[').next().unwrap_or(s)).unwrap_or(path)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn strip_location(s: &str) -> String {
    match s.rfind(" at line ") {
        Some(i) if s[i..].contains(" column ") => s[..i].to_string(),
        _ => s.to_string(),
    }
}

/// Pulls the list out of serde's "expected one of `a`, `b`" / "expected `a` or `b`".
fn expected_list(msg: &str) -> Vec<String> {
    let Some(i) = msg.find("expected") else { return Vec::new() };
    msg[i..].split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn backticked(items: &[String]) -> String {
    items.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
}

/// The closest candidate within a small edit distance.
pub(crate) fn closest<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (levenshtein(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The JSON schema of the fleet file, as generated from the model.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(FleetConfig);
    serde_json::to_value(schema).expect("schema serialises")
}

/// The schema as it is checked in to `schemas/fleet.schema.json`.
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).expect("schema serialises");
    s.push('\n');
    s
}

/// Things a valid fleet file allows but the operator should hear about (printed by `validate`, `plan`, `apply`).
pub fn warnings(c: &FleetConfig) -> Vec<String> {
    let mut out = Vec::new();
    for (i, p) in c.pools.iter().enumerate() {
        let Some(r) = &p.runner else { continue };
        match (r.mode, r.reimage) {
            (RunnerMode::Ephemeral, Some(Reimage::Never)) => out.push(format!(
                "`pools[{i}].runner.reimage: never`: machines of pool `{}` are not reimaged between jobs, so each job sees what the previous one left",
                p.name
            )),
            (RunnerMode::Persistent, Some(_)) => out.push(format!(
                "`pools[{i}].runner.reimage` has no effect: only ephemeral runners are reimaged after their job (pool `{}`)",
                p.name
            )),
            _ => {}
        }
    }
    out
}
