//! A small EC2 client for the operations in [`super::EC2_OPERATIONS`], in place of aws-sdk-ec2 (issue 23: that
//! one crate was 181 s and most of the peak memory of a 5.5-minute clean build, for ten of its ~700
//! operations).
//!
//! It speaks EC2's Query protocol as the SDK does (API version 2016-11-15): a form-encoded `POST /` with
//! `Action`, `Version` and the operation's parameters (lists flattened as `Name.1`, `Name.2`, …), signed with
//! SigV4 by `aws-sigv4` (the SDK's signer), with credentials from `aws-config`'s chain. Answers are XML; an
//! error is `<Response><Errors><Error><Code>…</Code><Message>…</Message></Error></Errors>…`.
//!
//! Like the SDK's standard retry mode, a call is tried up to `max_attempts` times when EC2 throttles
//! (`RequestLimitExceeded` and the other throttling codes), answers 500/502/503/504, or cannot be reached,
//! with exponential backoff and full jitter (1 s base, 20 s cap). Mutating calls carry a ClientToken, so a
//! retry never makes a second resource. Each attempt is a `nimbus.cloud_provider.api_call_*` event.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};

use super::clock::ClockWatch;
use crate::core::model::{HostState, InstanceState, Tags};
use crate::util::http::{HyperClient, encode};
use crate::util::telemetry::{ApiOutcome, api_machine, api_request_end, api_request_start};

/// The EC2 API version every request names.
pub const API_VERSION: &str = "2016-11-15";

/// One attempt's limit, connection and answer included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(20);

/// Error codes the SDK's standard retry mode treats as throttling (aws-runtime's `THROTTLING_ERRORS`).
pub const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// EC2 answered with an error code.
    #[error("{}", service_message(code, message))]
    Service { status: u16, code: String, message: String },
    /// EC2 answered with an error status and a body that is not EC2's error document.
    #[error("EC2 answered HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status { status: u16, body: String },
    /// No answer: the endpoint could not be reached, or the connection broke.
    #[error("cannot reach the EC2 endpoint ({why}): {cause}")]
    Dispatch { why: &'static str, cause: String },
    #[error("the request to EC2 timed out")]
    Timeout,
    /// An answer nimbus could not read.
    #[error("EC2 sent a response nimbus could not read: {0}")]
    Response(String),
    /// No credentials to sign with.
    #[error("no AWS credentials: {0}")]
    Credentials(String),
    /// The request could not be built or signed.
    #[error("the request could not be built: {0}")]
    Request(String),
}

fn service_message(code: &str, message: &str) -> String {
    match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message}"),
        (false, true) => code.to_string(),
        (true, false) => message.to_string(),
        (true, true) => "the service returned an error without a code".to_string(),
    }
}

impl Ec2Error {
    /// EC2's error code, when it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Ec2Error::Service { code, .. } if !code.is_empty() => Some(code),
            _ => None,
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Ec2Error::Service { status, .. } | Ec2Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_throttling(&self) -> bool {
        self.code().is_some_and(|c| THROTTLING_CODES.contains(&c))
    }

    /// Worth another attempt: throttling, a server error, or no answer at all.
    fn is_retryable(&self) -> bool {
        self.is_throttling()
            || matches!(
                self.code(),
                Some("RequestTimeout" | "RequestTimeoutException" | "InternalError" | "Unavailable")
            )
            || matches!(self.status(), Some(500 | 502 | 503 | 504))
            || matches!(self, Ec2Error::Dispatch { .. } | Ec2Error::Timeout)
    }
}

/// A request's parameters, in the order they were set.
#[derive(Debug, Clone)]
pub struct Params {
    action: &'static str,
    pairs: Vec<(String, String)>,
}

/// A `Filter.N` of a Describe* call.
#[derive(Debug, Clone)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

impl Filter {
    pub fn new(name: &str, values: &[&str]) -> Filter {
        Filter { name: name.to_string(), values: values.iter().map(|v| v.to_string()).collect() }
    }
}

impl Params {
    pub fn new(action: &'static str) -> Params {
        Params { action, pairs: Vec::new() }
    }

