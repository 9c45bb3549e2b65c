//! A small JSON-over-HTTP client on the stack already in the tree (hyper-util's client, hyper-rustls with the
//! system's roots): what the GitLab and Forgejo/Gitea forges need. Each request is one attempt; callers retry.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub type HyperClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client for `https://` and `http://` (loopback test peers) URLs.
pub fn client() -> Result<HyperClient, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("TLS roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// One answer: status, the headers nimbus reads (lower-case names), and the body as JSON (`Null` when empty or
/// not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub json: serde_json::Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Sends one request with `headers`, a JSON body or a form body.
pub async fn send(
    client: &HyperClient,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Option<Body>,
) -> Result<Answer, String> {
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    let bytes = match body {
        Some(Body::Json(v)) => {
            b = b.header("content-type", "application/json");
            Bytes::from(v.to_string())
        }
        Some(Body::Form(pairs)) => {
            b = b.header("content-type", "application/x-www-form-urlencoded");
            Bytes::from(pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&"))
        }
        None => Bytes::new(),
    };
    let req = b.body(Full::new(bytes)).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_ascii_lowercase(), v.to_string())))
        .collect();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Ok(Answer { status, headers, json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null) })
}

pub enum Body {
    Json(serde_json::Value),
    Form(Vec<(String, String)>),
}

/// Percent-encodes a query or form value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
