//! Credentials per `aws` provider (and per S3 state backend): a named profile, a role assumed through STS
//! (with an external id), or a CI's OIDC token exchanged for a role (web identity). Without any of them, the
//! standard chain (environment, shared files, SSO, instance role) is used, as before.
//!
//! Each provider's clients are built from its own settings, so one fleet file (or one process serving several
//! tenants through the library) can act in several AWS accounts, and nothing one provider does uses another's
//! identity. Secrets (a web identity token) come from the environment or a file, read when credentials are
//! fetched; temporary credentials are cached by the SDK's identity cache and refreshed [`REFRESH_BEFORE`] they
//! expire.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::identity::IdentityCache;
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider, future};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::SecretRef;
use crate::config::validate::{At, Problem, problem};

/// Temporary credentials are fetched again this long before they expire (a long `reconcile` never signs with
/// credentials about to lapse).
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// STS allows role sessions of 15 minutes to 12 hours (the role's own maximum may be lower).
pub const MIN_SESSION: Duration = Duration::from_secs(15 * 60);
pub const MAX_SESSION: Duration = Duration::from_secs(12 * 3600);

/// An external id: not a secret to AWS ("a unique identifier"), but kept out of plans and logs all the same;
/// written as text or read from `{env: VAR}` / `{file: path}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ExternalId {
    Secret(SecretRef),
    Text(String),
}

/// Who an AWS client acts as: the credential fields of an `aws` provider or of `state:`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsIdentity {
    pub profile: Option<String>,
    pub role_arn: Option<String>,
    pub external_id: Option<ExternalId>,
    pub session_name: Option<String>,
    pub duration: Option<Duration>,
    pub web_identity: Option<SecretRef>,
}

impl AwsIdentity {
    /// From the fields as the fleet file has them (an `aws` provider's, or `state:`'s: serde cannot share them
    /// through `flatten` in a section that refuses unknown keys).
    pub fn from_fields(
        profile: &Option<String>,
        role_arn: &Option<String>,
        external_id: &Option<ExternalId>,
        session_name: &Option<String>,
        duration: Option<crate::config::HumanDuration>,
        web_identity: &Option<SecretRef>,
    ) -> AwsIdentity {
        AwsIdentity {
            profile: profile.clone(),
            role_arn: role_arn.clone(),
            external_id: external_id.clone(),
            session_name: session_name.clone(),
            duration: duration.map(|d| d.0),
            web_identity: web_identity.clone(),
        }
    }

    pub fn is_default(&self) -> bool {
        self == &AwsIdentity::default()
    }

    /// Who the client acts as, for messages (never a secret).
    pub fn describe(&self) -> String {
        let base = match &self.profile {
            Some(p) => format!("profile `{p}`"),
            None => "the standard credential chain".to_string(),
        };
        match (&self.role_arn, &self.web_identity) {
            (Some(r), Some(_)) => format!("role `{r}` (through a web identity token)"),
            (Some(r), None) => format!(
                "role `{r}`{} (assumed with {base})",
                if self.external_id.is_some() { " with an external id" } else { "" }
            ),
            (None, _) => base,
        }
    }