    pub fn action(&self) -> &'static str {
        self.action
    }

    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Params {
        self.pairs.push((key.into(), value.into()));
        self
    }

    pub fn set_opt(self, key: &str, value: Option<impl Into<String>>) -> Params {
        match value {
            Some(v) => self.set(key, v),
            None => self,
        }
    }

    /// `prefix.1`, `prefix.2`, … (EC2's lists are flat).
    pub fn list<S: AsRef<str>>(mut self, prefix: &str, values: &[S]) -> Params {
        for (i, v) in values.iter().enumerate() {
            self.pairs.push((format!("{prefix}.{}", i + 1), v.as_ref().to_string()));
        }
        self
    }

    pub fn filters(mut self, filters: &[Filter]) -> Params {
        for (i, f) in filters.iter().enumerate() {
            self.pairs.push((format!("Filter.{}.Name", i + 1), f.name.clone()));
            for (j, v) in f.values.iter().enumerate() {
                self.pairs.push((format!("Filter.{}.Value.{}", i + 1, j + 1), v.clone()));
            }
        }
        self
    }

    /// `prefix.N.Key` and `prefix.N.Value`; `with_values: false` sends keys only (DeleteTags by key).
    fn tag_pairs<'t>(mut self, prefix: &str, tags: impl Iterator<Item = (&'t str, Option<&'t str>)>) -> Params {
        for (i, (k, v)) in tags.enumerate() {
            self.pairs.push((format!("{prefix}.{}.Key", i + 1), k.to_string()));
            if let Some(v) = v {
                self.pairs.push((format!("{prefix}.{}.Value", i + 1), v.to_string()));
            }
        }
        self
    }

    pub fn tags(self, prefix: &str, tags: &Tags) -> Params {
        self.tag_pairs(prefix, tags.iter().map(|(k, v)| (k, Some(v))))
    }

    pub fn tag_keys<S: AsRef<str>>(self, prefix: &str, keys: &[S]) -> Params {
        self.tag_pairs(prefix, keys.iter().map(|k| (k.as_ref(), None)))
    }

    /// `TagSpecification.N`: the tags a created resource of `resource_type` gets.
    pub fn tag_specification(self, n: usize, resource_type: &str, tags: &Tags) -> Params {
        let prefix = format!("TagSpecification.{n}");
        self.set(format!("{prefix}.ResourceType"), resource_type).tags(&format!("{prefix}.Tag"), tags)
    }

    /// The form body: `Action`, `Version`, then the parameters.
    pub fn body(&self) -> String {
        let mut out = format!("Action={}&Version={API_VERSION}", self.action);
        for (k, v) in &self.pairs {
            out.push('&');
            out.push_str(&encode(k));
            out.push('=');
            out.push_str(&encode(v));
        }
        out
    }
}

/// Who signs, where requests go, and how often they are tried.
pub struct Ec2Client {
    http: HyperClient,
    endpoint: String,
    host: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
    cached: tokio::sync::Mutex<Option<Credentials>>,
    max_attempts: u32,
    provider: String,
    tenant: String,
    clock: ClockWatch,
}

impl std::fmt::Debug for Ec2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Client").field("endpoint", &self.endpoint).field("region", &self.region).finish()
    }
}

/// The regional endpoint, as the SDK's endpoint rules give it for the `aws` and `aws-cn` partitions.
pub fn default_endpoint(region: &str, fips: bool, dual_stack: bool) -> String {
    let service = if fips { "ec2-fips" } else { "ec2" };
    let china = region.starts_with("cn-");
    let suffix = match (dual_stack, china) {
        (true, true) => "api.amazonwebservices.com.cn",
        (true, false) => "api.aws",
        (false, true) => "amazonaws.com.cn",
        (false, false) => "amazonaws.com",
    };
    format!("https://{service}.{region}.{suffix}")
}

