//! Rules a JSON schema cannot state: cross references (a pool names a
//! provider that exists), uniqueness, provider-specific requirements, and
//! well-formed names. Each problem names the path of the node it is about.

use std::collections::{BTreeMap, HashMap};

use super::model::*;

/// Whether a problem points at a key or at its value.
pub enum At {
    Key,
    Value,
}

/// One rule broken, at a node path (`pools[0].machine.image`); turned into a positioned diagnostic.
pub struct Problem {
    pub path: String,
    pub at: At,
    pub message: String,
    pub label: String,
    pub hint: Option<String>,
}

pub fn problem(path: String, at: At, message: String, label: &str, hint: impl Into<Option<String>>) -> Problem {
    Problem { path, at, message, label: label.to_string(), hint: hint.into() }
}

/// Names used for tenants and pools: they end up in tags, runner names and folder names.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && !s.contains("--")
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(super) fn validate(c: &FleetConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    if c.version != 1 {
        out.push(problem(
            "version".into(),
            At::Value,
            format!("unsupported fleet file version {}", c.version),
            "unsupported version",
            "this nimbus reads `version: 1`".to_string(),
        ));
    }
    if !is_valid_name(&c.tenant) || c.tenant.len() > 32 {
        out.push(problem(
            "tenant".into(),
            At::Value,
            format!("invalid tenant name `{}`", c.tenant),
            "invalid name",
            "use at most 32 lowercase letters, digits and single hyphens, starting with a letter, e.g. `acme`; it becomes the `nimbus:tenant` tag".to_string(),
        ));
    }
    let fleet_ids = c
        .fleet
        .iter()
        .map(|f| ("fleet".to_string(), f))
        .chain(c.adopt_fleets.iter().flatten().enumerate().map(|(i, f)| (format!("adopt_fleets[{i}]"), f)));
    for (path, id) in fleet_ids {
        if id.is_empty() || id.len() > 128 || !id.chars().all(super::fleet_id_char) {
            out.push(problem(
                path,
                At::Value,
                format!("invalid fleet id `{id}`"),
                "invalid fleet id",
                "use 1 to 128 letters, digits, spaces and `_ . : / = + - @`, e.g. `mac-fleet`; it becomes the `nimbus:fleet` tag".to_string(),
            ));
        }
    }
    let mut lists: Vec<(String, &Vec<String>)> = Vec::new();
    lists.extend(c.env_passthrough.iter().map(|l| ("env_passthrough".to_string(), l)));
    lists.extend(
        c.ssh.iter().filter_map(|s| s.env_passthrough.as_ref()).map(|l| ("ssh.env_passthrough".to_string(), l)),
    );
    tag_rules(&mut out, "tags", &c.tags);
    for (name, p) in &c.providers {
        if let super::ProviderConfig::Hetzner(h) = p {
            h.validate(name, &mut out);
        }
        if let super::ProviderConfig::Aws(a) = p {
            a.identity().validate(&format!("providers.{name}"), &mut out);
            tag_rules(&mut out, &format!("providers.{name}.tags"), &a.tags);
        }
        if let super::ProviderConfig::Local(l) = p
            && let Some(list) = &l.env_passthrough
        {
            lists.push((format!("providers.{name}.env_passthrough"), list));
        }
    }
    for (path, list) in lists {
        for (i, v) in list.iter().enumerate() {
            let ok = v.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                out.push(problem(
                    format!("{path}[{i}]"),
                    At::Value,
                    format!("`{v}` is not an environment variable's name"),
                    "not a variable name",
                    "list names such as `AWS_PROFILE` (letters, digits and `_`)".to_string(),
                ));
            }
        }
    }
    if let Some(s) = &c.state {
        let s3 = s.backend == super::StateBackend::S3;
        for (field, value) in [("bucket", &s.bucket), ("key", &s.key), ("region", &s.region), ("endpoint", &s.endpoint)]
        {
            match (s3, value) {
                (true, None) if field == "bucket" || field == "key" => out.push(problem(
                    "state.backend".into(),
                    At::Value,
                    format!("`state.backend: s3` needs `state.{field}`"),
                    "s3 without a bucket or key",
                    "e.g. `state: {backend: s3, bucket: acme-nimbus, key: fleets/mac/journal.db}`".to_string(),
                )),
                (false, Some(_)) => out.push(problem(
                    format!("state.{field}"),
                    At::Key,
                    format!("`state.{field}` is for `backend: s3`"),
                    "not used by the local backend",
                    "remove it, or set `backend: s3`".to_string(),
                )),
                (true, Some(v))
                    if v.trim().is_empty() || (field == "key" && (v.ends_with('/') || v.starts_with('/'))) =>
                {
                    out.push(problem(
                        format!("state.{field}"),
                        At::Value,
                        format!("`state.{field}` `{v}` is not usable"),
                        "invalid",
                        "give an object key such as `nimbus/acme/journal.db` (no leading or trailing `/`)".to_string(),
                    ))
                }
                _ => {}
            }
        }
        let identity = s.identity();
        if !s3 && !identity.is_default() {
            out.push(problem(
                "state.backend".into(),
                At::Value,
                "`state`'s credentials (`profile`, `role_arn`, `web_identity`) are for `backend: s3`".into(),
                "not used by the local backend",
                "remove them, or set `backend: s3`".to_string(),
            ));
        } else if s3 {
            identity.validate("state", &mut out);
        }
        if !s3 && s.lock_lease.is_some() {
            out.push(problem(
                "state.lock_lease".into(),
                At::Key,
                "`state.lock_lease` is for `backend: s3`".into(),
                "not used by the local backend",
                "a local lock is held by the apply's process and freed when it ends; remove it, or set `backend: s3`"
                    .to_string(),
            ));
        } else if s.lock_lease.is_some_and(|l| l.0 < std::time::Duration::from_secs(3)) {
            out.push(problem(
                "state.lock_lease".into(),
                At::Value,
                "`state.lock_lease` is shorter than 3 seconds".into(),
                "too short",
                "a lease is renewed every third of it; use at least `3s` (default `2m`)".to_string(),
            ));
        }
    }
    if c.providers.is_empty() {
        out.push(problem(
            "providers".into(),
            At::Key,
            "no providers are defined".into(),
            "empty",
            "define at least one, e.g. `providers: {local: {type: local}}`".to_string(),
        ));
    }
    for (name, _) in c.providers.iter().filter(|(n, _)| !is_valid_name(n)) {
        out.push(problem(
            format!("providers.{name}"),
            At::Key,
            format!("invalid provider name `{name}`"),
            "invalid name",
            "use lowercase letters, digits and single hyphens, starting with a letter".to_string(),
        ));
    }

    if let Some(forge) = &c.forge {
        forge.validate(&mut out);
    }
    for f in c.forges.iter().flat_map(|f| f.values()) {
        f.validate(&mut out);
    }
    if let Some(secret) = c.reconcile.as_ref().and_then(|r| r.webhook_secret.as_ref()) {
        secret_rules(&mut out, "reconcile.webhook_secret", secret);
    }
    for (t, price) in c.pricing.iter().flatten() {
        if !price.is_finite() || *price < 0.0 {
            out.push(problem(
                format!("pricing.{t}"),
                At::Value,
                format!("the price of `{t}` is not a non-negative number of dollars per hour"),
                "not a price",
                "give dollars per hour, for example `mac2.metal: 0.65`".to_string(),
            ));
        }
    }
    if let Some(b) = &c.budget {
        if let Some(m) = &b.max_commit_per_plan
            && crate::core::cost::parse_money(m).is_none()
        {
            out.push(problem(
                "budget.max_commit_per_plan".into(),
                At::Value,
                format!("`{m}` is not an amount of money"),
                "not an amount",
                "give dollars, for example \"$500\"".to_string(),
            ));
        }
        let used: std::collections::BTreeSet<&str> =
            c.pools.iter().filter_map(|p| p.machine.instance_type.as_deref()).collect();
        for t in b.max_hosts.keys() {
            if !used.contains(t.as_str()) {
                out.push(problem(
                    format!("budget.max_hosts.{t}"),
                    At::Key,
                    format!("no pool uses instance type `{t}`"),
                    "unused instance type",
                    format!(
                        "the pools use {}; a misspelt type would never limit anything",
                        used.iter().map(|u| format!("`{u}`")).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    if let Some(ssh) = &c.ssh {
        if let Some(k) = &ssh.key {
            secret_rules(&mut out, "ssh.key", k);
        }
        if let Some(pc) = &ssh.proxy_command
            && let Some(bad) = bad_proxy_token(pc)
        {
            out.push(problem(
                "ssh.proxy_command".into(),
                At::Value,
                format!("`ssh.proxy_command` uses the unknown token `{bad}`"),
                "unknown token",
                "the tokens are `%h` (host), `%p` (port), `%r` (user) and `%%` (a literal %)".to_string(),
            ));
        }
        if ssh.connect_timeout.is_some_and(|d| d.0.is_zero()) {
            out.push(problem(
                "ssh.connect_timeout".into(),
                At::Value,
                "`ssh.connect_timeout` is zero: no connection could ever be made".into(),
                "zero",
                "give the time to wait for a machine to answer, e.g. `connect_timeout: 20s`".to_string(),
            ));
        }
        if ssh.port == Some(0) {
            out.push(problem(
                "ssh.port".into(),
                At::Value,
                "`ssh.port` is 0, which no SSH server listens on".into(),
                "port 0",
                "use the port sshd listens on, e.g. `port: 22`".to_string(),
            ));
        }
    }

    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let provider_names: Vec<String> = c.providers.keys().cloned().collect();
    for (i, pool) in c.pools.iter().enumerate() {
        let at = |k: &str| format!("pools[{i}].{k}");
        if !is_valid_name(&pool.name) || pool.name.len() > 40 {
            out.push(problem(
                at("name"),
                At::Value,
                format!("invalid pool name `{}`", pool.name),
                "invalid name",
                "use at most 40 lowercase letters, digits and single hyphens, starting with a letter, e.g. `macos-arm`"
                    .to_string(),
            ));
        }
        match (&pool.count, &pool.scale) {
            (None, None) => out.push(problem(
                at("name"),
                At::Value,
                format!("pool `{}` has neither `count` nor `scale`", pool.name),
                "how many machines?",
                "give a fixed `count: N`, or `scale: {min: 0, max: 10, idle: 1}` to follow demand".to_string(),
            )),
            (Some(_), Some(_)) => out.push(problem(
                at("scale"),
                At::Key,
                format!("pool `{}` has both `count` and `scale`", pool.name),
                "one or the other",
                "a pool has a fixed `count`, or follows demand within `scale`; remove one".to_string(),
            )),
            (None, Some(sc)) if sc.max == 0 || sc.min > sc.max => out.push(problem(
                at("scale.max"),
                At::Value,
                format!("pool `{}` scales within {}..{}, which holds no machine", pool.name, sc.min, sc.max),
                "max must be at least 1 and at least min",
                format!("e.g. `scale: {{min: {}, max: {}}}`", sc.min, sc.min.max(1)),
            )),
            (None, Some(sc)) if sc.idle.is_some_and(|i| i > sc.max) => out.push(problem(
                at("scale.idle"),
                At::Value,
                format!("pool `{}` keeps more idle runners than its `max`", pool.name),
                "more than max",
                format!("keep at most {} idle", sc.max),
            )),
            _ => {}
        }
        for (w, win) in pool.scale.iter().flat_map(|sc| sc.schedule.iter().map(move |w| (sc, w))).enumerate() {
            let (sc, win) = win;
            let wat = |k: &str| at(&format!("scale.schedule[{w}].{k}"));
            if let Some(tz) = &win.time_zone
                && tz.parse::<chrono_tz::Tz>().is_err()
            {
                out.push(problem(
                    wat("time_zone"),
                    At::Value,
                    format!("`{tz}` is not an IANA time zone"),
                    "unknown time zone",
                    "use a name such as `Europe/Berlin`, `America/New_York` or `UTC`".to_string(),
                ));
            }
            if let Some(h) = &win.hours
                && crate::core::scale::parse_hours(h).is_none()
            {
                out.push(problem(
                    wat("hours"),
                    At::Value,
                    format!("`{h}` is not a span of hours"),
                    "not HH:MM-HH:MM",
                    "write it as `08:00-18:00` (the end excluded; `22:00-06:00` crosses midnight)".to_string(),
                ));
            }
            if win.min.is_some_and(|m| m > sc.max) || win.idle.is_some_and(|m| m > sc.max) {
                out.push(problem(
                    wat("min"),
                    At::Key,
                    format!("a schedule window of pool `{}` asks for more than its `max` ({})", pool.name, sc.max),
                    "more than max",
                    "a window overrides `min` and `idle` within `max`".to_string(),
                ));
            }
        }
        if let Some(first) = first_seen.insert(&pool.name, i) {
            first_seen.insert(&pool.name, first);
            out.push(problem(
                at("name"),
                At::Value,
                format!("duplicate pool name `{}`", pool.name),
                "used again here",
                format!("pool names must be unique; `pools[{first}]` already uses `{}`", pool.name),
            ));
        }
        match c.providers.get(&pool.provider) {
            None => {
                let hint = match super::closest(&pool.provider, &provider_names) {
                    Some(s) => format!("did you mean `{s}`? defined providers: {}", list(&provider_names)),
                    None if provider_names.is_empty() => "define it under `providers:`".to_string(),
                    None => format!("define it under `providers:`, or use one of: {}", list(&provider_names)),
                };
                out.push(problem(
                    at("provider"),
                    At::Value,
                    format!("pool `{}` uses provider `{}`, which is not defined", pool.name, pool.provider),
                    "no such provider",
                    hint,
                ));
            }
            Some(p) => p.validate_pool(c, i, pool, &mut out),
        }
        match (&pool.machine.availability_zone, &pool.machine.availability_zones) {
            (Some(_), Some(_)) => out.push(problem(
                at("machine.availability_zones"),
                At::Key,
                format!("pool `{}` sets both `availability_zone` and `availability_zones`", pool.name),
                "both set",
                "list every zone, in the order to try them, under `availability_zones` and drop `availability_zone`"
                    .to_string(),
            )),
            (None, Some(z)) if z.is_empty() => out.push(problem(
                at("machine.availability_zones"),
                At::Value,
                format!("pool `{}` lists no availability zone", pool.name),
                "empty",
                "list at least one zone, e.g. `availability_zones: [us-east-1a, us-east-1b]`".to_string(),
            )),
            _ => {}
        }
        if pool.machine.image.trim().is_empty() {
            out.push(problem(
                at("machine.image"),
                At::Value,
                format!("pool `{}` has an empty `image`", pool.name),
                "empty",
                "name the image, e.g. an AMI id `ami-0123456789abcdef0`".to_string(),
            ));
        }
        tag_rules(&mut out, &at("tags"), &pool.tags);
        match c.providers.get(&pool.provider).map(|p| p.tags()) {
            Some(None) if !pool.tags.is_empty() => out.push(problem(
                at("tags"),
                At::Key,
                format!("pool `{}` is on provider `{}`, which does not tag what it makes", pool.name, pool.provider),
                "no tags on this provider",
                "tags apply to `aws` and `local` providers; remove `tags` from this pool".to_string(),
            )),
            Some(Some(pt)) => {
                // AWS allows 50 tags per resource: nimbus's own take up to 7 (a host's generation included).
                let mut merged: BTreeMap<&String, &String> = c.tags.iter().collect();
                merged.extend(pt.iter());
                merged.extend(pool.tags.iter());
                if merged.len() + NIMBUS_TAGS > MAX_TAGS {
                    out.push(problem(
                        if pool.tags.is_empty() { "tags".to_string() } else { at("tags") },
                        At::Key,
                        format!(
                            "pool `{}` would put {} tags on each resource, and AWS allows {MAX_TAGS}: {} of yours (fleet, provider and pool merged) and {NIMBUS_TAGS} of nimbus's",
                            pool.name,
                            merged.len() + NIMBUS_TAGS,
                            merged.len()
                        ),
                        "too many tags",
                        format!("keep at most {} tags of your own per pool", MAX_TAGS - NIMBUS_TAGS),
                    ));
                }
            }
            _ => {}
        }
        let mut steps: HashMap<&str, usize> = HashMap::new();
        for (j, step) in pool.setup.iter().enumerate() {
            if step.name.trim().is_empty() {
                out.push(problem(
                    format!("pools[{i}].setup[{j}].name"),
                    At::Value,
                    "a setup step has an empty name".into(),
                    "empty",
                    "name every step; names are how progress is tracked on the machine".to_string(),
                ));
            }
            if let Some(first) = steps.insert(&step.name, j) {
                steps.insert(&step.name, first);
                out.push(problem(
                    format!("pools[{i}].setup[{j}].name"),
                    At::Value,
                    format!("duplicate setup step `{}` in pool `{}`", step.name, pool.name),
                    "used again here",
                    format!("step names must be unique in a pool (`setup[{first}]` has it); progress on the machine is recorded by name"),
                ));
            }
        }
        if let Some(name) = &pool.forge
            && c.forges.as_ref().is_none_or(|f| !f.contains_key(name))
        {
            out.push(problem(
                at("forge"),
                At::Value,
                format!("pool `{}` names forge `{name}`, which `forges:` does not have", pool.name),
                "unknown forge",
                format!(
                    "the forges are: {}",
                    c.forges.iter().flat_map(|f| f.keys()).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if let Some(r) = &pool.runner {
            if c.forge_of(pool).is_none() && pool.forge.is_none() {
                out.push(problem(
                    at("runner"),
                    At::Key,
                    format!("pool `{}` declares a runner, but no `forge` is configured", pool.name),
                    "needs a forge",
                    "add a `forge:` section (GitHub App), or remove `runner:` from the pool".to_string(),
                ));
            }
            let mut seen = HashMap::new();
            for (j, l) in r.labels.iter().enumerate() {
                let lp = format!("pools[{i}].runner.labels[{j}]");
                if l.trim().is_empty() || l.contains(',') || l.len() > 256 {
                    out.push(problem(
                        lp,
                        At::Value,
                        format!("invalid runner label `{l}`"),
                        "invalid label",
                        "labels are non-empty, at most 256 characters, without commas".to_string(),
                    ));
                } else if seen.insert(l.to_lowercase(), j).is_some() {
                    out.push(problem(
                        lp,
                        At::Value,
                        format!("duplicate runner label `{l}` in pool `{}`", pool.name),
                        "repeated",
                        "labels are case-insensitive on the forge; list each once".to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// A forge instance's URL: https, or plain http on loopback only (a test peer).
pub fn instance_url_rules(out: &mut Vec<Problem>, path: &str, url: &str, example: &str) {
    if !(url.starts_with("https://") || url.starts_with("http://127.") || url.starts_with("http://localhost")) {
        out.push(problem(
            path.into(),
            At::Value,
            format!("`{url}` is not an https:// URL"),
            "not https",
            format!("give the instance's URL, for example `{example}`"),
        ));
    }
}

/// The sha256 of a runner agent's download per platform (`forge.runner_sha256`): known platform names, and 64 hex
/// digits each.
pub fn agent_sha256_rules(
    out: &mut Vec<Problem>,
    sums: &std::collections::BTreeMap<String, String>,
    platforms: &[&str],
    hint: &str,
) {
    let names = match platforms.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => platforms.join(""),
    };
    for (platform, sum) in sums {
        if !platforms.contains(&platform.as_str()) {
            out.push(problem(
                format!("forge.runner_sha256.{platform}"),
                At::Key,
                format!("`{platform}` is not a runner platform"),
                "unknown platform",
                format!("use {names}"),
            ));
        } else if sum.len() != 64 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
            out.push(problem(
                format!("forge.runner_sha256.{platform}"),
                At::Value,
                format!("`forge.runner_sha256.{platform}` is not a sha256"),
                "not 64 hex digits",
                hint.to_string(),
            ));
        }
    }
}

/// The platforms of the Go-built agents (`gitlab-runner`, `forgejo-runner`, `act_runner`).
pub const GO_AGENT_PLATFORMS: [&str; 4] = ["linux-amd64", "linux-arm64", "darwin-amd64", "darwin-arm64"];

/// AWS allows this many tags on a resource.
pub const MAX_TAGS: usize = 50;
/// Tags nimbus puts on a resource itself, at most (tenant, provider, pool, machine, managed-by, fleet, and a
/// host's generation).
pub const NIMBUS_TAGS: usize = 7;
/// AWS's limits on a tag's key and value, in characters.
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 256;

/// The rules of a `tags:` map (`path` is where it is): no reserved keys, AWS's lengths.
pub fn tag_rules(out: &mut Vec<Problem>, path: &str, tags: &BTreeMap<String, String>) {
    for (k, v) in tags {
        let at = format!("{path}.{k}");
        if crate::core::model::is_reserved_tag(k) {
            let whose = if k.starts_with("nimbus:") { "nimbus's own (it finds what it made by them)" } else { "AWS's" };
            out.push(problem(
                at,
                At::Key,
                format!("tag key `{k}` is reserved: `{}*` keys are {whose}", &k[..k.find(':').map_or(0, |i| i + 1)]),
                "reserved key",
                "use a key of your own, e.g. `team` or `cost-center`".to_string(),
            ));
        } else if k.trim().is_empty() || k.chars().count() > MAX_TAG_KEY {
            out.push(problem(
                at,
                At::Key,
                format!("a tag key has 1 to {MAX_TAG_KEY} characters; this one has {}", k.chars().count()),
                "bad key length",
                "shorten the key, e.g. `cost-center`".to_string(),
            ));
        } else if v.chars().count() > MAX_TAG_VALUE {
            out.push(problem(
                at,
                At::Value,
                format!("tag `{k}`'s value has {} characters; AWS allows {MAX_TAG_VALUE}", v.chars().count()),
                "value too long",
                "shorten the value".to_string(),
            ));
        } else if k.chars().chain(v.chars()).any(char::is_control) {
            out.push(problem(
                at,
                At::Value,
                format!("tag `{}` has a control character", k.escape_debug()),
                "control character",
                "use letters, digits, spaces and `+ - = . _ : / @` (the characters every AWS service accepts)"
                    .to_string(),
            ));
        }
    }
    if tags.len() + NIMBUS_TAGS > MAX_TAGS {
        out.push(problem(
            path.to_string(),
            At::Key,
            format!(
                "{} tags, with nimbus's {NIMBUS_TAGS}, are more than the {MAX_TAGS} AWS allows on a resource",
                tags.len()
            ),
            "too many tags",
            format!("keep at most {} tags of your own", MAX_TAGS - NIMBUS_TAGS),
        ));
    }
}

pub fn secret_rules(out: &mut Vec<Problem>, path: &str, s: &SecretRef) {
    if let SecretRef::Env(v) = s
        && !is_env_name(v)
    {
        out.push(problem(
            format!("{path}.env"),
            At::Value,
            format!("`{v}` is not an environment variable name"),
            "not a variable name",
            "use letters, digits and `_`, e.g. `{env: NIMBUS_GITHUB_APP_KEY}`".to_string(),
        ));
    }
}

fn list(names: &[String]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// The first token in a proxy command that OpenSSH would not expand.
fn bad_proxy_token(cmd: &str) -> Option<String> {
    let mut chars = cmd.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('h' | 'p' | 'r' | '%') => {}
                Some(o) => return Some(format!("%{o}")),
                None => return Some("%".into()),
            }
        }
    }
    None
}