    /// The fields' rules; `path` is where they are (`providers.mac`, `state`).
    pub fn validate(&self, path: &str, out: &mut Vec<Problem>) {
        let at = |k: &str| format!("{path}.{k}");
        if let Some(p) = &self.profile
            && (p.is_empty() || p.chars().any(|c| c.is_whitespace() || c == '[' || c == ']'))
        {
            out.push(problem(
                at("profile"),
                At::Value,
                format!("`{p}` is not a profile name"),
                "not a profile name",
                "name a profile of the shared AWS config (`[profile NAME]` in ~/.aws/config), e.g. `profile: mac-team`"
                    .to_string(),
            ));
        }
        if let Some(r) = &self.role_arn
            && !is_role_arn(r)
        {
            out.push(problem(
                at("role_arn"),
                At::Value,
                format!("`{r}` is not an IAM role ARN"),
                "not a role ARN",
                "e.g. `role_arn: arn:aws:iam::123456789012:role/nimbus-mac`".to_string(),
            ));
        }
        if self.role_arn.is_none() {
            for (k, set) in [
                ("external_id", self.external_id.is_some()),
                ("session_name", self.session_name.is_some()),
                ("duration", self.duration.is_some()),
                ("web_identity", self.web_identity.is_some()),
            ] {
                if set {
                    out.push(problem(
                        at(k),
                        At::Key,
                        format!("`{k}` applies to an assumed role, and `{path}` has no `role_arn`"),
                        "no role to assume",
                        "add `role_arn: arn:aws:iam::ACCOUNT:role/NAME`, or remove this key".to_string(),
                    ));
                }
            }
        }
        if self.web_identity.is_some() && self.profile.is_some() {
            out.push(problem(
                at("web_identity"),
                At::Key,
                "`web_identity` and `profile` are two ways to get the first credentials; use one".to_string(),
                "two credential sources",
                "keep `web_identity` (a CI's OIDC token) or `profile`, not both".to_string(),
            ));
        }
        if self.web_identity.is_some() && self.external_id.is_some() {
            out.push(problem(
                at("external_id"),
                At::Key,
                "STS takes no external id with a web identity token".to_string(),
                "not with web_identity",
                "remove `external_id`; the role's trust policy checks the token's claims instead".to_string(),
            ));
        }
        if let Some(s) = &self.session_name
            && (s.len() < 2 || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || "=,.@-_".contains(c)))
        {
            out.push(problem(
                at("session_name"),
                At::Value,
                format!("`{s}` is not a role session name"),
                "not a session name",
                "use 2 to 64 letters, digits and `=,.@-_`, e.g. `nimbus-mac`".to_string(),
            ));
        }
        if let Some(d) = self.duration
            && !(MIN_SESSION..=MAX_SESSION).contains(&d)
        {
            out.push(problem(
                at("duration"),
                At::Value,
                format!("a role session lasts 15 minutes to 12 hours, not {}", humantime::format_duration(d)),
                "out of range",
                "e.g. `duration: 1h` (the role's own maximum session duration may be lower)".to_string(),
            ));
        }
        if let Some(ExternalId::Text(t)) = &self.external_id
            && (t.len() < 2 || t.len() > 1224)
        {
            out.push(problem(
                at("external_id"),
                At::Value,
                "an external id has 2 to 1,224 characters".to_string(),
                "bad length",
                "use the id the role's trust policy names in `sts:ExternalId`".to_string(),
            ));
        }
        for (k, s) in [("web_identity", self.web_identity.as_ref()), ("external_id", self.external_id_ref())] {
            if let Some(s) = s {
                crate::config::validate::secret_rules(out, &at(k), s);
            }
        }
    }

    fn external_id_ref(&self) -> Option<&SecretRef> {
        match &self.external_id {
            Some(ExternalId::Secret(s)) => Some(s),
            _ => None,
        }
    }

    /// The SDK configuration for this identity: `loader` carries the region, retries and the like. `base_dir`
    /// resolves relative `{file:}` paths (the fleet file's folder).
    pub async fn load(
        &self,
        mut loader: aws_config::ConfigLoader,
        base_dir: &Path,
    ) -> Result<aws_config::SdkConfig, String> {
        // Temporary credentials are refreshed well before they expire.
        loader = loader.identity_cache(IdentityCache::lazy().buffer_time(REFRESH_BEFORE).build());
        if let Some(p) = &self.profile {
            // The profile's credentials only: with the default chain, AWS_ACCESS_KEY_ID in the environment would
            // quietly win over the profile the fleet file names.
            loader = loader.profile_name(p).credentials_provider(
                aws_config::profile::ProfileFileCredentialsProvider::builder().profile_name(p).build(),
            );
        }
        let base = loader.load().await;
        let Some(role) = &self.role_arn else { return Ok(base) };
        let session_name = self.session_name.clone().unwrap_or_else(|| "nimbus".to_string());
        let provider: SharedCredentialsProvider = match &self.web_identity {
            Some(token) => SharedCredentialsProvider::new(WebIdentity {
                sts: aws_sdk_sts::Client::from_conf(aws_sdk_sts::config::Builder::from(&base).build()),
                role_arn: role.clone(),
                session_name,
                duration: self.duration,
                token: token.clone(),
                base_dir: base_dir.to_path_buf(),
            }),
            None => {
                let mut b = aws_config::sts::AssumeRoleProvider::builder(role.clone()).session_name(session_name);
                if let Some(id) = &self.external_id {
                    let id = match id {
                        ExternalId::Text(t) => t.clone(),
                        ExternalId::Secret(s) => crate::util::secrets::read("external_id", s, base_dir)
                            .map_err(|e| e.to_string())?
                            .trim()
                            .to_string(),
                    };
                    b = b.external_id(id);
                }
                if let Some(d) = self.duration {
                    b = b.session_length(d);
                }
                SharedCredentialsProvider::new(b.configure(&base).build().await)
            }
        };
        Ok(base.into_builder().credentials_provider(provider).build())
    }
}

/// `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`.
pub fn is_role_arn(s: &str) -> bool {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].chars().all(|c| c.is_ascii_digit())
        && parts[5].strip_prefix("role/").is_some_and(|n| !n.is_empty() && !n.ends_with('/'))
}

/// A CI's OIDC token exchanged for a role's credentials (`AssumeRoleWithWebIdentity`). The token is read again
/// at every refresh (a CI rotates its token file); it is never logged.
#[derive(Debug)]
struct WebIdentity {
    sts: aws_sdk_sts::Client,
    role_arn: String,
    session_name: String,
    duration: Option<Duration>,
    token: SecretRef,
    base_dir: PathBuf,
}

impl WebIdentity {
    async fn fetch(&self) -> provider::Result {
        let token = crate::util::secrets::read("web_identity", &self.token, &self.base_dir)
            .map_err(CredentialsError::not_loaded)?;
        let out = self
            .sts
            .assume_role_with_web_identity()
            .role_arn(&self.role_arn)
            .role_session_name(&self.session_name)
            .web_identity_token(token.trim())
            .set_duration_seconds(self.duration.map(|d| d.as_secs() as i32))
            .send()
            .await
            .map_err(|e| {
                CredentialsError::provider_error(format!(
                    "AssumeRoleWithWebIdentity for `{}`: {}",
                    self.role_arn,
                    aws_sdk_sts::error::DisplayErrorContext(&e)
                ))
            })?;
        let c = out.credentials.ok_or_else(|| CredentialsError::unhandled("STS answered without credentials"))?;
        let expires = std::time::SystemTime::try_from(c.expiration).ok();
        Ok(Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            Some(c.session_token),
            expires,
            "nimbus-web-identity",
        ))
    }
}

impl ProvideCredentials for WebIdentity {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.fetch())
    }
}