/// Where EC2 requests go: the provider's `endpoint_url`, else `AWS_ENDPOINT_URL_EC2` / the profile's `ec2`
/// `endpoint_url`, else `AWS_ENDPOINT_URL` / the profile's `endpoint_url` (as the SDK resolves them), else the
/// region's endpoint.
pub fn resolve_endpoint(explicit: Option<&str>, sdk: &aws_types::SdkConfig, region: &str) -> String {
    if let Some(u) = explicit {
        return u.to_string();
    }
    let configured = if sdk.get_origin("endpoint_url").is_client_config() {
        sdk.endpoint_url().map(str::to_string)
    } else {
        sdk.service_config()
            .and_then(|c| {
                let key = aws_types::service_config::ServiceConfigKey::builder()
                    .service_id("EC2")
                    .env("AWS_ENDPOINT_URL")
                    .profile("endpoint_url")
                    .build()
                    .ok()?;
                c.load_config(key)
            })
            .or_else(|| sdk.endpoint_url().map(str::to_string))
    };
    configured.unwrap_or_else(|| {
        default_endpoint(region, sdk.use_fips().unwrap_or(false), sdk.use_dual_stack().unwrap_or(false))
    })
}

impl Ec2Client {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        endpoint: String,
        region: String,
        credentials: Option<SharedCredentialsProvider>,
        max_attempts: u32,
        provider: &str,
        tenant: &str,
        clock: ClockWatch,
    ) -> Result<Ec2Client, String> {
        let uri: http::Uri = endpoint.parse().map_err(|e| format!("EC2 endpoint `{endpoint}`: {e}"))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| format!("EC2 endpoint `{endpoint}` has no host"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!("EC2 endpoint `{endpoint}` is not an http(s) URL"));
        }
        // Requests go to the endpoint's root; a path of its own is kept.
        let endpoint = if uri.path().is_empty() || uri.path() == "/" {
            format!("{}://{host}/", uri.scheme_str().unwrap_or("https"))
        } else {
            endpoint
        };
        Ok(Ec2Client {
            http: crate::util::http::client()?,
            endpoint,
            host,
            region,
            credentials,
            cached: tokio::sync::Mutex::new(None),
            max_attempts: max_attempts.max(1),
            provider: provider.to_string(),
            tenant: tenant.to_string(),
            clock,
        })
    }

    /// Credentials to sign with: cached, and fetched again [`super::credentials::REFRESH_BEFORE`] they expire.
    async fn credentials(&self) -> Result<Credentials, Ec2Error> {
        let Some(provider) = &self.credentials else {
            return Err(Ec2Error::Credentials("the credential chain found none".to_string()));
        };
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            let fresh = c.expiry().is_none_or(|e| e > SystemTime::now() + super::credentials::REFRESH_BEFORE);
            if fresh {
                return Ok(c.clone());
            }
        }
        let c = provider.provide_credentials().await.map_err(|e| {
            // The innermost cause says what is missing; a credential error never carries a secret.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            Ec2Error::Credentials(msg)
        })?;
        *cached = Some(c.clone());
        Ok(c)
    }

    /// One operation, tried up to `max_attempts` times; `read` takes what nimbus uses from the answer's document.
    pub async fn call<T>(&self, params: &Params, read: impl Fn(&El<'_>) -> T) -> Result<T, Ec2Error> {
        let body = params.body();
        let op = params.action();
        let machine = api_machine();
        let mut attempt = 1;
        loop {
            api_request_start(&self.tenant, &self.provider, op, &machine);
            let started = Instant::now();
            let answer = self.attempt(&body).await;
            let result = answer.and_then(|text| parse(&text).map(|doc| read(&doc)).map_err(Ec2Error::Response));
            let failed = result.as_ref().err().map(|e| match e.status() {
                Some(s) => format!("HTTP {s}: {e}").chars().take(300).collect::<String>(),
                None => e.to_string().chars().take(300).collect(),
            });
            let outcome = match result.as_ref().err().and_then(Ec2Error::status) {
                Some(429 | 503) => ApiOutcome::Throttled,
                _ if result.as_ref().err().is_some_and(Ec2Error::is_throttling) => ApiOutcome::Throttled,
                _ => ApiOutcome::Error,
            };
            api_request_end(&self.tenant, &self.provider, op, &machine, started.elapsed(), failed.as_deref(), outcome);
            match result {
                Err(e) if attempt < self.max_attempts && e.is_retryable() => {
                    let wait = backoff(attempt);
                    tracing::debug!(provider = %self.provider, op, attempt, error = %e, wait_ms = wait.as_millis() as u64, "EC2 call failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One signed request; the body of a 2xx answer.
    async fn attempt(&self, body: &str) -> Result<String, Ec2Error> {
        let credentials = self.credentials().await?;
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let mut req = http::Request::builder()
            .method("POST")
            .uri(&self.endpoint)
            .header("host", &self.host)
            .header("content-type", content_type)
            .header("user-agent", concat!("nimbus/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| Ec2Error::Request(e.to_string()))?;
        {
            use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
            let identity = credentials.into();
            let params = aws_sigv4::sign::v4::SigningParams::builder()
                .identity(&identity)
                .region(&self.region)
                .name("ec2")
                .time(SystemTime::now())
                .settings(SigningSettings::default())
                .build()
                .map_err(|e| Ec2Error::Request(e.to_string()))?
                .into();
            let signable = SignableRequest::new(
                "POST",
                &self.endpoint,
                [("host", self.host.as_str()), ("content-type", content_type)].into_iter(),
                SignableBody::Bytes(body.as_bytes()),
            )
            .map_err(|e| Ec2Error::Request(e.to_string()))?;
            let (instructions, _) = sign(signable, &params).map_err(|e| Ec2Error::Request(e.to_string()))?.into_parts();
            instructions.apply_to_request_http1x(&mut req);
        }
        let exchange = async {
            let resp = self.http.request(req).await.map_err(dispatch_error)?;
            let status = resp.status().as_u16();
            if let Some(d) = resp.headers().get("date").and_then(|d| d.to_str().ok()) {
                self.clock.observe(d);
            }
            let bytes = resp.into_body().collect().await.map_err(dispatch_error)?.to_bytes();
            Ok::<_, Ec2Error>((status, bytes))
        };
        let (status, bytes) =
            tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await.map_err(|_| Ec2Error::Timeout)??;
        let text = String::from_utf8(bytes.to_vec()).map_err(|_| Ec2Error::Response("not UTF-8".to_string()))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        Err(error_document(status, &text))
    }
}

/// A failure without an answer, by its innermost cause ("Connection refused").
fn dispatch_error(e: impl std::error::Error + 'static) -> Ec2Error {
    let mut last = e.to_string();
    let mut src = e.source();
    let mut why = "a connection error";
    while let Some(s) = src {
        last = s.to_string();
        if s.downcast_ref::<std::io::Error>().is_some() {
            why = "a network error";
        }
        src = s.source();
    }
    Ec2Error::Dispatch { why, cause: last.chars().take(200).collect() }
}

/// The error an error answer carries: EC2's `<Errors><Error><Code>…`, else the HTTP status.
fn error_document(status: u16, text: &str) -> Ec2Error {
    if let Ok(doc) = parse(text) {
        let e = doc.child("Errors").and_then(|e| e.child("Error")).or_else(|| doc.child("Error"));
        if let Some(e) = e {
            return Ec2Error::Service {
                status,
                code: e.text_of("Code").unwrap_or_default().to_string(),
                message: e.text_of("Message").unwrap_or_default().to_string(),
            };
        }
    }
    Ec2Error::Status { status, body: text.chars().filter(|c| !c.is_control()).take(200).collect() }
}

/// Full jitter: a random wait up to `base · 2^(attempt-1)`, at most [`BACKOFF_CAP`].
fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << (attempt - 1).min(16)).min(BACKOFF_CAP);
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    ceiling.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
}

// ---------------------------------------------------------------------------------------------------- XML

/// An element of an answer: its name, its text (a leaf's), and its children.
#[derive(Debug, Clone)]
pub struct El<'a> {
    pub name: &'a str,
    pub text: Cow<'a, str>,
    pub children: Vec<El<'a>>,
}

impl<'a> El<'a> {
    pub fn child(&self, name: &str) -> Option<&El<'a>> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_ref())
    }

    /// The `<item>`s of the list `name`.
    pub fn items(&self, name: &str) -> impl Iterator<Item = &El<'a>> {
        self.child(name).into_iter().flat_map(|l| l.children.iter().filter(|c| c.name == "item"))
    }
}

/// The document's root element.
pub fn parse(text: &str) -> Result<El<'_>, String> {
    use xmlparser::{ElementEnd, Token};
    let mut stack: Vec<El<'_>> = Vec::new();
    let mut root = None;
    for token in xmlparser::Tokenizer::from(text) {
        match token.map_err(|e| format!("XML: {e}"))? {
            Token::ElementStart { local, .. } => {
                if let Some(parent) = stack.last_mut() {
                    // A container's text is only the whitespace between its children.
                    parent.text = Cow::Borrowed("");
                }
                stack.push(El { name: local.as_str(), text: Cow::Borrowed(""), children: Vec::new() });
            }
            Token::ElementEnd { end: ElementEnd::Open, .. } => {}
            Token::ElementEnd { .. } => {
                let el = stack.pop().ok_or("XML: an end tag without a start")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None if root.is_none() => root = Some(el),
                    None => return Err("XML: more than one root element".to_string()),
                }
            }
            Token::Text { text } => {
                if let Some(el) = stack.last_mut()
                    && el.children.is_empty()
                {
                    let t = unescape(text.as_str())?;
                    if el.text.is_empty() {
                        el.text = t;
                    } else {
                        el.text.to_mut().push_str(&t);
                    }
                }
            }
            Token::Cdata { text, .. } => {
                if let Some(el) = stack.last_mut()
                    && el.children.is_empty()
                {
                    el.text.to_mut().push_str(text.as_str());
                }
            }
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err("XML: the document ends inside an element".to_string());
    }
    root.ok_or_else(|| "XML: no root element".to_string())
}

/// XML's five entities and character references.
fn unescape(s: &str) -> Result<Cow<'_, str>, String> {
    if !s.contains('&') {
        return Ok(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(';').ok_or_else(|| format!("XML: unterminated entity in `{s}`"))? + i;
        let entity = &rest[i + 1..end];
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            e if e.starts_with("#x") || e.starts_with("#X") => {
                u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32).ok_or(format!("XML: bad `&{e};`"))?
            }
            e if e.starts_with('#') => {
                e[1..].parse::<u32>().ok().and_then(char::from_u32).ok_or(format!("XML: bad `&{e};`"))?
            }
            e => return Err(format!("XML: unknown entity `&{e};`")),
        };
        out.push(c);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

// ---------------------------------------------------------------------------------------------------- shapes

/// What nimbus reads of a dedicated host.
#[derive(Debug, Clone)]
pub struct Ec2Host {
    pub id: String,
    pub availability_zone: String,
    pub state: HostState,
    /// `None` when missing or unreadable.
    pub allocated_at: Option<DateTime<Utc>>,
    pub instance_type: Option<String>,
    pub instances: Vec<String>,
    pub tags: Tags,
}

/// What nimbus reads of an instance.
#[derive(Debug, Clone)]
pub struct Ec2Instance {
    pub id: String,
    pub image_id: String,
    pub state: InstanceState,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    pub host_id: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
    pub private_ip: Option<String>,
    pub tags: Tags,
    pub volume_ids: Vec<String>,
}

fn nonempty(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_string)
}

