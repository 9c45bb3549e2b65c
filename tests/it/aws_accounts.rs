//! Issue 24: one fleet, several AWS accounts. Each `aws` provider acts as its own identity (a named profile, a
//! role assumed with an external id), against the moto that enforces IAM (with the project's patch that gives
//! its policy conditions `aws:RequestedRegion`, as IAM does). moto keeps each account's resources apart, as AWS
//! does: a user's keys act in its own account, an assumed role's in the role's.

use std::path::Path;

use crate::common::*;
use crate::iam_policy::{between, form, post_in};
use serde_json::{Value, json};

/// The account moto puts requests in when it knows no other (and where the base user and the role live).
const BASE_ACCOUNT: &str = "123456789012";
/// The Mac team's account, where the profile's user lives.
const MAC_ACCOUNT: &str = "111111111111";

/// An IAM Query API call to moto, unauthenticated (after `/moto-api/reset-auth`), in `account`.
fn iam(url: &str, account: &str, pairs: &[(&str, &str)]) -> String {
    let body = form(&[pairs, &[("Version", "2010-05-08")]].concat());
    post_in(url, Some(account), "/", "application/x-www-form-urlencoded", &body)
}

fn reset_auth(url: &str, requests: u32) {
    let out = post_in(url, None, "/moto-api/reset-auth", "text/plain", &requests.to_string());
    assert!(out.contains("\"ok\""), "{out}");
}

/// A user of `account` with one inline policy; its access key.
fn user(url: &str, account: &str, name: &str, policy: &Value) -> (String, String) {
    reset_auth(url, 3);
    let r = iam(url, account, &[("Action", "CreateUser"), ("UserName", name)]);
    assert!(r.contains("<CreateUserResult>"), "{r}");
    let r = iam(
        url,
        account,
        &[
            ("Action", "PutUserPolicy"),
            ("UserName", name),
            ("PolicyName", "p"),
            ("PolicyDocument", &policy.to_string()),
        ],
    );
    assert!(r.contains("PutUserPolicyResponse"), "{r}");
    let r = iam(url, account, &[("Action", "CreateAccessKey"), ("UserName", name)]);
    (between(&r, "<AccessKeyId>", "<").to_string(), between(&r, "<SecretAccessKey>", "<").to_string())
}

/// A role of `account` that `trust` may assume, allowed `policy`.
fn role(url: &str, account: &str, name: &str, trust: &Value, policy: &Value) -> String {
    reset_auth(url, 2);
    let r = iam(
        url,
        account,
        &[("Action", "CreateRole"), ("RoleName", name), ("AssumeRolePolicyDocument", &trust.to_string())],
    );
    assert!(r.contains("<CreateRoleResult>"), "{r}");
    let r = iam(
        url,
        account,
        &[
            ("Action", "PutRolePolicy"),
            ("RoleName", name),
            ("PolicyName", "p"),
            ("PolicyDocument", &policy.to_string()),
        ],
    );
    assert!(r.contains("PutRolePolicyResponse"), "{r}");
    format!("arn:aws:iam::{account}:role/{name}")
}

/// EC2 in one region only: what a team's identity may do (the condition moto checks with the project's patch).
fn ec2_in(region: &str) -> Value {
    json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "ec2:*", "Resource": "*",
        "Condition": {"StringEquals": {"aws:RequestedRegion": region}}
    }]})
}

struct Identities {
    /// `AWS_CONFIG_FILE` with profile `mac-<tenant>` (the Mac account's user).
    config_file: std::path::PathBuf,
    profile: String,
    /// The base chain's keys (the environment): may only assume roles.
    base: (String, String),
    /// The Linux role (base account) and the external id its trust policy requires.
    role_arn: String,
    external_id: String,
}

