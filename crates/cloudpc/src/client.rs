//! A small client for the cloudpc API, and the exit codes scripts can trust:
//! 0 success, 1 server unreachable or server error, 2 wrong usage, 3 request refused (bad input
//! or conflict), 4 not found, 5 not authenticated or not allowed.

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// A failed command: what to print and which exit code to use.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Failure { code: 2, message: message.into() }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Failure { code: 3, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Failure { code: 4, message: message.into() }
    }
}

fn code_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        401 | 403 => 5,
        404 => 4,
        400..=499 => 3,
        _ => 1,
    }
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_string(), token }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request to a path under the server (like `/v1.0/users`); returns the JSON body, or
    /// `Value::Null` for `204 No Content`.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let Some(token) = &self.token else {
            return Err(Failure { code: 5, message: "no token: set CLOUDPC_TOKEN (or pass --token)".into() });
        };
        let mut req = self.http.request(method, &url).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }

    /// Streams a local file as the body of a POST, with a progress bar on stderr when asked.
    pub async fn upload(&self, path: &str, file: &std::path::Path, progress: bool) -> Result<Value, Failure> {
        use futures_util::TryStreamExt;
        let Some(token) = &self.token else {
            return Err(Failure { code: 5, message: "no token: set CLOUDPC_TOKEN (or pass --token)".into() });
        };
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| Failure::usage(format!("cannot open {}: {e}", file.display())))?;
        let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        let bar = if progress {
            let bar = indicatif::ProgressBar::new(len);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("the template is valid"),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let counted = bar.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).inspect_ok(move |chunk| {
            counted.inc(chunk.len() as u64);
        });
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(stream));
        let result = self.send(req).await;
        bar.finish_and_clear();
        if progress && result.is_ok() {
            eprintln!("uploaded {} ({} bytes)", file.display(), len);
        }
        result
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let resp = req
            .send()
            .await
            .map_err(|e| Failure { code: 1, message: format!("cannot reach cloudpc at {}: {e}", self.base) })?;
        let status = resp.status();
        let text =
            resp.text().await.map_err(|e| Failure { code: 1, message: format!("reading the answer failed: {e}") })?;
        if status.is_success() {
            if text.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text)
                .map_err(|e| Failure { code: 1, message: format!("the server's answer is not JSON: {e}") });
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        Err(Failure { code: code_for(status), message: format!("{message} (HTTP {})", status.as_u16()) })
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::GET, path, None).await
    }

    /// Follows `@odata.nextLink` until `limit` items or the end.
    pub async fn list(&self, path: &str, limit: Option<usize>) -> Result<Vec<Value>, Failure> {
        let mut out = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(url) = next {
            let page = self.get(&url).await?;
            out.extend(page.get("value").and_then(Value::as_array).cloned().unwrap_or_default());
            if limit.is_some_and(|n| out.len() >= n) {
                out.truncate(limit.unwrap_or(usize::MAX));
                break;
            }
            next = page.get("@odata.nextLink").and_then(Value::as_str).map(str::to_string);
        }
        Ok(out)
    }
}

/// Percent-encodes one query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