fn timestamp(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok()).map(|t| t.with_timezone(&Utc))
}

fn tag_set(el: &El<'_>) -> Tags {
    el.items("tagSet").filter_map(|t| Some((t.text_of("key")?, t.text_of("value").unwrap_or("")))).collect()
}

/// EC2's `AllocationState`; a state nimbus does not know is read as released (never used, never counted).
fn host_state(s: &str) -> HostState {
    match s {
        "available" => HostState::Available,
        "pending" => HostState::Pending,
        "under-assessment" => HostState::UnderAssessment,
        "permanent-failure" => HostState::PermanentFailure,
        _ => HostState::Released,
    }
}

/// EC2's `InstanceStateName`; one nimbus does not know is read as terminated.
fn instance_state(s: &str) -> InstanceState {
    match s {
        "pending" => InstanceState::Pending,
        "running" => InstanceState::Running,
        "stopping" => InstanceState::Stopping,
        "stopped" => InstanceState::Stopped,
        "shutting-down" => InstanceState::ShuttingDown,
        _ => InstanceState::Terminated,
    }
}

fn read_host(h: &El<'_>) -> Ec2Host {
    Ec2Host {
        id: h.text_of("hostId").unwrap_or_default().to_string(),
        availability_zone: h.text_of("availabilityZone").unwrap_or_default().to_string(),
        state: host_state(h.text_of("state").unwrap_or_default()),
        allocated_at: timestamp(h.text_of("allocationTime")),
        instance_type: nonempty(h.child("hostProperties").and_then(|p| p.text_of("instanceType"))),
        instances: h.items("instances").filter_map(|i| nonempty(i.text_of("instanceId"))).collect(),
        tags: tag_set(h),
    }
}