fn identities(url: &str, tenant: &str, dir: &Path) -> Identities {
    let mac = user(url, MAC_ACCOUNT, &format!("mac-{tenant}"), &ec2_in("us-east-1"));
    let base_name = format!("base-{tenant}");
    let base = user(
        url,
        BASE_ACCOUNT,
        &base_name,
        &json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}),
    );
    let external_id = format!("ext-{tenant}");
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"AWS": format!("arn:aws:iam::{BASE_ACCOUNT}:user/{base_name}")},
        "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"sts:ExternalId": external_id}}
    }]});
    let role_arn = role(url, BASE_ACCOUNT, &format!("linux-{tenant}"), &trust, &ec2_in("us-west-2"));
    let profile = format!("mac-{tenant}");
    let config_file = dir.join("aws-config");
    std::fs::write(
        &config_file,
        format!("[profile {profile}]\naws_access_key_id = {}\naws_secret_access_key = {}\n", mac.0, mac.1),
    )
    .unwrap();
    Identities { config_file, profile, base, role_arn, external_id }
}

fn env(url: &str, ids: &Identities) -> Vec<(&'static str, String)> {
    let mut env = aws_env(url);
    env.retain(|(k, _)| !matches!(*k, "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_CONFIG_FILE"));
    env.push(("AWS_ACCESS_KEY_ID", ids.base.0.clone()));
    env.push(("AWS_SECRET_ACCESS_KEY", ids.base.1.clone()));
    env.push(("AWS_CONFIG_FILE", ids.config_file.display().to_string()));
    env.push(("NIMBUS_LINUX_EXTERNAL_ID", ids.external_id.clone()));
    env
}

/// `mac` (us-east-1, the Mac account through a profile) and `linux` (us-west-2, a role with an external id);
/// `swap` gives each the other's identity.
fn fleet(tenant: &str, ids: &Identities, swap: bool, linux: u32, team: &str) -> String {
    let profile = format!("profile: {}", ids.profile);
    let role = format!(
        "role_arn: {}\n    external_id: {{env: NIMBUS_LINUX_EXTERNAL_ID}}\n    session_name: nimbus-linux",
        ids.role_arn
    );
    let (mac_id, linux_id) = if swap { (&role, &profile) } else { (&profile, &role) };
    format!(
        "version: 1\ntenant: {tenant}\ntags: {{team: {team}, cost-center: cc-42}}\nproviders:\n  mac:\n    type: aws\n    region: us-east-1\n    {mac_id}\n  linux:\n    type: aws\n    region: us-west-2\n    {linux_id}\n    tags: {{cost-center: cc-7}}\npools:\n  - name: mac\n    provider: mac\n    count: 1\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0abc, availability_zone: us-east-1a}}\n  - name: linux\n    provider: linux\n    count: {linux}\n    tags: {{pool: linux}}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: us-west-2a}}\n"
    )
}

