//! Lingering on refused request bodies, so that a client still sending gets to read the refusal.
//!
//! When a handler answers before reading the whole body (an upload over the size limit, a wrong
//! token, a bad query), the server would close a socket that still has unread bytes in it, and the
//! kernel then resets the connection. A client that is still writing (the CLI streaming a large
//! image) sees "connection reset" and never reads the 413 that was already on its way. Web servers
//! solve this with a "lingering close"; hyper has none, so this layer does it: a body dropped
//! before its end is read and thrown away for up to [`LINGER`], and the refusal says
//! `Connection: close` so the client does not reuse the connection.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::{Stream, StreamExt};

/// How long the rest of a refused body is read before the connection is dropped anyway; long
/// enough for a client on a slow link to notice the answer, short enough to bound the cost.
pub const LINGER: Duration = Duration::from_secs(30);

/// Middleware: wraps the request body so that dropping it early drains it in the background.
pub async fn drain_refused_bodies(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let body = if body.is_end_stream() { body } else { Body::from_stream(Lingering::new(body)) };
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if !resp.status().is_success() {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

struct Lingering {
    inner: Option<BodyDataStream>,
    ended: bool,
}

impl Lingering {
    fn new(body: Body) -> Self {
        Self { inner: Some(body.into_data_stream()), ended: false }
    }
}

impl Stream for Lingering {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let next = inner.poll_next_unpin(cx);
        if matches!(next, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        next
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut rest) = self.inner.take().filter(|_| !self.ended) else { return };
        // Outside a runtime (never in the server) there is nothing to linger with.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async { while let Some(Ok(_)) = rest.next().await {} }).await;
        });
    }
}