fn read_instance(i: &El<'_>) -> Ec2Instance {
    let placement = i.child("placement");
    Ec2Instance {
        id: i.text_of("instanceId").unwrap_or_default().to_string(),
        image_id: i.text_of("imageId").unwrap_or_default().to_string(),
        state: instance_state(i.child("instanceState").and_then(|s| s.text_of("name")).unwrap_or_default()),
        instance_type: nonempty(i.text_of("instanceType")),
        availability_zone: nonempty(placement.and_then(|p| p.text_of("availabilityZone"))),
        host_id: nonempty(placement.and_then(|p| p.text_of("hostId"))),
        launched_at: timestamp(i.text_of("launchTime")),
        private_ip: nonempty(i.text_of("privateIpAddress")),
        tags: tag_set(i),
        volume_ids: i
            .items("blockDeviceMapping")
            .filter_map(|b| nonempty(b.child("ebs").and_then(|e| e.text_of("volumeId"))))
            .collect(),
    }
}

/// One page of DescribeHosts: the hosts and the next page's token.
pub fn read_hosts(doc: &El<'_>) -> (Vec<Ec2Host>, Option<String>) {
    (doc.items("hostSet").map(read_host).collect(), nonempty(doc.text_of("nextToken")))
}

/// One page of DescribeInstances: the instances of every reservation, and the next page's token.
pub fn read_instances(doc: &El<'_>) -> (Vec<Ec2Instance>, Option<String>) {
    let instances = doc.items("reservationSet").flat_map(|r| r.items("instancesSet")).map(read_instance).collect();
    (instances, nonempty(doc.text_of("nextToken")))
}