/// What the fleet's providers find, each acting as its own identity (`nimbus discover`): the live machines.
fn machines(dir: &Path, env: &[(&str, String)]) -> Vec<Value> {
    let o = nimbus_env(dir, &["discover", "-o", "-"], env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let inv: Value = serde_json::from_slice(&o.stdout).unwrap();
    inv["actual"]["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !matches!(m["state"].as_str(), Some("terminated" | "shutting-down")))
        .cloned()
        .collect()
}

#[test]
fn two_providers_act_in_two_accounts_as_their_own_identities() {
    let Some(url) = peer("NIMBUS_MOTO_IAM_URL", "moto with IAM enforced") else { return };
    let _iam = iam_moto_lock();
    let tenant = unique_tenant("acct");
    let dir = tempfile::tempdir().unwrap();
    let ids = identities(&url, &tenant, dir.path());
    let env = env(&url, &ids);
    let write = |swap, linux, team| {
        std::fs::write(dir.path().join("fleet.yaml"), fleet(&tenant, &ids, swap, linux, team)).unwrap()
    };

    // The base chain alone may not touch EC2: a fleet without credentials of its own is refused.
    write(false, 1, "platform");
    let o = nimbus_env(dir.path(), &["plan", "--detailed-exitcode"], &env);
    assert_eq!(o.status.code(), Some(2), "plan as each provider's identity\n{}", text(&o));
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &env);
    assert_eq!(o.status.code(), Some(0), "apply as each provider's identity\n{}", text(&o));
    let o = nimbus_env(dir.path(), &["plan", "--detailed-exitcode"], &env);
    assert_eq!(o.status.code(), Some(0), "converged\n{}", text(&o));

    // Nothing crossed accounts: the Mac account's user sees the Mac machine only, and the role the Linux one.
    let found = machines(dir.path(), &env);
    assert_eq!(found.len(), 2, "{found:?}");
    let mac = found.iter().find(|m| m["tags"]["nimbus:pool"] == "mac").unwrap().clone();
    let linux = found.iter().find(|m| m["tags"]["nimbus:pool"] == "linux").unwrap().clone();
    assert_eq!(mac["provider"], "mac");
    assert_eq!(linux["provider"], "linux");
    // Tags merged fleet < provider < pool, on what each made.
    assert_eq!(mac["tags"]["team"], "platform", "{mac}");
    assert_eq!(mac["tags"]["cost-center"], "cc-42", "{mac}");
    assert_eq!(linux["tags"]["cost-center"], "cc-7", "{linux}");
    assert_eq!(linux["tags"]["pool"], "linux", "{linux}");

    // A changed tag is an in-place update on both accounts, not a replacement.
    write(false, 1, "mobile");
    let o = nimbus_env(dir.path(), &["plan", "--json"], &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["summary"]["change"], 2, "{}", plan["summary"]);
    assert_eq!(plan["summary"]["add"], 0);
    assert_eq!(plan["summary"]["destroy"], 0);
    let kinds: Vec<&str> = plan["actions"].as_array().unwrap().iter().map(|a| a["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["update_tags", "update_tags"], "{}", plan["actions"]);
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let after = machines(dir.path(), &env);
    for m in &after {
        assert_eq!(m["tags"]["team"], "mobile", "{m}");
    }
    let ids_after: Vec<&Value> = after.iter().map(|m| &m["instance_id"]).collect();
    assert!(ids_after.contains(&&mac["instance_id"]) && ids_after.contains(&&linux["instance_id"]), "same instances");

    // Swapped, each identity is refused in the other's region: AccessDenied, naming the provider and who it was.
    write(true, 1, "mobile");
    let o = nimbus_env(dir.path(), &["plan"], &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("AccessDenied") || err.contains("UnauthorizedOperation"), "{err}");
    assert!(err.contains("provider `mac`") || err.contains("provider `linux`"), "{err}");
    assert!(err.contains("acts as"), "the error says who the provider acted as: {err}");
    // A wrong external id: the role's trust policy refuses it (moto checks `sts:ExternalId`).
    write(false, 1, "mobile");
    let mut bad = env.clone();
    bad.retain(|(k, _)| *k != "NIMBUS_LINUX_EXTERNAL_ID");
    bad.push(("NIMBUS_LINUX_EXTERNAL_ID", "not-it".into()));
    let o = nimbus_env(dir.path(), &["plan"], &bad);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("provider `linux`"), "{}", text(&o));
    // No secret of either identity reached the output.
    for o in [&o] {
        let all = text(o);
        for secret in [&ids.base.1, &ids.external_id] {
            assert!(!all.contains(secret.as_str()), "a secret leaked: {all}");
        }
    }
    // Cleanup: everything goes (each provider in its own account).
    write(false, 0, "mobile");
    let yaml = fleet(&tenant, &ids, false, 0, "mobile").replace("count: 1", "count: 0");
    std::fs::write(dir.path().join("fleet.yaml"), yaml).unwrap();
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Issue 24.2: the library facade serves two tenants in one process, each on its own credentials (a profile in
/// its own account): each provisions in its own account and never sees the other's machine. The body runs in a
/// child process of this test binary, so the AWS environment (moto's IAM-enforcing endpoint) is its alone.
#[test]
fn two_tenants_in_one_process_use_their_own_credentials() {
    if std::env::var_os("NIMBUS_FACADE_CHILD").is_some() {
        return facade_child();
    }
    let Some(url) = peer("NIMBUS_MOTO_IAM_URL", "moto with IAM enforced") else { return };
    let _iam = iam_moto_lock();
    let run = unique_tenant("fa");
    let dir = tempfile::tempdir().unwrap();
    let mut profiles = String::new();
    for (t, account) in [("a", MAC_ACCOUNT), ("b", "222222222222")] {
        let mut policy = ec2_in("us-east-1");
        policy["Statement"][0]["Action"] = json!(["ec2:*", "s3:*"]);
        let keys = user(&url, account, &format!("{t}-{run}"), &policy);
        profiles.push_str(&format!(
            "[profile {t}-{run}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            keys.0, keys.1
        ));
    }
    std::fs::write(dir.path().join("aws-config"), profiles).unwrap();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "aws_accounts::two_tenants_in_one_process_use_their_own_credentials", "--nocapture"]);
    for (k, v) in aws_env(&url) {
        cmd.env(k, v);
    }
    // The process's own keys are nobody's: only the profiles can act.
    cmd.env("AWS_CONFIG_FILE", dir.path().join("aws-config"))
        .env("AWS_ACCESS_KEY_ID", "AKIANOBODY")
        .env("AWS_SECRET_ACCESS_KEY", "nobody")
        .env("NIMBUS_FACADE_CHILD", &run)
        .env("NIMBUS_FACADE_DIR", dir.path());
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 passed"), "{}", text(&o));
}

fn facade_child() {
    use nimbus::api::{MemoryStorage, Nimbus};
    use nimbus::providers::Provider;
    use nimbus::providers::aws::{AwsProvider, AwsSettings, credentials::AwsIdentity};
    let run = std::env::var("NIMBUS_FACADE_CHILD").unwrap();
    let dir = std::path::PathBuf::from(std::env::var("NIMBUS_FACADE_DIR").unwrap());
    let storage = MemoryStorage::default();
    let tenant = |t: &str| format!("{t}{}", run.replace('-', "").chars().rev().take(8).collect::<String>());
    for t in ["a", "b"] {
        let yaml = format!(
            "version: 1\ntenant: {}\ntags: {{team: {t}}}\nproviders:\n  aws: {{type: aws, region: us-east-1, profile: {t}-{run}}}\npools:\n  - name: linux\n    provider: aws\n    count: 0\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: us-east-1a}}\n",
            tenant(t)
        );
        // Each tenant keeps its journal (and lock) in a folder of its own.
        let base = dir.join(t);
        std::fs::create_dir_all(&base).unwrap();
        storage.put(nimbus::config::parse("t", &yaml).unwrap(), &base).unwrap();
    }
    let n = Nimbus::new(storage);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (ta, tb) = (tenant("a"), tenant("b"));
        let (a, b) = tokio::join!(n.provision(&ta, "linux"), n.provision(&tb, "linux"));
        let (a, b) = (a.unwrap(), b.unwrap());
        for (t, m) in [("a", &a), ("b", &b)] {
            let listed = n.list_machines(&tenant(t)).await.unwrap();
            assert_eq!(listed.iter().map(|m| &m.name).collect::<Vec<_>>(), [&m.name], "{t}: {listed:?}");
        }
        // Acting as a's profile, b's machine does not exist at all (it is in b's account), and the other way round.
        let as_profile = |t: &str| AwsSettings {
            region: Some("us-east-1".into()),
            identity: AwsIdentity { profile: Some(format!("{t}-{run}")), ..Default::default() },
            ..Default::default()
        };
        for (me, other, theirs) in [("a", "b", &b), ("b", "a", &a)] {
            let p = AwsProvider::new("aws", &tenant(other), as_profile(me)).await.unwrap();
            let seen = p.discover(&tenant(other)).await.unwrap();
            assert!(
                seen.machines.iter().all(|m| m.instance_id != theirs.instance_id),
                "{me}'s credentials see {other}'s machine"
            );
            let own = AwsProvider::new("aws", &tenant(other), as_profile(other)).await.unwrap();
            let seen = own.discover(&tenant(other)).await.unwrap();
            let m =
                seen.machines.iter().find(|m| m.instance_id == theirs.instance_id).expect("its own credentials see it");
            assert_eq!(m.tags.get("team"), Some(other), "the tenant's tag went on with it");
        }
        for (t, m) in [("a", &a), ("b", &b)] {
            n.terminate(&tenant(t), &m.name).await.unwrap();
        }
        // The S3 state backend acts as its own `profile` too: the process's own keys are nobody's, so a's journal
        // is written and read only through a's profile. (moto's S3 does not keep accounts' buckets apart, as
        // AWS's ownership rules would; that part is AWS's to enforce.)
        let state = |profile: &str| nimbus::config::StateConfig {
            backend: nimbus::config::StateBackend::S3,
            bucket: Some(format!("state-{run}")),
            key: Some("journal.db".into()),
            endpoint: std::env::var("AWS_ENDPOINT_URL").ok(),
            profile: Some(format!("{profile}-{run}")),
            ..Default::default()
        };
        let s3 = nimbus::state::remote::S3State::from_config_in(&state("a"), &dir).await.unwrap();
        s3.create_bucket().await.unwrap();
        s3.upload(b"a's journal".to_vec(), None).await.unwrap();
        let (body, _) = s3.download().await.unwrap().expect("a reads its journal");
        assert_eq!(body, b"a's journal");
        let without = nimbus::config::StateConfig { profile: None, ..state("a") };
        let nobody = nimbus::state::remote::S3State::from_config_in(&without, &dir).await.unwrap();
        assert!(nobody.download().await.is_err(), "the process's own keys are refused: the profile did the work");
    });
}