/// RunInstances: the instances launched.
pub fn read_run_instances(doc: &El<'_>) -> Vec<String> {
    doc.items("instancesSet").filter_map(|i| nonempty(i.text_of("instanceId"))).collect()
}

/// AllocateHosts: the hosts allocated.
pub fn read_host_ids(doc: &El<'_>) -> Vec<String> {
    doc.items("hostIdSet").filter_map(|i| nonempty(Some(i.text.as_ref()))).collect()
}

/// ReleaseHosts: each host that was not released, with EC2's reason.
pub fn read_unsuccessful(doc: &El<'_>) -> Vec<(String, String)> {
    doc.items("unsuccessful")
        .map(|u| {
            let e = u.child("error");
            let why = service_message(
                e.and_then(|e| e.text_of("code")).unwrap_or_default(),
                e.and_then(|e| e.text_of("message")).unwrap_or_default(),
            );
            (u.text_of("resourceId").unwrap_or_default().to_string(), why)
        })
        .collect()
}

/// CreateReplaceRootVolumeTask: the task's id.
pub fn read_replace_task_id(doc: &El<'_>) -> Option<String> {
    nonempty(doc.child("replaceRootVolumeTask").and_then(|t| t.text_of("replaceRootVolumeTaskId")))
}

/// DescribeReplaceRootVolumeTasks: the first task's state.
pub fn read_replace_task_state(doc: &El<'_>) -> Option<String> {
    doc.items("replaceRootVolumeTaskSet").next().and_then(|t| nonempty(t.text_of("taskState")))
}

/// Nothing to read (CreateTags, DeleteTags, TerminateInstances).
pub fn read_nothing(_: &El<'_>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ec2_documents_and_errors() {
        let doc = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <reservationSet><item><instancesSet><item>
    <instanceId>i-1</instanceId><imageId>ami-1</imageId>
    <instanceState><code>16</code><name>running</name></instanceState>
    <instanceType>mac2.metal</instanceType>
    <placement><availabilityZone>us-east-1a</availabilityZone><hostId>h-1</hostId><tenancy>host</tenancy></placement>
    <launchTime>2026-01-02T03:04:05.000Z</launchTime>
    <tagSet><item><key>a&amp;b</key><value>x &lt;y&gt; &#233;</value></item><item><key>empty</key><value/></item></tagSet>
    <blockDeviceMapping><item><deviceName>/dev/sda1</deviceName><ebs><volumeId>vol-1</volumeId></ebs></item></blockDeviceMapping>
  </item></instancesSet></item></reservationSet>
  <nextToken>n2</nextToken>
</DescribeInstancesResponse>"#;
        let (is, next) = read_instances(&parse(doc).unwrap());
        assert_eq!(next.as_deref(), Some("n2"));
        let i = &is[0];
        assert_eq!((i.id.as_str(), i.image_id.as_str(), i.state), ("i-1", "ami-1", InstanceState::Running));
        assert_eq!(i.host_id.as_deref(), Some("h-1"));
        assert_eq!(i.availability_zone.as_deref(), Some("us-east-1a"));
        assert_eq!(i.tags.get("a&b"), Some("x <y> é"));
        assert_eq!(i.tags.get("empty"), Some(""));
        assert_eq!(i.volume_ids, vec!["vol-1".to_string()]);
        assert_eq!(i.launched_at.unwrap().to_rfc3339(), "2026-01-02T03:04:05+00:00");

        let err = error_document(
            400,
            "<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>no i-9</Message></Error></Errors><RequestID>x</RequestID></Response>",
        );
        assert_eq!(err.code(), Some("InvalidInstanceID.NotFound"));
        assert_eq!(err.to_string(), "InvalidInstanceID.NotFound: no i-9");
        assert!(!err.is_retryable());
        let throttled = error_document(
            503,
            "<Response><Errors><Error><Code>RequestLimitExceeded</Code></Error></Errors></Response>",
        );
        assert!(throttled.is_throttling() && throttled.is_retryable());
        assert!(error_document(502, "<html>bad gateway</html>").is_retryable());
        assert!(parse("<a><b></a>").is_err());
    }

    #[test]
    fn writes_flat_lists_filters_and_tag_specifications() {
        let tags: Tags = [("k 1", "v&1")].into();
        let body = Params::new("RunInstances")
            .list("SecurityGroupId", &["sg-1", "sg-2"])
            .filters(&[Filter::new("tag:nimbus:tenant", &["t"])])
            .tag_specification(1, "instance", &tags)
            .body();
        assert_eq!(
            body,
            "Action=RunInstances&Version=2016-11-15&SecurityGroupId.1=sg-1&SecurityGroupId.2=sg-2\
             &Filter.1.Name=tag%3Animbus%3Atenant&Filter.1.Value.1=t&TagSpecification.1.ResourceType=instance\
             &TagSpecification.1.Tag.1.Key=k%201&TagSpecification.1.Tag.1.Value=v%261"
        );
        let keys = Params::new("DeleteTags").tag_keys("Tag", &["a"]).body();
        assert_eq!(keys, "Action=DeleteTags&Version=2016-11-15&Tag.1.Key=a");
        assert_eq!(default_endpoint("cn-north-1", false, false), "https://ec2.cn-north-1.amazonaws.com.cn");
        assert_eq!(default_endpoint("us-east-1", true, false), "https://ec2-fips.us-east-1.amazonaws.com");
        for a in 1..12 {
            assert!(backoff(a) <= BACKOFF_CAP && backoff(a) <= BACKOFF_BASE * (1 << (a - 1)));
        }
    }
}