/// Issue 24.1: a CI's OIDC token (`web_identity`) is exchanged for the role through STS
/// (`AssumeRoleWithWebIdentity`, on moto), from `{env:}` or `{file:}`; the token never reaches the output, and a
/// missing token is a clear error naming the provider.
#[test]
fn a_web_identity_token_is_exchanged_for_the_role() {
    let Some(url) = peer("NIMBUS_MOTO_URL", "moto (EC2, STS)") else { return };
    let tenant = unique_tenant("oidc");
    let dir = tempfile::tempdir().unwrap();
    let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXBvOmFjbWUvZmxlZXQifQ.c2VjcmV0LXNpZ25hdHVyZQ";
    let fleet = |source: &str| {
        format!(
            "version: 1\ntenant: {tenant}\nproviders:\n  aws:\n    type: aws\n    region: us-east-1\n    role_arn: arn:aws:iam::123456789012:role/nimbus-ci\n    web_identity: {source}\n    duration: 15m\npools:\n  - name: linux\n    provider: aws\n    count: 1\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: us-east-1a}}\n"
        )
    };
    let mut env = aws_env(&url);
    // No keys at all: only the token can get credentials.
    env.retain(|(k, _)| !matches!(*k, "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY"));
    env.push(("CI_OIDC_TOKEN", token.into()));
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    for source in ["{env: CI_OIDC_TOKEN}", "{file: token}"] {
        std::fs::write(dir.path().join("fleet.yaml"), fleet(source)).unwrap();
        let o = nimbus_env(dir.path(), &["plan", "--detailed-exitcode", "--json"], &env);
        assert_eq!(o.status.code(), Some(2), "{source}: {}", text(&o));
        assert!(!text(&o).contains(token) && !text(&o).contains("c2VjcmV0LXNpZ25hdHVyZQ"), "the token leaked");
    }
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let o = nimbus_env(dir.path(), &["plan"], &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("provider `aws`") && err.contains("web_identity") && err.contains("token"), "{err}");
}
